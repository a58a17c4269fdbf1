//! What both benches share: CUDA error mapping, the device, median timing, random inputs,
//! and the hand-rolled JSON of the reports (one flat object per line in, a small document
//! out).

use std::fmt::Write as _;
use std::sync::Arc;

use attention_runtime::device::{CudaDevice, Device};
use attention_runtime::modules::SplitMix64;
use attention_runtime::{AttnError, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

/// Map a CUDA driver error of `call` to an [`AttnError::Cuda`].
pub fn cuda_err(call: &str) -> impl FnOnce(cudarc::driver::DriverError) -> AttnError + '_ {
    move |e| AttnError::Cuda {
        call: call.to_string(),
        msg: e.to_string(),
    }
}

/// CUDA device 0, or [`AttnError::BackendUnavailable`].
pub fn cuda_device() -> Result<CudaDevice> {
    match Device::cuda(0)? {
        Device::Cuda(d) => Ok(d),
        Device::Cpu => Err(AttnError::BackendUnavailable("no CUDA device".into())),
    }
}

/// The median (upper median for an even count); NaN for no samples.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Random bf16 device buffer (deterministic pattern, values in about [-1.7, 1.7]).
pub fn random_bf16(stream: &Arc<CudaStream>, n: usize, seed: u64) -> Result<CudaSlice<bf16>> {
    let mut rng = SplitMix64::new(seed);
    let host: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.uniform() * 1.7))
        .collect();
    stream
        .clone_htod(&host)
        .map_err(cuda_err("clone_htod bench input"))
}

/// Comma-separated list, as the SDPA script's arguments take it.
pub fn join(v: &[usize]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The value of `"name":` in one flat JSON object line (quotes trimmed), if present.
pub fn json_field(line: &str, name: &str) -> Option<String> {
    let pat = format!("\"{name}\":");
    let start = line.find(&pat)? + pat.len();
    let rest = line[start..].trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim().trim_matches('"').to_string())
}

/// A JSON number with 4 decimals, `null` when not finite.
pub fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "null".into()
    }
}

/// A JSON string literal.
pub fn json_str(x: &str) -> String {
    let mut s = String::from("\"");
    for c in x.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

//! `attn bench backward --layer`: one training step of the whole layer (forward + backward)
//! on device tensors through the public API ([`CudaLayer::forward_train_device`], then
//! [`CudaLayer::backward_device`]: grad_input and the f32 weight and norm gradients), for the
//! layer bench's presets ([`LayerShape`]; Llama-3-8B by default) over one causal sequence,
//! against the same layer in PyTorch (`scripts/bench_layer.py --train-seqlens`: forward under
//! autograd, then `torch.autograd.grad` for x, both weights and both norm weights) with SDPA
//! flash and cuDNN, in the same run.
//!
//! Timing: CUDA events on the runtime's stream before the forward, between forward and
//! backward and after the backward; `warmup` steps, then the median of `reps` for each of
//! forward, backward and the step. Step FLOPs: the linears 3× their forward (forward, dgrad,
//! wgrad), the attention 3.5× its forward (forward + 2.5× backward).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use attention_runtime::cuda::{CudaLayer, DeviceTensor, ElemType};
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::train::{BackwardOptions, TrainOptions};
use attention_runtime::{ForwardArgs, Result, RuntimeDims, Tensor};
use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;

use super::chart::{write_report, Panel, Series};
use super::common::{cuda_device, cuda_err, join, json_field, json_num, json_str, median};
use super::layer_report::LayerShape;

/// Options of `attn bench backward --layer`.
#[derive(Debug, Clone)]
pub struct TrainStepOptions {
    /// Layer shapes.
    pub shapes: Vec<LayerShape>,
    /// Sequence lengths (one sequence each).
    pub seqlens: Vec<usize>,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps (medians reported).
    pub reps: usize,
    /// The PyTorch layer script (None = skip).
    pub torch_script: Option<PathBuf>,
    /// Write the JSON report here, and the SVG chart beside it.
    pub json: Option<PathBuf>,
}

/// Median times of one training step, ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepMs {
    /// Forward (training: saves what the backward needs).
    pub fwd: f64,
    /// Backward (all gradients).
    pub bwd: f64,
    /// Forward + backward.
    pub step: f64,
}

impl StepMs {
    const NAN: StepMs = StepMs {
        fwd: f64::NAN,
        bwd: f64::NAN,
        step: f64::NAN,
    };
}

/// One preset and length: ours and PyTorch's (flash, cuDNN) step times, and the step FLOPs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRow {
    /// Preset name.
    pub preset: String,
    /// Tokens (one sequence).
    pub tokens: usize,
    /// FLOPs of one step.
    pub flops: f64,
    /// Ours.
    pub ours: StepMs,
    /// PyTorch with SDPA flash.
    pub flash: StepMs,
    /// PyTorch with SDPA cuDNN.
    pub cudnn: StepMs,
}

/// FLOPs of one training step over `tokens` tokens (one causal sequence): 3 × the linears'
/// forward, 3.5 × the attention's forward.
pub fn train_step_flops(shape: &LayerShape, tokens: usize) -> f64 {
    3.0 * shape.linear_flops(tokens) + 3.5 * shape.attention_flops(tokens, 0)
}

/// Parse `bench_layer.py`'s `"case": "train"` lines: `(backend, tokens, times)`.
pub fn parse_train(text: &str) -> Vec<(String, usize, StepMs)> {
    text.lines()
        .filter(|l| json_field(l, "case").as_deref() == Some("train"))
        .filter_map(|l| {
            let num = |n: &str| {
                json_field(l, n)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(f64::NAN)
            };
            Some((
                json_field(l, "backend")?,
                json_field(l, "tokens")?.parse().ok()?,
                StepMs {
                    fwd: num("fwd_ms"),
                    bwd: num("bwd_ms"),
                    step: num("ms"),
                },
            ))
        })
        .collect()
}

fn torch_for(t: &[(String, usize, StepMs)], backend: &str, tokens: usize) -> StepMs {
    t.iter()
        .find(|x| x.0 == backend && x.1 == tokens)
        .map(|x| x.2)
        .unwrap_or(StepMs::NAN)
}

fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "n/a".into()
    }
}

fn ms3(m: StepMs) -> String {
    if m.step.is_finite() {
        format!("{:.2} ({:.2} + {:.2})", m.step, m.fwd, m.bwd)
    } else {
        "n/a".into()
    }
}

/// The table: per preset and length, step ms (forward + backward) of ours and PyTorch's,
/// ours' step TFLOP/s, and the speedups PyTorch step / ours step (> 1 = ours faster).
pub fn train_table(rows: &[TrainRow], device: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "device: {device}");
    let _ = writeln!(
        s,
        "training step (forward + backward), ms as step (forward + backward); speedup = torch step / ours step"
    );
    let _ = writeln!(
        s,
        "| preset | tokens | ours | ours TFLOP/s | torch flash | torch cudnn | vs flash | vs cudnn |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let tf = r.flops / (r.ours.step * 1e-3) / 1e12;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.preset,
            r.tokens,
            ms3(r.ours),
            if tf.is_finite() {
                format!("{tf:.1}")
            } else {
                "n/a".into()
            },
            ms3(r.flash),
            ms3(r.cudnn),
            ratio(r.flash.step, r.ours.step),
            ratio(r.cudnn.step, r.ours.step)
        );
    }
    s
}

/// The JSON report: `{device, rows: [...], note}`.
pub fn train_json(rows: &[TrainRow], device: &str, note: &str) -> String {
    let ms = |m: StepMs| {
        format!(
            "{{\"fwd_ms\": {}, \"bwd_ms\": {}, \"step_ms\": {}}}",
            json_num(m.fwd),
            json_num(m.bwd),
            json_num(m.step)
        )
    };
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"device\": {},", json_str(device));
    s.push_str("  \"rows\": [\n");
    for (i, r) in rows.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"preset\": {}, \"tokens\": {}, \"step_flops\": {}, \"ours\": {}, \"torch_flash\": {}, \"torch_cudnn\": {}}}",
            json_str(&r.preset),
            r.tokens,
            json_num(r.flops),
            ms(r.ours),
            ms(r.flash),
            ms(r.cudnn)
        );
        s.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
    }
    let _ = writeln!(s, "  ],\n  \"note\": {}\n}}", json_str(note));
    s
}

/// The chart: one panel per preset, step TFLOP/s over tokens.
pub fn train_panels(rows: &[TrainRow]) -> Vec<Panel> {
    let mut presets: Vec<&str> = rows.iter().map(|r| r.preset.as_str()).collect();
    presets.dedup();
    presets
        .into_iter()
        .map(|p| {
            let pts = |f: &dyn Fn(&TrainRow) -> f64| -> Vec<(f64, f64)> {
                rows.iter()
                    .filter(|r| r.preset == p)
                    .map(|r| (r.tokens as f64, r.flops / (f(r) * 1e-3) / 1e12))
                    .collect()
            };
            Panel {
                title: format!("{p} training step"),
                x_label: "tokens (one sequence)".into(),
                y_label: "TFLOP/s (fwd + bwd)".into(),
                series: vec![
                    Series::new("ours", pts(&|r| r.ours.step)),
                    Series::new("torch SDPA flash", pts(&|r| r.flash.step)),
                    Series::new("torch SDPA cuDNN", pts(&|r| r.cudnn.step)),
                ],
            }
        })
        .collect()
}

fn random_hidden(
    st: &std::sync::Arc<cudarc::driver::CudaStream>,
    shape: &[usize],
    seed: u64,
) -> Result<DeviceTensor> {
    let mut rng = SplitMix64::new(seed);
    DeviceTensor::from_host(
        st,
        &Tensor::from_fn(shape, |_| rng.uniform()),
        ElemType::Bf16,
    )
}

fn run_torch(o: &TrainStepOptions, shape: &LayerShape, notes: &mut Vec<String>) -> String {
    let Some(script) = &o.torch_script else {
        return String::new();
    };
    let res = Command::new("python3")
        .arg(script)
        .args(["--hidden", &shape.hidden.to_string()])
        .args(["--heads", &shape.heads.to_string()])
        .args(["--groups", &shape.groups.to_string()])
        .args(["--head-dim", &shape.head_dim.to_string()])
        .args([
            "--seqlens",
            "",
            "--chunk",
            "0",
            "--batches",
            "",
            "--contexts",
            "",
        ])
        .args(["--train-seqlens", &join(&o.seqlens)])
        .args(["--warmup", &o.warmup.to_string()])
        .args(["--reps", &o.reps.to_string()])
        .output();
    match res {
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if !out.status.success() {
                notes.push(format!(
                    "{} bench_layer.py failed ({}): {err}",
                    shape.name, out.status
                ));
            } else if !err.is_empty() {
                notes.push(format!("{} bench_layer.py: {err}", shape.name));
            }
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
        Err(e) => {
            notes.push(format!("could not run python3 {}: {e}", script.display()));
            String::new()
        }
    }
}

/// Time the training step of every preset and length; returns the table (and writes the
/// JSON and SVG).
pub fn run_train_step(o: &TrainStepOptions) -> Result<String> {
    let dev = cuda_device()?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for shape in &o.shapes {
        let torch = parse_train(&run_torch(o, shape, &mut notes));
        let config = SpecLayer::config_from_str(&shape.spec(), &RuntimeDims::default())?;
        let layer = SpecLayer::init(config, 7)?;
        let cuda = CudaLayer::new(&layer, &dev)?;
        let st = cuda.runtime().stream().clone();
        let args = ForwardArgs::default();
        for &s in &o.seqlens {
            // A failed step is a note and an n/a row, not the end of the run.
            let time_steps = || -> Result<StepMs> {
                let x = random_hidden(&st, &[s, 1, shape.hidden], s as u64)?;
                let dy = random_hidden(&st, &[s, 1, shape.hidden], s as u64 + 1)?;
                let (mut fw, mut bw, mut step) = (Vec::new(), Vec::new(), Vec::new());
                for it in 0..o.warmup + o.reps {
                    let ev = || {
                        st.record_event(Some(CU_EVENT_DEFAULT))
                            .map_err(cuda_err("record event"))
                    };
                    let e0 = ev()?;
                    let (y, mut saved) =
                        cuda.forward_train_device(&x, &args, &TrainOptions::default())?;
                    let e1 = ev()?;
                    let grads =
                        cuda.backward_device(&mut saved, &dy, &BackwardOptions::default())?;
                    let e2 = ev()?;
                    let f = e0.elapsed_ms(&e1).map_err(cuda_err("train forward"))? as f64;
                    let b = e1.elapsed_ms(&e2).map_err(cuda_err("train backward"))? as f64;
                    drop((y, saved, grads));
                    if it >= o.warmup {
                        fw.push(f);
                        bw.push(b);
                        step.push(f + b);
                    }
                }
                Ok(StepMs {
                    fwd: median(fw),
                    bwd: median(bw),
                    step: median(step),
                })
            };
            let ours = time_steps().unwrap_or_else(|e| {
                notes.push(format!("{} s{s}: ours failed: {e}", shape.name));
                StepMs::NAN
            });
            rows.push(TrainRow {
                preset: shape.name.clone(),
                tokens: s,
                flops: train_step_flops(shape, s),
                ours,
                flash: torch_for(&torch, "flash", s),
                cudnn: torch_for(&torch, "cudnn", s),
            });
        }
    }
    let note = notes.join("\n");
    if !note.is_empty() {
        eprintln!("{note}");
    }
    let table = train_table(&rows, &dev.name);
    if let Some(path) = &o.json {
        write_report(
            path,
            &train_json(&rows, &dev.name, &note),
            &format!(
                "attn bench backward --layer: training step vs PyTorch ({})",
                dev.name
            ),
            &train_panels(&rows),
            1,
        )?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> LayerShape {
        LayerShape::preset("llama3-8b").unwrap()
    }

    #[test]
    fn step_flops_are_three_linears_and_three_and_a_half_attentions() {
        let sh = llama();
        let f = train_step_flops(&sh, 2048);
        let want = 3.0 * sh.linear_flops(2048) + 3.5 * sh.attention_flops(2048, 0);
        assert_eq!(f, want);
        // Linears: 2 t h (np + 2 ng) hn + 2 t np hn h; attention causal 2 t^2 np hn.
        let (t, h) = (2048.0, 4096.0);
        let lin = 2.0 * t * h * (48.0 * 128.0) + 2.0 * t * 4096.0 * h;
        assert!((sh.linear_flops(2048) - lin).abs() < 1.0);
    }

    #[test]
    fn torch_lines_parse_and_table_formats() {
        let text = concat!(
            "{\"case\": \"prefill\", \"backend\": \"flash\", \"tokens\": 2048, \"ms\": 1.0}\n",
            "{\"case\": \"train\", \"backend\": \"flash\", \"tokens\": 2048, \"ctx\": 0, \"batch\": 1, \"ms\": 6.0, \"fwd_ms\": 2.0, \"bwd_ms\": 4.0, \"hidden\": 4096}\n",
            "{\"case\": \"train\", \"backend\": \"cudnn\", \"tokens\": 2048, \"ctx\": 0, \"batch\": 1, \"ms\": null, \"fwd_ms\": null, \"bwd_ms\": null, \"hidden\": 4096}\n",
        );
        let t = parse_train(text);
        assert_eq!(t.len(), 2);
        assert_eq!(
            torch_for(&t, "flash", 2048),
            StepMs {
                fwd: 2.0,
                bwd: 4.0,
                step: 6.0
            }
        );
        assert!(torch_for(&t, "cudnn", 2048).step.is_nan());
        assert!(torch_for(&t, "flash", 8192).step.is_nan());
        let rows = vec![TrainRow {
            preset: "llama3-8b".into(),
            tokens: 2048,
            flops: 3e12,
            ours: StepMs {
                fwd: 1.0,
                bwd: 2.0,
                step: 3.0,
            },
            flash: torch_for(&t, "flash", 2048),
            cudnn: torch_for(&t, "cudnn", 2048),
        }];
        let s = train_table(&rows, "H200");
        assert!(
            s.contains("| llama3-8b | 2048 | 3.00 (1.00 + 2.00) | 1000.0 | 6.00 (2.00 + 4.00) | n/a | 2.00 | n/a |"),
            "{s}"
        );
        let j = train_json(&rows, "H200", "");
        assert!(
            j.contains(
                "\"torch_flash\": {\"fwd_ms\": 2.0000, \"bwd_ms\": 4.0000, \"step_ms\": 6.0000}"
            ),
            "{j}"
        );
        assert!(j.contains("\"torch_cudnn\": {\"fwd_ms\": null"), "{j}");
        let p = train_panels(&rows);
        assert_eq!(p.len(), 1);
        let svg = crate::bench::chart::render_svg("train", &p, 1).unwrap();
        crate::bench::chart::tests::assert_well_formed(&svg);
    }
}

//! Per-call kernel time from an Nsight Compute profile: what one layer call spends inside its
//! kernels, so that `(call time - kernel sum) / call time` — the API's overhead — is
//! measured, not estimated.
//!
//! How the profile is made (`scripts/bench-all.sh` runs it): `attn bench layer
//! --profile-once MANIFEST` runs every case's call once after its warm-up, inside a
//! `cuProfilerStart` / `cuProfilerStop` window that begins with one launch of the empty
//! [`MARKER`] kernel, and writes the case names in order to `MANIFEST`. Under
//!
//! ```text
//! ncu --export R --metrics gpu__time_duration.sum --cache-control none --clock-control none \
//!     --profile-from-start off attn bench layer --profile-once M ...
//! ncu --import R.ncu-rep --csv > K.csv
//! ```
//!
//! only those windows are profiled (every kernel, CUDA-graph nodes included, each timed on
//! its own), so the rows of `K.csv` between two markers are one call's kernels. A later
//! timing run (`--ncu-csv K.csv --ncu-manifest M`) reads both with [`parse_ncu_csv`],
//! [`parse_manifest`] and [`split_calls`], and reports [`overhead`] per case. Memory copies
//! and host work inside a call are not kernels: they count as overhead, as they should.

use attention_runtime::{AttnError, Result};

/// Name of the empty kernel launched first in every profiled window.
pub const MARKER: &str = "attn_bench_marker";

/// The metric summed per call.
pub const METRIC: &str = "gpu__time_duration.sum";

/// One profiled kernel launch.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// ncu's result ID (launch order among profiled kernels).
    pub id: u64,
    /// Kernel name as ncu prints it.
    pub name: String,
    /// Device duration, ms.
    pub ms: f64,
}

/// The kernels of one profiled call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallKernels {
    /// The case name from the manifest.
    pub case: String,
    /// Its kernels, in launch order (the marker excluded).
    pub kernels: Vec<KernelTime>,
}

impl CallKernels {
    /// Sum of the kernels' device durations, ms.
    pub fn sum_ms(&self) -> f64 {
        self.kernels.iter().map(|k| k.ms).sum()
    }
}

/// `(call - kernels) / call`: the share of a call's time spent outside its kernels (launch
/// gaps, copies, host work the GPU waits for). NaN when either time is not a positive
/// finite number. Slightly negative values are measurement noise (two different runs).
pub fn overhead(call_ms: f64, kernel_ms: f64) -> f64 {
    if call_ms.is_finite() && kernel_ms.is_finite() && call_ms > 0.0 && kernel_ms >= 0.0 {
        (call_ms - kernel_ms) / call_ms
    } else {
        f64::NAN
    }
}

fn bad(expected: &str, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: "--ncu-csv".into(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// Split one CSV line into fields (double-quoted fields may hold commas; `""` is a quote).
pub fn csv_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Milliseconds per unit of a time unit as ncu prints it (`nsecond`, `usecond`, `msecond`,
/// `second`, or `ns`, `us`, `ms`, `s`).
pub fn unit_ms(unit: &str) -> Option<f64> {
    match unit.trim() {
        "nsecond" | "ns" => Some(1e-6),
        "usecond" | "us" | "µs" => Some(1e-3),
        "msecond" | "ms" => Some(1.0),
        "second" | "s" => Some(1e3),
        _ => None,
    }
}

/// A metric value as ncu prints it (thousands separators allowed).
fn number(s: &str) -> Option<f64> {
    s.trim().replace(',', "").parse::<f64>().ok()
}

/// The [`METRIC`] of every kernel in `ncu --csv` output (`ncu --import R.ncu-rep --csv`,
/// or a `--csv --log-file` log), sorted by ID. Lines before the
/// header (ncu's `==PROF==` messages, the program's output) are skipped. Both layouts are
/// read: the default details page (`"Metric Name"`, `"Metric Unit"`, `"Metric Value"`
/// columns, one row per kernel and metric) and `--page raw` (a `gpu__time_duration.sum`
/// column, units in the row after the header).
///
/// Errors: [`AttnError::InvalidArgument`] when there is no header, a needed column is
/// missing, or a value or unit cannot be read.
pub fn parse_ncu_csv(text: &str) -> Result<Vec<KernelTime>> {
    let mut lines = text.lines();
    let header = loop {
        let Some(l) = lines.next() else {
            return Err(bad(
                "an ncu --csv log with a header naming \"ID\" and \"Kernel Name\"",
                "no header (did ncu profile anything?)",
            ));
        };
        if l.starts_with('"') && l.contains("\"Kernel Name\"") && l.contains("\"ID\"") {
            break csv_fields(l);
        }
    };
    let col = |name: &str| header.iter().position(|h| h == name);
    let id_col = col("ID").ok_or_else(|| bad("an \"ID\" column", header.join(",")))?;
    let name_col =
        col("Kernel Name").ok_or_else(|| bad("a \"Kernel Name\" column", header.join(",")))?;
    enum Layout {
        Details {
            metric: usize,
            unit: usize,
            value: usize,
        },
        Raw {
            value: usize,
        },
    }
    let layout = match (col("Metric Name"), col("Metric Unit"), col("Metric Value"), col(METRIC)) {
        (Some(metric), Some(unit), Some(value), _) => Layout::Details { metric, unit, value },
        (_, _, _, Some(value)) => Layout::Raw { value },
        _ => {
            return Err(bad(
                "\"Metric Name\"/\"Metric Unit\"/\"Metric Value\" columns or a gpu__time_duration.sum column",
                header.join(","),
            ))
        }
    };
    let mut raw_unit = 1e-6; // nanoseconds unless a units row says otherwise
    let mut out = Vec::new();
    for l in lines {
        if !l.starts_with('"') {
            continue; // ncu or program output between rows
        }
        let f = csv_fields(l);
        let get = |i: usize| f.get(i).map(String::as_str).unwrap_or("");
        let Ok(id) = get(id_col).trim().parse::<u64>() else {
            if let Layout::Raw { value } = layout {
                if let Some(u) = unit_ms(get(value)) {
                    raw_unit = u; // the units row of --page raw
                }
            }
            continue;
        };
        let ms = match layout {
            Layout::Details {
                metric,
                unit,
                value,
            } => {
                if get(metric) != METRIC {
                    continue;
                }
                let u = unit_ms(get(unit)).ok_or_else(|| bad("a time unit", l))?;
                number(get(value)).ok_or_else(|| bad("a number", l))? * u
            }
            Layout::Raw { value } => {
                number(get(value)).ok_or_else(|| bad("a number", l))? * raw_unit
            }
        };
        out.push(KernelTime {
            id,
            name: get(name_col).to_string(),
            ms,
        });
    }
    out.sort_by_key(|k| k.id);
    Ok(out)
}

/// The case names of a `--profile-once` manifest: one per non-empty line.
pub fn parse_manifest(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Whether ncu's name of a kernel is the [`MARKER`] (with or without a parameter list).
pub fn is_marker(name: &str) -> bool {
    name == MARKER || name.starts_with(&format!("{MARKER}("))
}

/// Group `kernels` (sorted by ID) into calls: each [`MARKER`] starts the next case of
/// `manifest`.
///
/// Errors: [`AttnError::InvalidArgument`] when kernels come before the first marker or the
/// number of markers is not the number of cases (the profile and the manifest are not of
/// the same run).
pub fn split_calls(kernels: &[KernelTime], manifest: &[String]) -> Result<Vec<CallKernels>> {
    let mut calls: Vec<CallKernels> = Vec::new();
    let mut stray = 0usize;
    for k in kernels {
        if is_marker(&k.name) {
            let case = manifest.get(calls.len()).cloned().unwrap_or_default();
            calls.push(CallKernels {
                case,
                kernels: Vec::new(),
            });
        } else if let Some(c) = calls.last_mut() {
            c.kernels.push(k.clone());
        } else {
            stray += 1;
        }
    }
    if stray > 0 {
        return Err(bad(
            "every profiled kernel after a marker",
            format!("{stray} kernels before the first {MARKER}"),
        ));
    }
    if calls.len() != manifest.len() {
        return Err(bad(
            "one marker per manifest case",
            format!("{} markers, {} cases", calls.len(), manifest.len()),
        ));
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DETAILS: &str = r#"==PROF== Connected to process 4242 (/x/attn)
prefill 2048 ...
==PROF== Disconnected from process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","attn","127.0.0.1","attn_bench_marker","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","1,024"
"1","4242","attn","127.0.0.1","nvjet_sm90_tst_128x256","1","7","(384, 1, 1)","(16, 48, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","101.50"
"2","4242","attn","127.0.0.1","qkv_prep_bf16","1","7","(128, 1, 1)","(2048, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","12,500"
"3","4242","attn","127.0.0.1","attn_bench_marker","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","900"
"4","4242","attn","127.0.0.1","decode_splitkv_split","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","msecond","0.2"
"#;

    #[test]
    fn details_page_splits_into_calls() {
        let k = parse_ncu_csv(DETAILS).unwrap();
        assert_eq!(k.len(), 5);
        assert!((k[1].ms - 0.1015).abs() < 1e-12);
        assert!((k[2].ms - 0.0125).abs() < 1e-12);
        let manifest = parse_manifest("prefill 2048\n\ndecode b1\n");
        let calls = split_calls(&k, &manifest).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].case, "prefill 2048");
        assert_eq!(calls[0].kernels.len(), 2);
        assert!((calls[0].sum_ms() - 0.114).abs() < 1e-12);
        assert_eq!(calls[1].kernels[0].name, "decode_splitkv_split");
        assert!((calls[1].sum_ms() - 0.2).abs() < 1e-12);
        // A manifest of another run is refused.
        assert!(matches!(
            split_calls(&k, &manifest[..1]),
            Err(AttnError::InvalidArgument { .. })
        ));
        // Kernels before the first marker are refused.
        assert!(split_calls(&k[1..], &manifest[1..]).is_err());
    }

    #[test]
    fn raw_page_with_units_row() {
        let text = "\"ID\",\"Kernel Name\",\"gpu__time_duration.sum\"\n\"\",\"\",\"usecond\"\n\"1\",\"b\",\"2.5\"\n\"0\",\"attn_bench_marker\",\"1\"\n";
        let k = parse_ncu_csv(text).unwrap();
        assert_eq!(k[0].name, "attn_bench_marker");
        assert!((k[1].ms - 0.0025).abs() < 1e-12);
        let calls = split_calls(&k, &["x".to_string()]).unwrap();
        assert!((calls[0].sum_ms() - 0.0025).abs() < 1e-12);
    }

    #[test]
    fn no_header_is_an_error() {
        assert!(matches!(
            parse_ncu_csv("==PROF== nothing profiled\n"),
            Err(AttnError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn overhead_from_durations() {
        assert!((overhead(2.0, 1.9) - 0.05).abs() < 1e-12);
        assert_eq!(overhead(1.0, 1.0), 0.0);
        assert!(overhead(1.0, 1.1) < 0.0);
        assert!(overhead(0.0, 1.0).is_nan());
        assert!(overhead(f64::NAN, 1.0).is_nan());
        assert!(overhead(1.0, f64::NAN).is_nan());
    }

    #[test]
    fn csv_fields_quotes() {
        assert_eq!(
            csv_fields(r#""a,b","c ""d""",,e"#),
            vec!["a,b", "c \"d\"", "", "e"]
        );
        assert!(is_marker("attn_bench_marker"));
        assert!(is_marker("attn_bench_marker(int)"));
        assert!(!is_marker("attn_bench_marker2"));
    }
}

//! `attn bench prefill`'s results: the timings, the SDPA script's output parsed, the ratio
//! table and the JSON report.

use std::fmt::Write as _;

use attention_codegen::render::PrefillTile;

use super::chart::{Panel, Series};
use super::common::{json_field, json_num, json_str};

/// One timed shape of one implementation.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// `prefill_sm80:<tile>`, `sdpa_flash` or `sdpa_cudnn`.
    pub implementation: String,
    /// Head dim.
    pub head_dim: usize,
    /// Causal (top-left) or no mask.
    pub causal: bool,
    /// Sequence length.
    pub seqlen: usize,
    /// Batch.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Median milliseconds per launch (NaN when the implementation failed).
    pub ms: f64,
    /// TFLOP/s at the median.
    pub tflops: f64,
}

/// Compile-time report of one kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct CompileTiming {
    /// Kernel key.
    pub key: String,
    /// Cold NVRTC compile, ms.
    pub cold_ms: f64,
    /// Warm start from the disk cache (entry read + module load), ms.
    pub warm_ms: f64,
    /// NVRTC compiles during the warm start (should be 0).
    pub warm_compiles: u64,
    /// Where the cold lookup found the kernel (`Compiled` expected).
    pub cold_origin: String,
    /// Where the warm lookup found it (`Disk` expected).
    pub warm_origin: String,
}

/// Parse the script's output: one flat JSON object per line with `backend`, `head_dim`,
/// `causal`, `seqlen`, `batch`, `heads`, `ms`, `tflops`. Lines that do not parse are skipped.
pub fn parse_sdpa(text: &str) -> Vec<Timing> {
    text.lines()
        .filter_map(|l| {
            let num = |n: &str| json_field(l, n)?.parse::<f64>().ok();
            let int = |n: &str| json_field(l, n)?.parse::<usize>().ok();
            Some(Timing {
                implementation: format!("sdpa_{}", json_field(l, "backend")?),
                head_dim: int("head_dim")?,
                causal: json_field(l, "causal")? == "true",
                seqlen: int("seqlen")?,
                batch: int("batch")?,
                heads: int("heads")?,
                ms: num("ms").unwrap_or(f64::NAN),
                tflops: num("tflops").unwrap_or(f64::NAN),
            })
        })
        .collect()
}

fn find<'a>(t: &'a [Timing], imp: &str, hd: usize, causal: bool, s: usize) -> Option<&'a Timing> {
    t.iter().find(|x| {
        x.implementation == imp && x.head_dim == hd && x.causal == causal && x.seqlen == s
    })
}

/// The ratio table: per shape, TFLOP/s of the default tile, the best tile, SDPA flash and
/// cuDNN, and ours (best) over each.
pub fn table(t: &[Timing], compile: &[CompileTiming], device: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "device: {device}");
    let _ = writeln!(s, "kernel compile: cold NVRTC ms (origin) / warm start: disk cache + module load ms (origin) / NVRTC calls when warm");
    for c in compile {
        let _ = writeln!(
            s,
            "  {:<48} {:>8.1} ({}) {:>8.2} ({}) {}",
            c.key, c.cold_ms, c.cold_origin, c.warm_ms, c.warm_origin, c.warm_compiles
        );
    }
    let _ = writeln!(
        s,
        "| hd | causal | seqlen | batch | fast default (sm80) | fast best (kernel:tile) | sdpa flash | sdpa cudnn | best/flash | best/cudnn |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    let mut shapes: Vec<(usize, bool, usize, usize)> = t
        .iter()
        .filter(|x| x.implementation.starts_with("prefill_sm"))
        .map(|x| (x.head_dim, x.causal, x.seqlen, x.batch))
        .collect();
    shapes.dedup();
    shapes.sort_by_key(|x| (x.0, !x.1, x.2));
    shapes.dedup();
    for (hd, causal, sl, batch) in shapes {
        let def = format!("prefill_sm80:{}", PrefillTile::for_head_dim(hd).key());
        let d = find(t, &def, hd, causal, sl)
            .map(|x| x.tflops)
            .unwrap_or(f64::NAN);
        let best = t
            .iter()
            .filter(|x| {
                x.implementation.starts_with("prefill_sm")
                    && x.head_dim == hd
                    && x.causal == causal
                    && x.seqlen == sl
            })
            .max_by(|a, b| {
                a.tflops
                    .partial_cmp(&b.tflops)
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
        let (bt, bname) = best
            .map(|x| {
                (
                    x.tflops,
                    x.implementation.trim_start_matches("prefill_").to_string(),
                )
            })
            .unwrap_or((f64::NAN, String::new()));
        let fl = find(t, "sdpa_flash", hd, causal, sl)
            .map(|x| x.tflops)
            .unwrap_or(f64::NAN);
        let cu = find(t, "sdpa_cudnn", hd, causal, sl)
            .map(|x| x.tflops)
            .unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "| {hd} | {causal} | {sl} | {batch} | {d:.1} | {bt:.1} ({bname}) | {fl:.1} | {cu:.1} | {:.2} | {:.2} |",
            bt / fl,
            bt / cu
        );
    }
    s
}

/// The JSON report: `{device, timings: [...], compile: [...], sdpa_note}`.
pub fn to_json(t: &[Timing], compile: &[CompileTiming], device: &str, note: &str) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"device\": {},", json_str(device));
    s.push_str("  \"timings\": [\n");
    for (i, x) in t.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"implementation\": {}, \"head_dim\": {}, \"causal\": {}, \"seqlen\": {}, \"batch\": {}, \"heads\": {}, \"ms\": {}, \"tflops\": {}}}",
            json_str(&x.implementation),
            x.head_dim,
            x.causal,
            x.seqlen,
            x.batch,
            x.heads,
            json_num(x.ms),
            json_num(x.tflops)
        );
        s.push_str(if i + 1 < t.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"compile\": [\n");
    for (i, c) in compile.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"key\": {}, \"cold_ms\": {}, \"cold_origin\": {}, \"warm_ms\": {}, \"warm_origin\": {}, \"warm_nvrtc_calls\": {}}}",
            json_str(&c.key),
            json_num(c.cold_ms),
            json_str(&c.cold_origin),
            json_num(c.warm_ms),
            json_str(&c.warm_origin),
            c.warm_compiles
        );
        s.push_str(if i + 1 < compile.len() { ",\n" } else { "\n" });
    }
    let _ = writeln!(s, "  ],\n  \"sdpa_note\": {}\n}}", json_str(note));
    s
}

/// The chart's panels: one per (head dim, causal), TFLOP/s over seqlen for our default
/// tile, our best tile where extra tiles were timed, SDPA flash and SDPA cuDNN.
pub fn panels(t: &[Timing]) -> Vec<Panel> {
    let mut shapes: Vec<(usize, bool)> = t.iter().map(|x| (x.head_dim, x.causal)).collect();
    shapes.sort_by_key(|x| (x.0, !x.1));
    shapes.dedup();
    shapes
        .into_iter()
        .map(|(hd, causal)| {
            let of = |pred: &dyn Fn(&Timing) -> bool| -> Vec<&Timing> {
                t.iter()
                    .filter(|x| x.head_dim == hd && x.causal == causal && pred(x))
                    .collect()
            };
            let def = format!("prefill_sm80:{}", PrefillTile::for_head_dim(hd).key());
            let mut series = vec![Series::new(
                format!("ours ({})", def.trim_start_matches("prefill_sm80:")),
                of(&|x| x.implementation == def)
                    .iter()
                    .map(|x| (x.seqlen as f64, x.tflops))
                    .collect(),
            )];
            let ours = of(&|x| x.implementation.starts_with("prefill_sm"));
            if ours.iter().any(|x| x.implementation != def) {
                let mut lens: Vec<usize> = ours.iter().map(|x| x.seqlen).collect();
                lens.sort();
                lens.dedup();
                let best = lens
                    .iter()
                    .map(|&s| {
                        let b = ours
                            .iter()
                            .filter(|x| x.seqlen == s)
                            .map(|x| x.tflops)
                            .fold(f64::NAN, f64::max);
                        (s as f64, b)
                    })
                    .collect();
                series.push(Series::new("ours (best kernel and tile)", best));
            }
            for (imp, name) in [("sdpa_flash", "SDPA flash"), ("sdpa_cudnn", "SDPA cuDNN")] {
                let pts: Vec<(f64, f64)> = of(&|x| x.implementation == imp)
                    .iter()
                    .map(|x| (x.seqlen as f64, x.tflops))
                    .collect();
                if !pts.is_empty() {
                    series.push(Series::new(name, pts));
                }
            }
            Panel {
                title: format!("hd {hd}, {}", if causal { "causal" } else { "no mask" }),
                x_label: "seqlen (batch = tokens / seqlen)".into(),
                y_label: "TFLOP/s".into(),
                series,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdpa_lines_parse() {
        let text = "noise\n{\"backend\": \"flash\", \"head_dim\": 128, \"causal\": true, \"seqlen\": 2048, \"batch\": 8, \"heads\": 16, \"ms\": 1.5, \"tflops\": 300.25}\n";
        let t = parse_sdpa(text);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].implementation, "sdpa_flash");
        assert_eq!((t[0].head_dim, t[0].causal, t[0].seqlen), (128, true, 2048));
        assert_eq!(t[0].tflops, 300.25);
        let j = to_json(&t, &[], "dev \"x\"", "");
        assert!(j.contains("\"implementation\": \"sdpa_flash\""));
        assert!(j.contains("dev \\\"x\\\""));
    }

    #[test]
    fn chart_has_ours_and_both_baselines() {
        let mut t = parse_sdpa("{\"backend\": \"flash\", \"head_dim\": 64, \"causal\": true, \"seqlen\": 2048, \"batch\": 8, \"heads\": 32, \"ms\": 1.5, \"tflops\": 250.0}\n{\"backend\": \"cudnn\", \"head_dim\": 64, \"causal\": true, \"seqlen\": 2048, \"batch\": 8, \"heads\": 32, \"ms\": null, \"tflops\": null}\n");
        let def = format!("prefill_sm80:{}", PrefillTile::for_head_dim(64).key());
        for (imp, tf) in [(def.as_str(), 240.0), ("prefill_sm80:m64n64w4s2", 260.0)] {
            t.push(Timing {
                implementation: imp.into(),
                head_dim: 64,
                causal: true,
                seqlen: 2048,
                batch: 8,
                heads: 32,
                ms: 1.0,
                tflops: tf,
            });
        }
        let p = panels(&t);
        assert_eq!(p.len(), 1);
        let names: Vec<&str> = p[0].series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(names.contains(&"ours (best tile)") && names.contains(&"SDPA cuDNN"));
        assert_eq!(p[0].series[1].points, vec![(2048.0, 260.0)]);
        let svg = crate::bench::chart::render_svg("prefill", &p, 2).unwrap();
        crate::bench::chart::tests::assert_well_formed(&svg);
        assert!(svg.contains("SDPA flash") && svg.contains("SDPA cuDNN (no data)"));
    }
}

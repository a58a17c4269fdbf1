//! `attn bench backward`'s results: the ratio table (ours over SDPA flash and cuDNN
//! backward), the JSON report and the chart's panels. The timings are
//! [`Timing`]s as the prefill bench's (TFLOP/s counted at 2.5 × the forward's FLOPs).

use std::fmt::Write as _;

use super::backward::{OURS, OURS_DET};
use super::chart::{Panel, Series};
use super::common::{json_num, json_str};
use super::prefill_report::Timing;

fn find<'a>(t: &'a [Timing], imp: &str, hd: usize, causal: bool, s: usize) -> Option<&'a Timing> {
    t.iter().find(|x| {
        x.implementation == imp && x.head_dim == hd && x.causal == causal && x.seqlen == s
    })
}

/// `a / b` with two decimals, `n/a` when either is missing.
fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "n/a".into()
    }
}

/// The ratio table: per shape, ms and TFLOP/s of ours, SDPA flash and SDPA cuDNN backward,
/// and ours over each (TFLOP/s ratio; > 1 = ours faster). `n/a` where a side has no number.
pub fn table(t: &[Timing], device: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "device: {device}");
    let _ = writeln!(
        s,
        "backward (preprocess + dK/dV + dQ), TFLOP/s at 2.5 x forward FLOPs; ms in parentheses"
    );
    let _ = writeln!(
        s,
        "| hd | causal | seqlen | batch | heads | ours | ours det. | sdpa flash | sdpa cudnn | ours/flash | ours/cudnn | det./flash |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut shapes: Vec<(usize, bool, usize, usize, usize)> = t
        .iter()
        .filter(|x| x.implementation == OURS)
        .map(|x| (x.head_dim, x.causal, x.seqlen, x.batch, x.heads))
        .collect();
    shapes.sort_by_key(|x| (x.0, !x.1, x.2));
    shapes.dedup();
    let cell = |x: Option<&Timing>| -> (f64, String) {
        match x {
            Some(x) if x.tflops.is_finite() => (x.tflops, format!("{:.1} ({:.3})", x.tflops, x.ms)),
            _ => (f64::NAN, "n/a".into()),
        }
    };
    for (hd, causal, sl, batch, heads) in shapes {
        let (o, oc) = cell(find(t, OURS, hd, causal, sl));
        let (d, dc) = cell(find(t, OURS_DET, hd, causal, sl));
        let (f, fc) = cell(find(t, "sdpa_flash", hd, causal, sl));
        let (c, cc) = cell(find(t, "sdpa_cudnn", hd, causal, sl));
        let _ = writeln!(
            s,
            "| {hd} | {causal} | {sl} | {batch} | {heads} | {oc} | {dc} | {fc} | {cc} | {} | {} | {} |",
            ratio(o, f),
            ratio(o, c),
            ratio(d, f)
        );
    }
    s
}

/// The JSON report: `{device, flops: "2.5x forward", timings: [...], note}`.
pub fn to_json(t: &[Timing], device: &str, note: &str) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"device\": {},", json_str(device));
    let _ = writeln!(
        s,
        "  \"flops\": {},",
        json_str("2.5 x forward (4 b h s^2 d, halved for causal)")
    );
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
    let _ = writeln!(s, "  ],\n  \"note\": {}\n}}", json_str(note));
    s
}

/// The chart's panels: one per (head dim, causal), TFLOP/s over seqlen for ours, SDPA flash
/// and SDPA cuDNN backward.
pub fn panels(t: &[Timing]) -> Vec<Panel> {
    let mut shapes: Vec<(usize, bool)> = t.iter().map(|x| (x.head_dim, x.causal)).collect();
    shapes.sort_by_key(|x| (x.0, !x.1));
    shapes.dedup();
    shapes
        .into_iter()
        .map(|(hd, causal)| {
            let mut series = Vec::new();
            for (imp, name) in [
                (OURS, "ours"),
                (OURS_DET, "ours (deterministic)"),
                ("sdpa_flash", "SDPA flash"),
                ("sdpa_cudnn", "SDPA cuDNN"),
            ] {
                let mut pts: Vec<(f64, f64)> = t
                    .iter()
                    .filter(|x| x.implementation == imp && x.head_dim == hd && x.causal == causal)
                    .map(|x| (x.seqlen as f64, x.tflops))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                if imp == OURS || !pts.is_empty() {
                    series.push(Series::new(name, pts));
                }
            }
            Panel {
                title: format!(
                    "backward hd {hd}, {}",
                    if causal { "causal" } else { "no mask" }
                ),
                x_label: "seqlen (batch = tokens / seqlen)".into(),
                y_label: "TFLOP/s (2.5 x fwd FLOPs)".into(),
                series,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::prefill_report::parse_sdpa;

    fn ours(hd: usize, causal: bool, s: usize, tflops: f64) -> Timing {
        Timing {
            implementation: OURS.into(),
            head_dim: hd,
            causal,
            seqlen: s,
            batch: 16384 / s,
            heads: 2048 / hd,
            ms: 2.0,
            tflops,
        }
    }

    #[test]
    fn table_has_ratios_and_na_for_missing() {
        let mut t = parse_sdpa(concat!(
            "{\"backend\": \"flash\", \"head_dim\": 128, \"causal\": true, \"seqlen\": 2048, \"batch\": 8, \"heads\": 16, \"ms\": 2.5, \"tflops\": 200.0}\n",
            "{\"backend\": \"cudnn\", \"head_dim\": 128, \"causal\": true, \"seqlen\": 2048, \"batch\": 8, \"heads\": 16, \"ms\": null, \"tflops\": null}\n",
        ));
        t.push(ours(128, true, 2048, 300.0));
        t.push(ours(128, false, 4096, 250.0));
        let mut det = ours(128, true, 2048, 100.0);
        det.implementation = OURS_DET.into();
        t.push(det);
        let s = table(&t, "H200");
        let lines: Vec<&str> = s.lines().filter(|l| l.starts_with("| 128")).collect();
        assert_eq!(lines.len(), 2, "{s}");
        assert!(
            lines[0].starts_with(
                "| 128 | true | 2048 | 8 | 16 | 300.0 (2.000) | 100.0 (2.000) | 200.0 (2.500) | n/a | 1.50 | n/a | 0.50 |"
            ),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("| n/a | n/a | n/a | n/a | n/a | n/a |"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn json_and_chart() {
        let mut t = parse_sdpa("{\"backend\": \"flash\", \"head_dim\": 64, \"causal\": false, \"seqlen\": 2048, \"batch\": 8, \"heads\": 32, \"ms\": 1.0, \"tflops\": 250.0}\n");
        t.push(ours(64, false, 4096, 260.0));
        t.push(ours(64, false, 2048, 240.0));
        let j = to_json(&t, "dev", "a \"note\"");
        assert!(j.contains("\"implementation\": \"attn_backward\""));
        assert!(j.contains("\"implementation\": \"sdpa_flash\""));
        assert!(j.contains("a \\\"note\\\""));
        let p = panels(&t);
        assert_eq!(p.len(), 1);
        let names: Vec<&str> = p[0].series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["ours", "SDPA flash"]);
        assert_eq!(
            p[0].series[0].points,
            vec![(2048.0, 240.0), (4096.0, 260.0)]
        );
        let svg = crate::bench::chart::render_svg("backward", &p, 2).unwrap();
        crate::bench::chart::tests::assert_well_formed(&svg);
    }
}

//! `attn bench decode`'s results: the timings and copy ceilings, the SDPA script's output
//! parsed, the table and the JSON report.

use std::fmt::Write as _;

use super::chart::{Panel, Series};
use super::common::{json_field, json_num, json_str};

/// One timed decode shape of one implementation (`decode_splitkv`, `decode_splitkv_paged_bs<N>` or
/// `sdpa_flash`).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeTiming {
    /// `decode_splitkv` or `sdpa_flash`.
    pub implementation: String,
    /// Sequences.
    pub batch: usize,
    /// Cached tokens per sequence.
    pub ctx: usize,
    /// Bytes counted for one step ([`decode_bytes`](super::decode::decode_bytes)).
    pub bytes: f64,
    /// Median microseconds per step (NaN when the implementation failed).
    pub us: f64,
    /// [`decode_bytes`](super::decode::decode_bytes) over the median time, GB/s (1e9 B/s).
    pub gbps: f64,
    /// KV splits (`decode_splitkv`; 0 otherwise).
    pub splits: usize,
    /// `native` / `repeat_interleave` (SDPA's GQA path), empty for ours.
    pub gqa: String,
    /// Chunks where the host had not queued every step before the blocker finished (their
    /// numbers then include host gaps); 0 expected.
    pub host_behind: usize,
}

/// A device-to-device copy measurement (bytes read + written).
#[derive(Debug, Clone, PartialEq)]
pub struct CopyCeiling {
    /// Who measured it (`cuMemcpyDtoD` here, `torch copy_` from the script).
    pub source: String,
    /// Bytes read + written per copy.
    pub bytes: usize,
    /// Median ms per copy.
    pub ms: f64,
    /// GB/s.
    pub gbps: f64,
}

/// [`CopyCeiling::source`] of the read-only ceiling (one kernel reading a 1 GiB buffer; its
/// `bytes` count the bytes read, not read + written).
pub const READ_ONLY: &str = "read-only kernel";

/// Parse the script's decode output: one flat JSON object per line; `"backend": "copy"`
/// lines give a [`CopyCeiling`] (`bytes`, `ms`, `gbps`), `"backend": "flash"` lines a
/// [`DecodeTiming`] (`batch`, `ctx`, `us`, `gbps`, `gqa`, `host_behind`; null numbers become
/// NaN / 0). Lines that do not parse are skipped.
pub fn parse_sdpa_decode(text: &str) -> (Vec<DecodeTiming>, Vec<CopyCeiling>) {
    let (mut t, mut c) = (Vec::new(), Vec::new());
    for l in text.lines() {
        let num = |n: &str| json_field(l, n).and_then(|x| x.parse::<f64>().ok());
        let int = |n: &str| json_field(l, n).and_then(|x| x.parse::<usize>().ok());
        match json_field(l, "backend").as_deref() {
            Some("copy") => {
                if let (Some(bytes), Some(ms)) = (int("bytes"), num("ms")) {
                    c.push(CopyCeiling {
                        source: "torch copy_".into(),
                        bytes,
                        ms,
                        gbps: num("gbps").unwrap_or(f64::NAN),
                    });
                }
            }
            Some(be) => {
                if let (Some(batch), Some(ctx)) = (int("batch"), int("ctx")) {
                    t.push(DecodeTiming {
                        implementation: format!("sdpa_{be}"),
                        batch,
                        ctx,
                        bytes: num("bytes").unwrap_or(f64::NAN),
                        us: num("us").unwrap_or(f64::NAN),
                        gbps: num("gbps").unwrap_or(f64::NAN),
                        splits: 0,
                        gqa: json_field(l, "gqa").unwrap_or_default(),
                        host_behind: int("host_behind").unwrap_or(0),
                    });
                }
            }
            None => {}
        }
    }
    (t, c)
}

/// The decode table: per (ctx, batch), ours and SDPA flash in µs and GB/s, ours / SDPA, and
/// each as a share of the measured copy bandwidth (the first ceiling that is not
/// [`READ_ONLY`]) and of the read-only bandwidth ([`READ_ONLY`]; NaN when not measured).
pub fn decode_table(t: &[DecodeTiming], ceilings: &[CopyCeiling], device: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "device: {device}");
    for c in ceilings {
        let what = if c.source == READ_ONLY {
            "read ceiling"
        } else {
            "copy ceiling"
        };
        let moved = if c.source == READ_ONLY {
            "read"
        } else {
            "read+written"
        };
        let _ = writeln!(
            s,
            "{what} ({}, {} MiB {moved}): {:.0} GB/s ({:.3} ms)",
            c.source,
            c.bytes >> 20,
            c.gbps,
            c.ms
        );
    }
    let ceil = ceilings
        .iter()
        .find(|c| c.source != READ_ONLY)
        .map_or(f64::NAN, |c| c.gbps);
    let read = ceilings
        .iter()
        .find(|c| c.source == READ_ONLY)
        .map_or(f64::NAN, |c| c.gbps);
    let _ = writeln!(
        s,
        "| ctx | batch | MB moved | decode_splitkv µs | decode_splitkv GB/s | splits | sdpa flash µs | sdpa flash GB/s | sdpa gqa | ours/sdpa | ours % copy | sdpa % copy | ours % read | sdpa % read |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut shapes: Vec<(usize, usize)> = t.iter().map(|x| (x.ctx, x.batch)).collect();
    shapes.sort();
    shapes.dedup();
    for (c, b) in shapes {
        let get = |imp: &str| {
            t.iter()
                .find(|x| x.implementation == imp && x.ctx == c && x.batch == b)
        };
        let ours = get("decode_splitkv");
        let sd = get("sdpa_flash");
        let (ou, og, sp) = ours.map_or((f64::NAN, f64::NAN, 0), |x| (x.us, x.gbps, x.splits));
        let (su, sg) = sd.map_or((f64::NAN, f64::NAN), |x| (x.us, x.gbps));
        let gqa = sd.map_or("-", |x| x.gqa.as_str());
        let behind: usize = ours.map_or(0, |x| x.host_behind) + sd.map_or(0, |x| x.host_behind);
        let mb = ours.or(sd).map_or(f64::NAN, |x| x.bytes / 1e6);
        // A side that was skipped or failed prints "-", not NaN.
        let n = |v: f64, prec: usize| {
            if v.is_finite() {
                format!("{v:.prec$}")
            } else {
                "-".to_string()
            }
        };
        let pct = |v: f64| {
            if v.is_finite() {
                format!("{v:.0}%")
            } else {
                "-".to_string()
            }
        };
        let sp = if ours.is_some() {
            sp.to_string()
        } else {
            "-".into()
        };
        let _ = writeln!(
            s,
            "| {c} | {b} | {} | {} | {} | {sp} | {} | {} | {gqa} | {} | {} | {} | {} | {} |{}",
            n(mb, 1),
            n(ou, 1),
            n(og, 0),
            n(su, 1),
            n(sg, 0),
            n(og / sg, 2),
            pct(100.0 * og / ceil),
            pct(100.0 * sg / ceil),
            pct(100.0 * og / read),
            pct(100.0 * sg / read),
            if behind > 0 {
                format!(" (host behind in {behind} chunks)")
            } else {
                String::new()
            }
        );
    }
    let sweep: Vec<&DecodeTiming> = t
        .iter()
        .filter(|x| x.implementation.starts_with("decode_splitkv_s"))
        .collect();
    if !sweep.is_empty() {
        let _ = writeln!(
            s,
            "\nsplit sweep (static step at fixed split counts) vs the automatic choice:"
        );
        let _ = writeln!(
            s,
            "| ctx | batch | splits | µs | GB/s | auto splits | auto µs | auto / swept time |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for p in sweep {
            let auto = t.iter().find(|x| {
                x.implementation == "decode_splitkv" && x.ctx == p.ctx && x.batch == p.batch
            });
            let (asp, aus) = auto.map_or((0, f64::NAN), |x| (x.splits, x.us));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.0} | {asp} | {aus:.1} | {:.2} |",
                p.ctx,
                p.batch,
                p.splits,
                p.us,
                p.gbps,
                aus / p.us
            );
        }
    }
    let multi: Vec<&DecodeTiming> = t
        .iter()
        .filter(|x| x.implementation.starts_with("decode_splitkv_t"))
        .collect();
    if !multi.is_empty() {
        let _ = writeln!(
            s,
            "\nmulti-token decode (T new tokens per sequence, one step; the group's heads x T \
             are the rows of the tensor-core tile) vs the one-token step:"
        );
        let _ = writeln!(
            s,
            "| ctx | batch | T | µs | GB/s | % read | splits | 1-token µs | time / 1-token time |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for p in multi {
            let one = t
                .iter()
                .find(|x| {
                    x.implementation == "decode_splitkv" && x.ctx == p.ctx && x.batch == p.batch
                })
                .map_or(f64::NAN, |x| x.us);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.0} | {:.0}% | {} | {:.1} | {:.2} |",
                p.ctx,
                p.batch,
                p.implementation.trim_start_matches("decode_splitkv_t"),
                p.us,
                p.gbps,
                100.0 * p.gbps / read,
                p.splits,
                one,
                p.us / one
            );
        }
    }
    let paged: Vec<&DecodeTiming> = t
        .iter()
        .filter(|x| x.implementation.starts_with("decode_splitkv_paged"))
        .collect();
    if !paged.is_empty() {
        let _ = writeln!(
            s,
            "\npaged decode rows (decode_splitkv paged mode, shuffled block table) vs the static step:"
        );
        let _ = writeln!(
            s,
            "| ctx | batch | kernel | µs | GB/s | static GB/s | paged / static |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for p in paged {
            let st = t
                .iter()
                .find(|x| {
                    x.implementation == "decode_splitkv" && x.ctx == p.ctx && x.batch == p.batch
                })
                .map_or(f64::NAN, |x| x.gbps);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.0} | {:.0} | {:.2} |",
                p.ctx,
                p.batch,
                p.implementation,
                p.us,
                p.gbps,
                st,
                p.gbps / st
            );
        }
    }
    s
}

/// The decode JSON report: `{device, copy: [...], timings: [...], sdpa_note}`.
pub fn decode_json(
    t: &[DecodeTiming],
    ceilings: &[CopyCeiling],
    device: &str,
    note: &str,
) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"device\": {},", json_str(device));
    s.push_str("  \"copy\": [\n");
    for (i, c) in ceilings.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"source\": {}, \"bytes\": {}, \"ms\": {}, \"gbps\": {}}}",
            json_str(&c.source),
            c.bytes,
            json_num(c.ms),
            json_num(c.gbps)
        );
        s.push_str(if i + 1 < ceilings.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"timings\": [\n");
    for (i, x) in t.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"implementation\": {}, \"ctx\": {}, \"batch\": {}, \"bytes\": {}, \"us\": {}, \"gbps\": {}, \"splits\": {}, \"gqa\": {}, \"host_behind\": {}}}",
            json_str(&x.implementation),
            x.ctx,
            x.batch,
            json_num(x.bytes),
            json_num(x.us),
            json_num(x.gbps),
            x.splits,
            json_str(&x.gqa),
            x.host_behind
        );
        s.push_str(if i + 1 < t.len() { ",\n" } else { "\n" });
    }
    let _ = writeln!(s, "  ],\n  \"sdpa_note\": {}\n}}", json_str(note));
    s
}

/// The chart's panels: one per context, GB/s over batch for ours, each SDPA backend, and
/// the copy ceilings as flat lines.
pub fn panels(t: &[DecodeTiming], ceilings: &[CopyCeiling]) -> Vec<Panel> {
    let mut ctxs: Vec<usize> = t.iter().map(|x| x.ctx).collect();
    ctxs.sort();
    ctxs.dedup();
    let mut imps: Vec<&str> = t
        .iter()
        .map(|x| x.implementation.as_str())
        .filter(|i| !i.starts_with("decode_splitkv_s"))
        .collect();
    imps.sort_by_key(|i| (*i != "decode_splitkv", *i));
    imps.dedup();
    ctxs.into_iter()
        .map(|c| {
            let mut batches: Vec<usize> =
                t.iter().filter(|x| x.ctx == c).map(|x| x.batch).collect();
            batches.sort();
            batches.dedup();
            let mut series: Vec<Series> = imps
                .iter()
                .map(|imp| {
                    let name = match *imp {
                        "decode_splitkv" => "ours (decode_splitkv)".to_string(),
                        other => other.replace("sdpa_", "SDPA "),
                    };
                    Series::new(
                        name,
                        t.iter()
                            .filter(|x| x.ctx == c && x.implementation == *imp)
                            .map(|x| (x.batch as f64, x.gbps))
                            .collect(),
                    )
                })
                .collect();
            for cc in ceilings {
                series.push(Series::new(
                    if cc.source == READ_ONLY {
                        "read ceiling (read-only kernel)".to_string()
                    } else {
                        format!("copy ceiling ({})", cc.source)
                    },
                    batches.iter().map(|&b| (b as f64, cc.gbps)).collect(),
                ));
            }
            Panel {
                title: format!("decode step, ctx {}", super::chart::size_label(c as f64)),
                x_label: "batch".into(),
                y_label: "GB/s (K/V read once)".into(),
                series,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::decode::decode_bytes;

    #[test]
    fn sdpa_decode_lines_parse() {
        let text = "warn\n{\"backend\": \"copy\", \"bytes\": 2147483648, \"ms\": 0.7, \"gbps\": 3067.8, \"host_behind\": 0}\n{\"backend\": \"flash\", \"batch\": 4, \"ctx\": 8192, \"heads\": 32, \"groups\": 8, \"head_dim\": 128, \"gqa\": \"native\", \"us\": 52.5, \"gbps\": 2557.1, \"host_behind\": 0, \"bytes\": 134299648}\n{\"backend\": \"flash\", \"batch\": 16, \"ctx\": 32768, \"heads\": 32, \"groups\": 8, \"head_dim\": 128, \"gqa\": \"native\", \"us\": null, \"gbps\": null, \"host_behind\": null, \"bytes\": 1}\n";
        let (t, c) = parse_sdpa_decode(text);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].bytes, 2147483648);
        assert_eq!(c[0].gbps, 3067.8);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].implementation, "sdpa_flash");
        assert_eq!((t[0].batch, t[0].ctx, t[0].us), (4, 8192, 52.5));
        assert_eq!(t[0].gqa, "native");
        assert!(t[1].us.is_nan() && t[1].gbps.is_nan());
        let ours = DecodeTiming {
            implementation: "decode_splitkv".into(),
            batch: 4,
            ctx: 8192,
            bytes: decode_bytes(4, 8192, 32, 8, 128),
            us: 45.0,
            gbps: decode_bytes(4, 8192, 32, 8, 128) / 45e-6 / 1e9,
            splits: 9,
            gqa: String::new(),
            host_behind: 0,
        };
        let mut all = t.clone();
        all.push(ours);
        let table = decode_table(&all, &c, "dev");
        let row = table
            .lines()
            .find(|l| l.starts_with("| 8192 | 4 |"))
            .unwrap();
        let ratio = all[2].gbps / all[0].gbps;
        assert!(row.contains(&format!("| {ratio:.2} |")), "{row}");
        // A shape that one side skipped (SDPA null here, ours absent) prints dashes, not NaN.
        let skipped = table
            .lines()
            .find(|l| l.starts_with("| 32768 | 16 |"))
            .unwrap();
        assert!(
            !skipped.contains("NaN") && skipped.contains("| - |"),
            "{skipped}"
        );
        let j = decode_json(&all, &c, "dev", "note");
        assert!(j.contains("\"implementation\": \"decode_splitkv\""));
        assert!(j.contains("\"us\": null"));
        let p = panels(&all, &c);
        assert_eq!(p.len(), 2); // ctx 8192 and 32768
        let names: Vec<&str> = p[0].series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ours (decode_splitkv)",
                "SDPA flash",
                "copy ceiling (torch copy_)"
            ]
        );
        let svg = crate::bench::chart::render_svg("decode", &p, 2).unwrap();
        crate::bench::chart::tests::assert_well_formed(&svg);
        assert!(svg.contains("ours (decode_splitkv)") && svg.contains("SDPA flash"));
    }

    #[test]
    fn read_only_ceiling_gets_its_own_columns() {
        let ours = DecodeTiming {
            implementation: "decode_splitkv".into(),
            batch: 16,
            ctx: 8192,
            bytes: 1e9,
            us: 500.0,
            gbps: 2000.0,
            splits: 5,
            gqa: String::new(),
            host_behind: 0,
        };
        let sdpa = DecodeTiming {
            implementation: "sdpa_flash".into(),
            gbps: 3000.0,
            ..ours.clone()
        };
        let ceiling = |source: &str, gbps: f64| CopyCeiling {
            source: source.into(),
            bytes: 1 << 30,
            ms: 1.0,
            gbps,
        };
        // The read-only ceiling listed first must not become the copy ceiling.
        let c = [ceiling(READ_ONLY, 4000.0), ceiling("cuMemcpyDtoD", 2500.0)];
        let table = decode_table(&[ours.clone(), sdpa], &c, "dev");
        assert!(table.contains("read ceiling (read-only kernel, 1024 MiB read): 4000 GB/s"));
        let row = table
            .lines()
            .find(|l| l.starts_with("| 8192 | 16 |"))
            .unwrap();
        // ours % copy, sdpa % copy, ours % read, sdpa % read.
        assert!(row.contains("| 80% | 120% | 50% | 75% |"), "{row}");
        let p = panels(&[], &c);
        assert!(p.is_empty());
        // A swept split count gets a row against the automatic choice, and no chart series.
        let swept = DecodeTiming {
            implementation: "decode_splitkv_s2".into(),
            splits: 2,
            us: 400.0,
            ..ours.clone()
        };
        let all = [ours.clone(), swept];
        let table = decode_table(&all, &c, "dev");
        assert!(
            table.contains("| 8192 | 16 | 2 | 400.0 | 2000 | 5 | 500.0 | 1.25 |"),
            "{table}"
        );
        assert_eq!(panels(&all, &c)[0].series.len(), 3); // ours + two ceilings
    }
}

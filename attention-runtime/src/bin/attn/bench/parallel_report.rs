//! `attn bench parallel`'s results: the scaling table (time, speedup over TP = CP = 1, scaling
//! efficiency = speedup / (TP x CP), bytes communicated per rank per call), the JSON report and
//! the chart's panels.
//!
//! Bytes are counted by [`super::parallel_count::CountingComm`] around the layer's
//! communicator during one timed call (payload and ring-estimate wire bytes, see there).
//! Context-parallel rows (`cp > 1`) come one per `cp_comm_type`.

use std::fmt::Write as _;

use super::chart::{Panel, Series};
use super::common::{json_num, json_str};
use super::parallel_count::CommCount;

/// One measured configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ParRow {
    /// `forward` or `train` (forward_train + backward).
    pub mode: String,
    /// Tokens (one sequence).
    pub tokens: usize,
    /// Tensor-parallel size.
    pub tp: usize,
    /// Context-parallel size.
    pub cp: usize,
    /// The context-parallel exchange (`p2p`, `all_gather`, `a2a`) when `cp > 1`.
    pub cp_comm_type: Option<String>,
    /// Per rank: the median ms of `reps` calls after warm-up (CUDA events on the rank's
    /// stream); empty when the configuration did not run.
    pub rank_ms: Vec<f64>,
    /// One call's collectives on rank 0 (all ranks call the same ones).
    pub comm: CommCount,
}

impl ParRow {
    /// The configuration's name: `TP = 2`, `CP = 2 p2p`, `TP = 1`.
    pub fn label(&self) -> String {
        match &self.cp_comm_type {
            Some(t) if self.cp > 1 => format!("CP = {} {t}", self.cp),
            _ => format!("TP = {}", self.tp),
        }
    }

    /// The slowest rank's median, ms (NaN when it did not run).
    pub fn ms(&self) -> f64 {
        if self.rank_ms.is_empty() {
            return f64::NAN;
        }
        self.rank_ms
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

/// The TP = 1, CP = 1 row of the same mode and length.
fn base<'a>(rows: &'a [ParRow], r: &ParRow) -> Option<&'a ParRow> {
    rows.iter()
        .find(|b| b.mode == r.mode && b.tokens == r.tokens && b.tp == 1 && b.cp == 1)
}

/// `(speedup over TP = CP = 1, scaling efficiency = speedup / (tp × cp))`, NaN when either
/// side is missing.
pub fn scaling(rows: &[ParRow], r: &ParRow) -> (f64, f64) {
    let b = base(rows, r).map(ParRow::ms).unwrap_or(f64::NAN);
    let speedup = b / r.ms();
    (speedup, speedup / (r.tp * r.cp) as f64)
}

fn num(x: f64, prec: usize) -> String {
    if x.is_finite() {
        format!("{x:.prec$}")
    } else {
        "n/a".into()
    }
}

/// Bytes as MiB with two decimals.
fn mib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 20) as f64)
}

/// The table: per mode, length and configuration (TP, CP and its exchange), the slowest rank's
/// ms (every rank's beside it), speedup over TP = CP = 1, scaling efficiency, and one call's
/// collectives per rank (count, payload MiB, estimated wire MiB).
pub fn table(rows: &[ParRow], device: &str, note: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "device: {device}");
    let _ = writeln!(
        s,
        "Llama-3-8B layer, one causal sequence, bf16; ms = slowest rank's median; efficiency = speedup / (TP x CP); bytes per rank per call"
    );
    let _ = writeln!(
        s,
        "| mode | tokens | TP | CP | CP exchange | ms | ms per rank | speedup | efficiency | collectives | payload MiB | wire MiB (ring est.) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (sp, eff) = scaling(rows, r);
        let per_rank = if r.rank_ms.is_empty() {
            "n/a".to_string()
        } else {
            r.rank_ms
                .iter()
                .map(|x| num(*x, 2))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let ran = r.ms().is_finite();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.mode,
            r.tokens,
            r.tp,
            r.cp,
            r.cp_comm_type.as_deref().unwrap_or("-"),
            num(r.ms(), 2),
            per_rank,
            num(sp, 2),
            num(eff, 2),
            if ran {
                r.comm.calls.to_string()
            } else {
                "n/a".into()
            },
            if ran {
                mib(r.comm.payload)
            } else {
                "n/a".into()
            },
            if ran { mib(r.comm.wire) } else { "n/a".into() },
        );
    }
    for line in note.lines().filter(|l| !l.is_empty()) {
        let _ = writeln!(s, "note: {line}");
    }
    s
}

/// The JSON report: `{device, rows: [...], note}`; a row's `ms` is the slowest rank's.
pub fn to_json(rows: &[ParRow], device: &str, note: &str) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"device\": {},", json_str(device));
    s.push_str("  \"rows\": [\n");
    for (i, r) in rows.iter().enumerate() {
        let (sp, eff) = scaling(rows, r);
        let ranks = r
            .rank_ms
            .iter()
            .map(|x| json_num(*x))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            s,
            "    {{\"mode\": {}, \"tokens\": {}, \"tp\": {}, \"cp\": {}, \"cp_comm_type\": {}, \"ms\": {}, \"rank_ms\": [{ranks}], \"speedup\": {}, \"efficiency\": {}, \"collectives\": {}, \"payload_bytes\": {}, \"wire_bytes\": {}}}",
            json_str(&r.mode),
            r.tokens,
            r.tp,
            r.cp,
            r.cp_comm_type.as_deref().map_or("null".to_string(), json_str),
            json_num(r.ms()),
            json_num(sp),
            json_num(eff),
            r.comm.calls,
            r.comm.payload,
            r.comm.wire
        );
        s.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
    }
    let _ = writeln!(s, "  ],\n  \"note\": {}\n}}", json_str(note));
    s
}

/// The chart: per mode, ms over tokens (one series per configuration) and scaling efficiency
/// over tokens (one series per configuration with more than one rank).
pub fn panels(rows: &[ParRow]) -> Vec<Panel> {
    let mut modes: Vec<&str> = rows.iter().map(|r| r.mode.as_str()).collect();
    modes.dedup();
    let mut out = Vec::new();
    for m in modes {
        let mut labels: Vec<(String, usize)> = Vec::new();
        for r in rows.iter().filter(|r| r.mode == m) {
            if !labels.iter().any(|(l, _)| *l == r.label()) {
                labels.push((r.label(), r.tp * r.cp));
            }
        }
        let pts = |label: &str, f: &dyn Fn(&ParRow) -> f64| -> Vec<(f64, f64)> {
            rows.iter()
                .filter(|r| r.mode == m && r.label() == label)
                .map(|r| (r.tokens as f64, f(r)))
                .collect()
        };
        out.push(Panel {
            title: format!("{m}: time"),
            x_label: "tokens (one sequence)".into(),
            y_label: "ms (slowest rank)".into(),
            series: labels
                .iter()
                .map(|(l, _)| Series::new(l.clone(), pts(l, &|r| r.ms())))
                .collect(),
        });
        out.push(Panel {
            title: format!("{m}: scaling efficiency"),
            x_label: "tokens (one sequence)".into(),
            y_label: "speedup / (TP x CP)".into(),
            series: labels
                .iter()
                .filter(|(_, ranks)| *ranks > 1)
                .map(|(l, _)| Series::new(l.clone(), pts(l, &|r| scaling(rows, r).1)))
                .collect(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mode: &str, tokens: usize, tp: usize, rank_ms: Vec<f64>, payload: u64) -> ParRow {
        ParRow {
            mode: mode.into(),
            tokens,
            tp,
            cp: 1,
            cp_comm_type: None,
            rank_ms,
            comm: CommCount {
                calls: u64::from(tp > 1),
                payload,
                wire: payload,
            },
        }
    }

    fn rows() -> Vec<ParRow> {
        let mut cp = row("forward", 32768, 1, vec![5.5, 5.0], 64 << 20);
        cp.cp = 2;
        cp.cp_comm_type = Some("p2p".into());
        cp.comm.calls = 1;
        vec![
            row("forward", 32768, 1, vec![10.0], 0),
            row("forward", 32768, 2, vec![6.0, 6.25], 256 << 20),
            row("forward", 65536, 1, vec![30.0], 0),
            row("forward", 65536, 2, vec![], 0),
            cp,
        ]
    }

    #[test]
    fn scaling_is_speedup_over_tp1_divided_by_tp() {
        let r = rows();
        assert_eq!(r[1].ms(), 6.25);
        let (sp, eff) = scaling(&r, &r[1]);
        assert_eq!(sp, 1.6);
        assert_eq!(eff, 0.8);
        assert_eq!(scaling(&r, &r[0]), (1.0, 1.0));
        let (sp, eff) = scaling(&r, &r[3]);
        assert!(sp.is_nan() && eff.is_nan());
        // CP = 2: over the same TP = CP = 1 row, divided by CP.
        let (sp, eff) = scaling(&r, &r[4]);
        assert!((sp - 10.0 / 5.5).abs() < 1e-12 && (eff - 5.0 / 5.5).abs() < 1e-12);
    }

    #[test]
    fn table_rows_and_notes() {
        let s = table(&rows(), "2x H200", "TP = 2: no second GPU");
        assert!(
            s.contains("| forward | 32768 | 2 | 1 | - | 6.25 | 6.00 / 6.25 | 1.60 | 0.80 | 1 | 256.00 | 256.00 |"),
            "{s}"
        );
        assert!(
            s.contains(
                "| forward | 32768 | 1 | 1 | - | 10.00 | 10.00 | 1.00 | 1.00 | 0 | 0.00 | 0.00 |"
            ),
            "{s}"
        );
        assert!(
            s.contains("| forward | 65536 | 2 | 1 | - | n/a | n/a | n/a | n/a | n/a | n/a | n/a |"),
            "{s}"
        );
        assert!(
            s.contains("| forward | 32768 | 1 | 2 | p2p | 5.50 | 5.50 / 5.00 | 1.82 | 0.91 | 1 | 64.00 | 64.00 |"),
            "{s}"
        );
        assert!(s.contains("note: TP = 2: no second GPU"), "{s}");
    }

    #[test]
    fn json_and_chart() {
        let r = rows();
        let j = to_json(&r, "dev", "a note");
        assert!(
            j.contains("\"tp\": 2, \"cp\": 1, \"cp_comm_type\": null, \"ms\": 6.2500, \"rank_ms\": [6.0000, 6.2500], \"speedup\": 1.6000, \"efficiency\": 0.8000, \"collectives\": 1, \"payload_bytes\": 268435456, \"wire_bytes\": 268435456}"),
            "{j}"
        );
        assert!(
            j.contains("\"cp\": 2, \"cp_comm_type\": \"p2p\", \"ms\": 5.5000"),
            "{j}"
        );
        assert!(
            j.contains("\"ms\": null, \"rank_ms\": [], \"speedup\": null"),
            "{j}"
        );
        assert!(j.contains("\"note\": \"a note\""), "{j}");
        let p = panels(&r);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].series.len(), 3);
        assert_eq!(p[0].series[1].points[0], (32768.0, 6.25));
        assert_eq!(p[0].series[2].name, "CP = 2 p2p");
        assert_eq!(p[1].series.len(), 2);
        assert_eq!(p[1].series[0].name, "TP = 2");
        assert_eq!(p[1].series[0].points[0], (32768.0, 0.8));
        let svg = crate::bench::chart::render_svg("parallel", &p, 2).unwrap();
        crate::bench::chart::tests::assert_well_formed(&svg);
    }
}

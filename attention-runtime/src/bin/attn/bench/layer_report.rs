//! `attn bench layer`'s results: the layer shapes and their FLOP / byte counts, one row per
//! timed call, the PyTorch script's lines parsed, the markdown table, the issue's targets,
//! the JSON report and the SVG chart's panels. Everything here runs without a GPU.

use std::fmt::Write as _;

use super::chart::{size_label, Panel, Series};
use super::common::{json_field, json_num, json_str};
use super::ncu::{overhead, CallKernels};

/// One layer shape: a self-attention layer with RMS q/k norm, rope and a causal mask, bf16.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerShape {
    /// Preset name (or `custom`), the first word of every case name.
    pub name: String,
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// KV groups.
    pub groups: usize,
    /// Head dim.
    pub head_dim: usize,
}

/// The presets `--presets` knows: name, hidden, heads, groups, head dim.
pub const PRESETS: [(&str, usize, usize, usize, usize); 2] = [
    // Llama-3-8B: 32 heads x 128, 8 KV groups.
    ("llama3-8b", 4096, 32, 8, 128),
    // Llama-3.2-1B: 32 heads x 64, 8 KV groups (the head-dim-64 layer).
    ("llama3.2-1b", 2048, 32, 8, 64),
];

impl LayerShape {
    /// A preset by name (`hd64` is `llama3.2-1b`).
    pub fn preset(name: &str) -> Option<LayerShape> {
        let name = if name == "hd64" { "llama3.2-1b" } else { name };
        PRESETS
            .iter()
            .find(|p| p.0 == name)
            .map(|&(n, hidden, heads, groups, head_dim)| LayerShape {
                name: n.into(),
                hidden,
                heads,
                groups,
                head_dim,
            })
    }

    /// The layer's spec in the `#[attention]` grammar.
    pub fn spec(&self) -> String {
        format!(
            "self, heads = {}, gqa = {}, head_dim = {}, hidden = {}, qk_layernorm = rms, rope, mask = causal",
            self.heads, self.groups, self.head_dim, self.hidden
        )
    }

    /// FLOPs of `linear_qkv` and `linear_proj` over `tokens` tokens.
    pub fn linear_flops(&self, tokens: usize) -> f64 {
        let (h, np, ng, hn, t) = (
            self.hidden as f64,
            self.heads as f64,
            self.groups as f64,
            self.head_dim as f64,
            tokens as f64,
        );
        2.0 * t * h * (np + 2.0 * ng) * hn + 2.0 * t * np * hn * h
    }

    /// FLOPs of causal (bottom-right) attention of `q` new tokens over `before` cached
    /// ones plus themselves: `4 np hn (q before + q^2 / 2)` (FlashAttention's count: the
    /// causal half of the new block).
    pub fn attention_flops(&self, q: usize, before: usize) -> f64 {
        let (np, hn, q, b) = (
            self.heads as f64,
            self.head_dim as f64,
            q as f64,
            before as f64,
        );
        4.0 * np * hn * (q * b + q * q / 2.0)
    }

    /// FLOPs of one layer call on `q` new tokens after `before` cached ones.
    pub fn prefill_flops(&self, q: usize, before: usize) -> f64 {
        self.linear_flops(q) + self.attention_flops(q, before)
    }

    /// Bytes of the K+V static cache for `batch` sequences of `ctx` cached tokens plus the
    /// new one (bf16).
    pub fn cache_bytes(&self, batch: usize, ctx: usize) -> usize {
        2 * batch * self.groups * (ctx + 1) * self.head_dim * 2
    }

    /// Bytes of both weight matrices (bf16).
    pub fn weight_bytes(&self) -> usize {
        let (h, np, ng, hn) = (self.hidden, self.heads, self.groups, self.head_dim);
        2 * h * ((np + 2 * ng) * hn + np * hn)
    }

    /// Bytes a decode step must move: the K/V cache read once plus both weight matrices.
    pub fn decode_bytes(&self, batch: usize, ctx: usize) -> f64 {
        (self.cache_bytes(batch, ctx) + self.weight_bytes()) as f64
    }
}

/// What one row times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `forward_device` over one sequence.
    Forward,
    /// `prefill_device` into an empty static cache.
    StaticPrefill,
    /// `forward_paged_device` of one sequence into an empty paged pool.
    PagedPrefill,
    /// A chunk after cached tokens, static cache.
    ChunkStatic,
    /// A chunk after cached tokens, paged pool.
    ChunkPaged,
    /// `decode_device_into`, steps queued back to back.
    DecodeEager,
    /// The captured decode graph's replay, steps queued back to back.
    DecodeGraph,
}

impl Kind {
    /// Name in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Forward => "forward",
            Kind::StaticPrefill => "prefill_static",
            Kind::PagedPrefill => "prefill_paged",
            Kind::ChunkStatic => "chunk_static",
            Kind::ChunkPaged => "chunk_paged",
            Kind::DecodeEager => "decode_eager",
            Kind::DecodeGraph => "decode_graph",
        }
    }

    /// Decode steps (rate in GB/s) rather than prefill calls (TFLOP/s).
    pub fn is_decode(self) -> bool {
        matches!(self, Kind::DecodeEager | Kind::DecodeGraph)
    }
}

/// One timed call.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The layer shape's name.
    pub preset: String,
    /// What was timed.
    pub kind: Kind,
    /// New tokens per sequence (prefill length, chunk length; 1 for decode).
    pub tokens: usize,
    /// Cached tokens before the call (0 for a prefill from empty).
    pub ctx: usize,
    /// Sequences.
    pub batch: usize,
    /// Paged pool block size (paged rows; 0 otherwise).
    pub block: usize,
    /// Milliseconds per call (median) or per queued decode step; NaN in `--profile-once`.
    pub ours_ms: f64,
    /// FLOPs (prefill, chunk) or bytes (decode) of the call, for the rate.
    pub work: f64,
    /// The PyTorch layer on the same shape: `(backend, ms)`.
    pub torch: Vec<(String, f64)>,
    /// The call's kernels from the ncu profile, when one was given.
    pub kernels: Option<CallKernels>,
}

impl Row {
    /// The case name, unique within a run and the same in the `--profile-once` manifest.
    pub fn case(&self) -> String {
        let p = &self.preset;
        let (s, c, b, bs) = (self.tokens, self.ctx, self.batch, self.block);
        match self.kind {
            Kind::Forward => format!("{p} prefill {s} (forward)"),
            Kind::StaticPrefill => format!("{p} prefill {s} (static cache)"),
            Kind::PagedPrefill => format!("{p} prefill {s} (paged, block {bs})"),
            Kind::ChunkStatic => format!("{p} chunk {s} after {c} (static cache)"),
            Kind::ChunkPaged => format!("{p} chunk {s} after {c} (paged, block {bs})"),
            Kind::DecodeEager => format!("{p} decode b{b} ctx{c} eager"),
            Kind::DecodeGraph => format!("{p} decode b{b} ctx{c} graph"),
        }
    }

    /// TFLOP/s (prefill, chunk) or GB/s (decode) at `ms`.
    pub fn rate_at(&self, ms: f64) -> f64 {
        let per_s = self.work / (ms * 1e-3);
        if self.kind.is_decode() {
            per_s / 1e9
        } else {
            per_s / 1e12
        }
    }

    /// Ours: [`rate_at`](Self::rate_at) our time.
    pub fn rate(&self) -> f64 {
        self.rate_at(self.ours_ms)
    }

    /// `TFLOP/s` or `GB/s`.
    pub fn rate_unit(&self) -> &'static str {
        if self.kind.is_decode() {
            "GB/s"
        } else {
            "TFLOP/s"
        }
    }

    /// The sum of the call's kernel times, ms (NaN without a profile).
    pub fn kernel_ms(&self) -> f64 {
        self.kernels.as_ref().map_or(f64::NAN, CallKernels::sum_ms)
    }

    /// [`overhead`] of the call over its kernels (NaN without a profile).
    pub fn overhead(&self) -> f64 {
        overhead(self.ours_ms, self.kernel_ms())
    }

    /// The PyTorch time of `backend`, NaN when absent.
    pub fn torch_ms(&self, backend: &str) -> f64 {
        self.torch
            .iter()
            .find(|t| t.0 == backend)
            .map_or(f64::NAN, |t| t.1)
    }
}

fn find<'a>(
    rows: &'a [Row],
    preset: &str,
    kind: Kind,
    tokens: usize,
    ctx: usize,
    batch: usize,
) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.preset == preset
            && r.kind == kind
            && r.tokens == tokens
            && r.ctx == ctx
            && r.batch == batch
    })
}

/// The row this row is compared with in the rate column (`forward` on the same tokens for
/// cached / paged prefill, the static-cache chunk for the paged chunk, the graph replay for
/// an eager step), with the comparison's label.
fn reference<'a>(rows: &'a [Row], r: &Row) -> Option<(&'a Row, &'static str)> {
    let (p, s, c, b) = (r.preset.as_str(), r.tokens, r.ctx, r.batch);
    match r.kind {
        Kind::StaticPrefill | Kind::PagedPrefill => {
            find(rows, p, Kind::Forward, s, c, b).map(|x| (x, "forward"))
        }
        Kind::ChunkPaged => find(rows, p, Kind::ChunkStatic, s, c, b).map(|x| (x, "static chunk")),
        Kind::DecodeEager => find(rows, p, Kind::DecodeGraph, s, c, b).map(|x| (x, "graph")),
        _ => None,
    }
}

/// Parse the PyTorch script's lines (one flat JSON object each): `case` (`prefill`,
/// `chunk`, `decode`), `backend`, `mode` (decode: `eager` / `graph`), the shape fields and
/// `ms` (null when the backend failed). Returns `(case, mode, backend, tokens, ctx, batch,
/// ms)`; lines that do not parse are skipped.
pub fn parse_torch(lines: &[String]) -> Vec<TorchTiming> {
    lines
        .iter()
        .filter_map(|l| {
            let int = |n: &str| json_field(l, n).and_then(|x| x.parse::<usize>().ok());
            Some(TorchTiming {
                case: json_field(l, "case")?,
                mode: json_field(l, "mode").unwrap_or_default(),
                backend: json_field(l, "backend")?,
                tokens: int("tokens").unwrap_or(1),
                ctx: int("ctx").unwrap_or(0),
                batch: int("batch").unwrap_or(1),
                ms: json_field(l, "ms")
                    .and_then(|x| x.parse::<f64>().ok())
                    .unwrap_or(f64::NAN),
            })
        })
        .collect()
}

/// One line of the PyTorch layer script.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTiming {
    /// `prefill`, `chunk` or `decode`.
    pub case: String,
    /// `eager` / `graph` (decode), empty otherwise.
    pub mode: String,
    /// `flash` or `cudnn`.
    pub backend: String,
    /// New tokens per sequence.
    pub tokens: usize,
    /// Cached tokens before.
    pub ctx: usize,
    /// Sequences.
    pub batch: usize,
    /// Milliseconds (NaN when the backend failed).
    pub ms: f64,
}

/// The PyTorch times that compare with a row of `kind` at (`tokens`, `ctx`, `batch`):
/// prefill rows with the script's `prefill`, chunks with `chunk`, eager / graph steps with
/// `decode` of the same mode.
pub fn torch_for(
    t: &[TorchTiming],
    kind: Kind,
    tokens: usize,
    ctx: usize,
    batch: usize,
) -> Vec<(String, f64)> {
    let (case, mode) = match kind {
        Kind::Forward | Kind::StaticPrefill | Kind::PagedPrefill => ("prefill", ""),
        Kind::ChunkStatic | Kind::ChunkPaged => ("chunk", ""),
        Kind::DecodeEager => ("decode", "eager"),
        Kind::DecodeGraph => ("decode", "graph"),
    };
    t.iter()
        .filter(|x| {
            x.case == case
                && x.mode == mode
                && x.tokens == tokens
                && x.ctx == ctx
                && x.batch == batch
        })
        .map(|x| (x.backend.clone(), x.ms))
        .collect()
}

/// One of the issue's targets, checked on one row.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetCheck {
    /// What is checked, on which case.
    pub what: String,
    /// The measured value.
    pub value: f64,
    /// The bound.
    pub bound: f64,
    /// `value >= bound` is met (else `value <= bound`).
    pub at_least: bool,
}

impl TargetCheck {
    /// Whether the value meets the bound.
    pub fn met(&self) -> bool {
        if self.at_least {
            self.value >= self.bound
        } else {
            self.value <= self.bound
        }
    }
}

/// The issue's §5 targets on the rows that have the numbers: layer prefill >= 1.1x the
/// PyTorch layer on SDPA flash; cached and paged prefill >= 0.9x the forward on the same
/// tokens; eager decode <= 1.15x the graph replay; API overhead <= 5% at 8k prefill
/// (forward, static cache) and at batch-16 decode.
pub fn targets(rows: &[Row]) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    let mut push = |what: String, value: f64, bound: f64, at_least: bool| {
        if value.is_finite() {
            out.push(TargetCheck {
                what,
                value,
                bound,
                at_least,
            });
        }
    };
    for r in rows {
        match r.kind {
            Kind::Forward => push(
                format!("{}: PyTorch (flash) / ours", r.case()),
                r.torch_ms("flash") / r.ours_ms,
                1.1,
                true,
            ),
            Kind::StaticPrefill | Kind::PagedPrefill => {
                if let Some((f, _)) = reference(rows, r) {
                    push(
                        format!("{}: forward / this", r.case()),
                        f.ours_ms / r.ours_ms,
                        0.9,
                        true,
                    );
                }
            }
            Kind::DecodeEager => {
                if let Some((g, _)) = reference(rows, r) {
                    push(
                        format!("{}: eager / graph", r.case()),
                        r.ours_ms / g.ours_ms,
                        1.15,
                        false,
                    );
                }
            }
            _ => {}
        }
        let overhead_case = match r.kind {
            Kind::Forward | Kind::StaticPrefill => r.tokens == 8192,
            Kind::DecodeEager | Kind::DecodeGraph => r.batch == 16,
            _ => false,
        };
        if overhead_case {
            push(
                format!("{}: API overhead", r.case()),
                r.overhead(),
                0.05,
                false,
            );
        }
    }
    out
}

fn fmt_ms(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "-".into()
    }
}

fn fmt_pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}%", 100.0 * x)
    } else {
        "-".into()
    }
}

/// The markdown table (one line per row) and the targets under it.
pub fn table(rows: &[Row], device: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "device: {device}");
    t.push_str("| call | ours (ms) | rate | PyTorch layer (ms) | PyTorch / ours | kernels (ms, launches) | overhead |\n|---|---|---|---|---|---|---|\n");
    for r in rows {
        let mut rate = format!("{:.1} {}", r.rate(), r.rate_unit());
        if let Some((x, label)) = reference(rows, r) {
            let ratio = if r.kind == Kind::DecodeEager {
                r.ours_ms / x.ours_ms
            } else {
                x.ours_ms / r.ours_ms
            };
            let _ = write!(rate, " ({ratio:.2}x {label})");
        }
        let tp = r
            .torch
            .iter()
            .map(|(n, ms)| format!("{n} {}", fmt_ms(*ms)))
            .collect::<Vec<_>>()
            .join(", ");
        let ratio = r
            .torch
            .iter()
            .map(|(n, ms)| format!("{n} {:.2}x", ms / r.ours_ms))
            .collect::<Vec<_>>()
            .join(", ");
        let kern = r.kernels.as_ref().map_or("-".into(), |k| {
            format!("{:.3} ({})", k.sum_ms(), k.kernels.len())
        });
        let _ = writeln!(
            t,
            "| {} | {} | {rate} | {tp} | {ratio} | {kern} | {} |",
            r.case(),
            fmt_ms(r.ours_ms),
            fmt_pct(r.overhead())
        );
    }
    let checks = targets(rows);
    if !checks.is_empty() {
        t.push_str("\ntargets (issue 8 §5):\n");
        for c in &checks {
            let _ = writeln!(
                t,
                "  {} = {:.3} ({} {}) {}",
                c.what,
                c.value,
                if c.at_least { ">=" } else { "<=" },
                c.bound,
                if c.met() { "met" } else { "MISSED" }
            );
        }
    }
    t
}

/// The JSON report: `{device, presets, rows, targets, notes}`; each row has its case, kind,
/// shape, `ours_ms`, `rate` and `rate_unit`, `torch` (`{backend: ms}`), and from a profile
/// `kernel_ms`, `launches`, `overhead` and the `kernels` (name, ms) of the call.
pub fn to_json(rows: &[Row], shapes: &[LayerShape], device: &str, notes: &[String]) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"device\": {},", json_str(device));
    s.push_str("  \"presets\": [\n");
    for (i, p) in shapes.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"name\": {}, \"hidden\": {}, \"heads\": {}, \"groups\": {}, \"head_dim\": {}, \"spec\": {}}}",
            json_str(&p.name),
            p.hidden,
            p.heads,
            p.groups,
            p.head_dim,
            json_str(&p.spec())
        );
        s.push_str(if i + 1 < shapes.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"rows\": [\n");
    for (i, r) in rows.iter().enumerate() {
        let torch = r
            .torch
            .iter()
            .map(|(n, ms)| format!("{}: {}", json_str(n), json_num(*ms)))
            .collect::<Vec<_>>()
            .join(", ");
        let kernels = r.kernels.as_ref().map_or(String::new(), |k| {
            k.kernels
                .iter()
                .map(|k| {
                    format!(
                        "{{\"name\": {}, \"ms\": {}}}",
                        json_str(&k.name),
                        json_num(k.ms)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        });
        let _ = write!(
            s,
            "    {{\"case\": {}, \"preset\": {}, \"kind\": {}, \"tokens\": {}, \"ctx\": {}, \"batch\": {}, \"block_size\": {}, \"ours_ms\": {}, \"rate\": {}, \"rate_unit\": {}, \"torch_ms\": {{{torch}}}, \"kernel_ms\": {}, \"launches\": {}, \"overhead\": {}, \"kernels\": [{kernels}]}}",
            json_str(&r.case()),
            json_str(&r.preset),
            json_str(r.kind.name()),
            r.tokens,
            r.ctx,
            r.batch,
            r.block,
            json_num(r.ours_ms),
            json_num(r.rate()),
            json_str(r.rate_unit()),
            json_num(r.kernel_ms()),
            r.kernels.as_ref().map_or("null".into(), |k| k.kernels.len().to_string()),
            json_num(r.overhead()),
        );
        s.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"targets\": [\n");
    let checks = targets(rows);
    for (i, c) in checks.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"what\": {}, \"value\": {}, \"bound\": {}, \"at_least\": {}, \"met\": {}}}",
            json_str(&c.what),
            json_num(c.value),
            json_num(c.bound),
            c.at_least,
            c.met()
        );
        s.push_str(if i + 1 < checks.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"notes\": [");
    s.push_str(
        &notes
            .iter()
            .map(|n| json_str(n))
            .collect::<Vec<_>>()
            .join(", "),
    );
    s.push_str("]\n}\n");
    s
}

/// The chart's panels, a row per preset: prefill TFLOP/s over tokens; the chunk after the
/// cache; decode GB/s over batch at each context. Ours and every PyTorch backend.
pub fn panels(rows: &[Row], shapes: &[LayerShape], contexts: &[usize]) -> Vec<Panel> {
    let mut out = Vec::new();
    for shape in shapes {
        let p = shape.name.as_str();
        let mine = |k: Kind| rows.iter().filter(move |r| r.preset == p && r.kind == k);
        let ours = |name: &str, k: Kind, x: &dyn Fn(&Row) -> f64| {
            Series::new(name, mine(k).map(|r| (x(r), r.rate())).collect())
        };
        let torch = |name: &str, k: Kind, backend: &str, x: &dyn Fn(&Row) -> f64| {
            Series::new(
                name,
                mine(k)
                    .map(|r| (x(r), r.rate_at(r.torch_ms(backend))))
                    .collect(),
            )
        };
        let backends = |k: Kind| {
            let mut b: Vec<String> = mine(k)
                .flat_map(|r| r.torch.iter().map(|t| t.0.clone()))
                .collect();
            b.sort();
            b.dedup();
            b
        };
        let tokens = |r: &Row| r.tokens as f64;
        let batch = |r: &Row| r.batch as f64;
        let label = format!(
            "{p} (h {}, {}x{}, gqa {})",
            shape.hidden, shape.heads, shape.head_dim, shape.groups
        );

        let mut s = vec![
            ours("ours forward", Kind::Forward, &tokens),
            ours("ours static cache", Kind::StaticPrefill, &tokens),
            ours("ours paged", Kind::PagedPrefill, &tokens),
        ];
        for b in backends(Kind::Forward) {
            s.push(torch(&format!("PyTorch {b}"), Kind::Forward, &b, &tokens));
        }
        s.retain(|x| !x.points.is_empty());
        if !s.is_empty() {
            out.push(Panel {
                title: format!("prefill, {label}"),
                x_label: "tokens".into(),
                y_label: "TFLOP/s".into(),
                series: s,
            });
        }

        let mut s = vec![
            ours("ours static cache", Kind::ChunkStatic, &tokens),
            ours("ours paged", Kind::ChunkPaged, &tokens),
        ];
        for b in backends(Kind::ChunkStatic) {
            s.push(torch(
                &format!("PyTorch {b}"),
                Kind::ChunkStatic,
                &b,
                &tokens,
            ));
        }
        s.retain(|x| !x.points.is_empty());
        if let Some(r) = mine(Kind::ChunkStatic)
            .next()
            .or(mine(Kind::ChunkPaged).next())
        {
            out.push(Panel {
                title: format!("chunk after {} cached, {p}", size_label(r.ctx as f64)),
                x_label: "chunk tokens".into(),
                y_label: "TFLOP/s".into(),
                series: s,
            });
        }

        for &ctx in contexts {
            let at = |k: Kind, backend: Option<&str>, name: &str| {
                Series::new(
                    name,
                    mine(k)
                        .filter(|r| r.ctx == ctx)
                        .map(|r| {
                            let ms = backend.map_or(r.ours_ms, |b| r.torch_ms(b));
                            (batch(r), r.rate_at(ms))
                        })
                        .collect(),
                )
            };
            let mut s = vec![
                at(Kind::DecodeEager, None, "ours eager"),
                at(Kind::DecodeGraph, None, "ours graph"),
            ];
            for b in backends(Kind::DecodeEager) {
                s.push(at(
                    Kind::DecodeEager,
                    Some(&b),
                    &format!("PyTorch {b} eager"),
                ));
            }
            for b in backends(Kind::DecodeGraph) {
                s.push(at(
                    Kind::DecodeGraph,
                    Some(&b),
                    &format!("PyTorch {b} graph"),
                ));
            }
            s.retain(|x| !x.points.is_empty());
            if !s.is_empty() {
                out.push(Panel {
                    title: format!("decode step, ctx {}, {p}", size_label(ctx as f64)),
                    x_label: "batch".into(),
                    y_label: "GB/s (K/V + weights)".into(),
                    series: s,
                });
            }
        }
    }
    out
}

/// Parse `--max-cache-bytes`: a byte count with an optional `K`, `M`, `G` or `T` suffix
/// (powers of 1024; `GiB`-style spellings too).
pub fn parse_bytes(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower.trim_end_matches("ib").trim_end_matches('b');
    let (num, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    let n: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("`{t}`: expected bytes, e.g. 25769803776 or 24G"))?;
    n.checked_mul(1usize << shift)
        .ok_or_else(|| format!("`{t}`: too large"))
}

#[cfg(test)]
mod tests {
    use super::super::chart::{render_svg, tests::assert_well_formed};
    use super::super::ncu::KernelTime;
    use super::*;

    fn llama() -> LayerShape {
        LayerShape::preset("llama3-8b").unwrap()
    }

    #[test]
    fn flop_and_byte_counts() {
        let l = llama();
        // linear_qkv: 4096 -> (32 + 16) * 128 = 6144; linear_proj: 4096 -> 4096.
        assert_eq!(
            l.linear_flops(1),
            2.0 * 4096.0 * 6144.0 + 2.0 * 4096.0 * 4096.0
        );
        // Causal from empty: 2 s^2 np hn.
        assert_eq!(l.attention_flops(8, 0), 2.0 * 64.0 * 32.0 * 128.0);
        // A chunk after cached tokens: the full block over the cache plus the causal half.
        assert_eq!(l.attention_flops(2, 6), 4.0 * 32.0 * 128.0 * (12.0 + 2.0));
        assert_eq!(
            l.prefill_flops(8, 0),
            l.linear_flops(8) + l.attention_flops(8, 0)
        );
        assert_eq!(l.cache_bytes(16, 8192), 2 * 16 * 8 * 8193 * 128 * 2);
        assert_eq!(l.weight_bytes(), 2 * 4096 * (6144 + 4096));
        assert_eq!(
            l.decode_bytes(1, 0),
            (2 * 8 * 128 * 2 + l.weight_bytes()) as f64
        );
        let small = LayerShape::preset("hd64").unwrap();
        assert_eq!(
            (small.hidden, small.heads, small.groups, small.head_dim),
            (2048, 32, 8, 64)
        );
        assert!(small.spec().contains("head_dim = 64"));
        assert!(LayerShape::preset("nope").is_none());
    }

    fn row(kind: Kind, tokens: usize, ctx: usize, batch: usize, ms: f64) -> Row {
        let l = llama();
        let work = if kind.is_decode() {
            l.decode_bytes(batch, ctx)
        } else {
            l.prefill_flops(tokens, ctx)
        };
        Row {
            preset: l.name,
            kind,
            tokens,
            ctx,
            batch,
            block: if matches!(kind, Kind::PagedPrefill | Kind::ChunkPaged) {
                64
            } else {
                0
            },
            ours_ms: ms,
            work,
            torch: Vec::new(),
            kernels: None,
        }
    }

    fn kernels(case: String, ms: &[f64]) -> Option<CallKernels> {
        Some(CallKernels {
            case,
            kernels: ms
                .iter()
                .enumerate()
                .map(|(i, &ms)| KernelTime {
                    id: i as u64,
                    name: format!("k{i}"),
                    ms,
                })
                .collect(),
        })
    }

    fn sample() -> Vec<Row> {
        let t = parse_torch(&[
            r#"{"case": "prefill", "backend": "flash", "tokens": 8192, "ms": 3.5}"#.to_string(),
            r#"{"case": "prefill", "backend": "cudnn", "tokens": 8192, "ms": null}"#.to_string(),
            r#"{"case": "decode", "backend": "flash", "mode": "eager", "batch": 16, "ctx": 8192, "ms": 0.7}"#.to_string(),
            r#"{"case": "decode", "backend": "flash", "mode": "graph", "batch": 16, "ctx": 8192, "ms": 0.2}"#.to_string(),
            "not json".to_string(),
        ]);
        assert_eq!(t.len(), 4);
        let mut rows = vec![
            row(Kind::Forward, 8192, 0, 1, 3.0),
            row(Kind::StaticPrefill, 8192, 0, 1, 3.1),
            row(Kind::PagedPrefill, 8192, 0, 1, 3.7),
            row(Kind::ChunkStatic, 2048, 6144, 1, 1.1),
            row(Kind::ChunkPaged, 2048, 6144, 1, 1.2),
            row(Kind::DecodeEager, 1, 8192, 16, 0.22),
            row(Kind::DecodeGraph, 1, 8192, 16, 0.2),
        ];
        for r in &mut rows {
            r.torch = torch_for(&t, r.kind, r.tokens, r.ctx, r.batch);
        }
        rows[0].kernels = kernels(rows[0].case(), &[2.0, 0.85]);
        rows[5].kernels = kernels(rows[5].case(), &[0.1, 0.1]);
        rows
    }

    #[test]
    fn rows_rates_targets_and_reports() {
        let rows = sample();
        assert_eq!(rows[0].case(), "llama3-8b prefill 8192 (forward)");
        assert_eq!(
            rows[4].case(),
            "llama3-8b chunk 2048 after 6144 (paged, block 64)"
        );
        assert_eq!(rows[5].case(), "llama3-8b decode b16 ctx8192 eager");
        assert_eq!(rows[0].torch.len(), 2);
        assert!(rows[0].torch_ms("cudnn").is_nan());
        assert_eq!(rows[5].torch, vec![("flash".to_string(), 0.7)]);
        assert_eq!(rows[6].torch, vec![("flash".to_string(), 0.2)]);
        assert!((rows[0].rate() - llama().prefill_flops(8192, 0) / 3e-3 / 1e12).abs() < 1e-9);
        assert!((rows[5].rate() - llama().decode_bytes(16, 8192) / 0.22e-3 / 1e9).abs() < 1e-6);
        // Overhead: (3.0 - 2.85) / 3.0 = 5%; (0.22 - 0.2) / 0.22 = 9%.
        assert!((rows[0].overhead() - 0.05).abs() < 1e-12);
        assert!((rows[5].overhead() - 0.02 / 0.22).abs() < 1e-12);
        assert!(rows[1].overhead().is_nan());

        let checks = targets(&rows);
        let get = |s: &str| checks.iter().find(|c| c.what.contains(s)).unwrap();
        assert!(get("prefill 8192 (forward): PyTorch").met()); // 3.5 / 3.0 = 1.17
        assert!(get("(static cache): forward").met()); // 3.0 / 3.1
        assert!(!get("(paged, block 64): forward").met()); // 3.0 / 3.7 = 0.81
        assert!(get("eager: eager / graph").met()); // 1.10
        assert!(!get("b16 ctx8192 eager: API overhead").met()); // 9%
        assert!(get("prefill 8192 (forward): API overhead").met()); // exactly 5%

        let t = table(&rows, "dev");
        assert!(
            t.contains("| llama3-8b prefill 8192 (forward) | 3.000 |"),
            "{t}"
        );
        assert!(t.contains("(0.97x forward)"), "{t}");
        assert!(t.contains("(1.10x graph)"), "{t}");
        assert!(t.contains("2.850 (2)"), "{t}");
        assert!(t.contains("| 5.0% |"), "{t}");
        assert!(t.contains("MISSED"));

        let j = to_json(&rows, &[llama()], "dev", &["skipped x".into()]);
        assert!(j.contains("\"kind\": \"prefill_paged\""));
        assert!(
            j.contains("\"torch_ms\": {\"flash\": 3.5000, \"cudnn\": null}"),
            "{j}"
        );
        assert!(j.contains("\"kernels\": [{\"name\": \"k0\", \"ms\": 2.0000}"));
        assert!(j.contains("\"notes\": [\"skipped x\"]"));

        let p = panels(&rows, &[llama()], &[8192, 32768]);
        assert_eq!(p.len(), 3); // prefill, chunk, decode ctx 8k (no rows at 32k)
        let svg = render_svg("layer", &p, 3).unwrap();
        assert_well_formed(&svg);
        for name in [
            "ours forward",
            "ours paged",
            "PyTorch flash",
            "PyTorch cudnn (no data)",
            "ours graph",
            "PyTorch flash graph",
        ] {
            assert!(svg.contains(name), "missing {name}");
        }
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("24G").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("lots").is_err());
    }
}

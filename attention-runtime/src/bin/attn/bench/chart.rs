//! The benches' SVG charts: ours against the baselines over the swept sizes, one panel per
//! fixed setting (head dim, context, layer shape, ...), drawn with `plotters`' SVG backend
//! (text as SVG `<text>`, so no font files are read).
//!
//! The x axis of a panel is categorical: the swept sizes of its series, sorted, evenly spaced
//! (so 1, 16, 64, 128 or 2k, 8k, 16k are each readable); the y axis is linear from 0. A
//! non-finite y (a baseline that failed or was skipped) leaves a gap.

use std::path::{Path, PathBuf};

use attention_runtime::{AttnError, Result};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

/// One line of a panel: `(x, y)` points, x the swept size.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points; a non-finite `y` is left out (a gap in the line).
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series named `name` with `points`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
        }
    }

    /// Whether any point has a finite `y`.
    pub fn has_data(&self) -> bool {
        self.points.iter().any(|p| p.1.is_finite())
    }
}

/// One chart of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Caption above the panel.
    pub title: String,
    /// What the x axis sweeps.
    pub x_label: String,
    /// What the y axis measures (with its unit).
    pub y_label: String,
    /// Lines, in legend order.
    pub series: Vec<Series>,
}

/// The chart written beside a JSON report: `out.json` -> `out.svg`.
pub fn svg_path_for(json: &Path) -> PathBuf {
    json.with_extension("svg")
}

/// A size as an axis label: multiples of 1024 from 1024 on as `Nk`, others as integers.
pub fn size_label(x: f64) -> String {
    let r = x.round();
    if (x - r).abs() > 1e-9 {
        return format!("{x}");
    }
    let n = r as i64;
    if n >= 1024 && n % 1024 == 0 {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
}

/// The sorted distinct x values of a panel's series.
fn categories(p: &Panel) -> Vec<f64> {
    let mut xs: Vec<f64> = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|q| q.0))
        .filter(|x| x.is_finite())
        .collect();
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    xs.dedup();
    xs
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];

fn draw_err(e: impl std::fmt::Display) -> AttnError {
    AttnError::InvalidArgument {
        arg: "chart".into(),
        expected: "a chart plotters can draw".into(),
        got: e.to_string(),
    }
}

/// Render `panels` in a grid of `cols` columns under `title`; returns the SVG document.
///
/// Errors: [`AttnError::InvalidArgument`] when there is no panel or plotters fails.
pub fn render_svg(title: &str, panels: &[Panel], cols: usize) -> Result<String> {
    if panels.is_empty() {
        return Err(AttnError::InvalidArgument {
            arg: "chart".into(),
            expected: "at least one panel".into(),
            got: "none".into(),
        });
    }
    let cols = cols.clamp(1, panels.len());
    let rows = panels.len().div_ceil(cols);
    let (pw, ph) = (560u32, 400u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (pw * cols as u32, ph * rows as u32 + 40))
            .into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(draw_err)?;
        let areas = root.split_evenly((rows, cols));
        for (area, p) in areas.iter().zip(panels) {
            draw_panel(area, p)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    p: &Panel,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let xs = categories(p);
    let n = xs.len().max(1) as i32;
    let ymax = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|q| q.1))
        .filter(|y| y.is_finite())
        .fold(0f64, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        // Segments a..=b: one per category (a single one sits between two empty ones).
        .build_cartesian_2d(
            if n == 1 { -1..1 } else { 0..n - 1 }.into_segmented(),
            0f64..ymax,
        )
        .map_err(draw_err)?;
    let label = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) if *i >= 0 => xs
            .get(*i as usize)
            .map(|x| size_label(*x))
            .unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(xs.len().max(1))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_label_formatter(&label)
        .x_desc(p.x_label.as_str())
        .y_desc(p.y_label.as_str())
        .draw()
        .map_err(draw_err)?;
    let at = |x: f64| xs.iter().position(|v| *v == x).map(|i| i as i32);
    let mut any = false;
    for (i, s) in p.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        // Runs of finite points, split at gaps.
        let mut runs: Vec<Vec<(SegmentValue<i32>, f64)>> = vec![Vec::new()];
        let mut pts: Vec<(f64, f64)> = s.points.clone();
        pts.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
        for (x, y) in pts {
            match at(x) {
                Some(i) if y.is_finite() => runs
                    .last_mut()
                    .expect("runs is never empty")
                    .push((SegmentValue::CenterOf(i), y)),
                _ => runs.push(Vec::new()),
            }
        }
        let dots: Vec<(SegmentValue<i32>, f64)> = runs.iter().flatten().cloned().collect();
        // Legend entry even without data, so a failed baseline is still named.
        chart
            .draw_series(LineSeries::new(Vec::new(), color.stroke_width(2)))
            .map_err(draw_err)?
            .label(if s.has_data() {
                s.name.clone()
            } else {
                format!("{} (no data)", s.name)
            })
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        for r in runs.into_iter().filter(|r| r.len() > 1) {
            chart
                .draw_series(LineSeries::new(r, color.stroke_width(2)))
                .map_err(draw_err)?;
        }
        chart
            .draw_series(dots.into_iter().map(|q| Circle::new(q, 3, color.filled())))
            .map_err(draw_err)?;
        any = true;
    }
    if any {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// [`render_svg`] written to `path`. Errors: as `render_svg`, [`AttnError::Io`].
pub fn write_svg(path: &Path, title: &str, panels: &[Panel], cols: usize) -> Result<()> {
    let svg = render_svg(title, panels, cols)?;
    std::fs::write(path, svg).map_err(|e| AttnError::Io {
        path: path.display().to_string(),
        source: e,
    })
}

/// A bench's report files: `json` at `path`, then, when there are panels, the chart beside it
/// ([`svg_path_for`], `cols` panels per row). Errors: [`AttnError::Io`] naming the file.
pub fn write_report(
    path: &Path,
    json: &str,
    title: &str,
    panels: &[Panel],
    cols: usize,
) -> Result<()> {
    std::fs::write(path, json).map_err(|e| AttnError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    if panels.is_empty() {
        return Ok(());
    }
    write_svg(&svg_path_for(path), title, panels, cols)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Well-formed enough for a browser: one `<svg>` root, every element closed in order.
    pub fn assert_well_formed(svg: &str) {
        assert!(
            svg.trim_start().starts_with("<svg"),
            "{}",
            &svg[..80.min(svg.len())]
        );
        assert!(svg.trim_end().ends_with("</svg>"));
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let j = rest[i..].find('>').expect("unclosed tag") + i;
            let tag = &rest[i + 1..j];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
            } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
                stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
            }
            rest = &rest[j + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
    }

    #[test]
    fn svg_names_every_series_and_is_well_formed() {
        let panels = vec![
            Panel {
                title: "hd 128 causal".into(),
                x_label: "seqlen".into(),
                y_label: "TFLOP/s".into(),
                series: vec![
                    Series::new(
                        "ours <prefill_sm80>",
                        vec![(2048.0, 300.0), (8192.0, 410.0)],
                    ),
                    Series::new("sdpa flash", vec![(2048.0, f64::NAN), (8192.0, 380.0)]),
                    Series::new("sdpa cudnn", vec![(2048.0, f64::NAN)]),
                ],
            },
            Panel {
                title: "decode ctx 8k".into(),
                x_label: "batch".into(),
                y_label: "GB/s".into(),
                series: vec![Series::new("graph", vec![(1.0, 1600.0), (16.0, 2900.0)])],
            },
        ];
        let svg = render_svg("bench & co", &panels, 2).unwrap();
        assert_well_formed(&svg);
        for name in [
            "ours &lt;prefill_sm80&gt;",
            "sdpa flash",
            "sdpa cudnn (no data)",
            "graph",
            "bench &amp; co",
            "8k",
            "16",
        ] {
            assert!(svg.contains(name), "missing {name}");
        }
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("out.json");
        let path = svg_path_for(&json);
        assert_eq!(path, dir.path().join("out.svg"));
        write_svg(&path, "t", &panels, 1).unwrap();
        assert_well_formed(&std::fs::read_to_string(&path).unwrap());
        assert!(matches!(
            render_svg("t", &[], 1),
            Err(AttnError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn size_labels() {
        assert_eq!(size_label(2048.0), "2k");
        assert_eq!(size_label(16.0), "16");
        assert_eq!(size_label(1000.0), "1000");
        assert_eq!(size_label(32768.0), "32k");
    }
}

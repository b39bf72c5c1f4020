//! `switchyard bench`'s PNG: aggregate tok/s against concurrency (over the whole run, and the
//! steady decode rate between the prompts and the end), the per-layer time split of
//! batch-1 decode, and time-to-first-token / inter-token latency percentiles, one series per
//! mode (embedded, cluster).

use anyhow::{anyhow, Context};
use plotters::prelude::*;
use std::path::Path;

/// One mode's figures, as the bench measured them.
pub struct ModeFigures {
    pub name: String,
    /// (sequences, aggregate tok/s over the whole run, the prompts' prefill included)
    pub throughput: Vec<(usize, f64)>,
    /// (sequences, steady decode tok/s: n tokens every median inter-token latency)
    pub steady: Vec<(usize, f64)>,
    /// (phase, ms per layer per decoded token)
    pub split: Vec<(String, f64)>,
    pub latency: Vec<LatencyRow>,
}

/// (sequences, ttft p50, ttft p99, itl p50, itl p99) in ms.
pub type LatencyRow = (usize, f64, f64, f64, f64);

/// TrueType fonts tried in order; the first readable one draws the text.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

fn register_font(explicit: Option<&Path>) -> anyhow::Result<()> {
    let candidates: Vec<&Path> = match explicit {
        Some(p) => vec![p],
        None => FONTS.iter().map(Path::new).collect(),
    };
    let bytes = candidates
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or_else(|| {
            anyhow!("no TrueType font found for the plot (install fonts-dejavu-core, or pass --font FILE.ttf)")
        })?;
    // plotters keeps the font for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("the font file is not a usable TrueType font"))
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Labels the log2 concurrency axis with the sequence counts at whole powers of two.
fn pow2_label(x: &f64) -> String {
    let r = x.round();
    if (x - r).abs() < 1e-6 && r >= 0.0 {
        format!("{}", 1u64 << (r as u32).min(62))
    } else {
        String::new()
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

/// Draws the three panels into `path` (PNG, 1500×520).
pub fn write(
    path: &Path,
    title: &str,
    modes: &[ModeFigures],
    font: Option<&Path>,
) -> anyhow::Result<()> {
    register_font(font)?;
    let root = BitMapBackend::new(path, (1500, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
    let panels = root.split_evenly((1, 3));
    let max_n = modes
        .iter()
        .flat_map(|m| m.throughput.iter().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(2);
    // Concurrency is drawn on a log2 axis: x = log2(sequences).
    let x_max = (max_n as f64).log2() + 0.15;
    throughput(&panels[0], modes, x_max)?;
    layer_split(&panels[1], modes)?;
    latency(&panels[2], modes, x_max)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Aggregate tok/s against concurrency: the whole run solid, steady decode dashed.
fn throughput(area: &Area<'_>, modes: &[ModeFigures], x_max: f64) -> anyhow::Result<()> {
    let max_tok = modes
        .iter()
        .flat_map(|m| m.throughput.iter().chain(&m.steady).map(|p| p.1))
        .filter(|t| t.is_finite())
        .fold(1.0f64, f64::max);
    let mut c = ChartBuilder::on(area)
        .caption(
            "tok/s: whole run (solid), steady decode (dashed)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.15..x_max, 0.0..max_tok * 1.15)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("concurrent sequences")
        .x_labels(x_max.ceil() as usize + 1)
        .x_label_formatter(&pow2_label)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("tok/s")
        .draw()
        .map_err(err)?;
    for (i, m) in modes.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = m
            .throughput
            .iter()
            .map(|&(n, t)| ((n as f64).log2(), t))
            .collect();
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(m.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
        let steady: Vec<(f64, f64)> = m
            .steady
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(n, t)| ((n as f64).log2(), t))
            .collect();
        c.draw_series(DashedLineSeries::new(steady, 6, 4, color.stroke_width(1)))
            .map_err(err)?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;

    Ok(())
}

/// The per-layer time split of batch-1 decode: one stacked bar per mode.
fn layer_split(area: &Area<'_>, modes: &[ModeFigures]) -> anyhow::Result<()> {
    let phases: Vec<String> = modes
        .iter()
        .flat_map(|m| m.split.iter().map(|(p, _)| p.clone()))
        .fold(Vec::new(), |mut v, p| {
            if !v.contains(&p) {
                v.push(p);
            }
            v
        });
    let max_ms = modes
        .iter()
        .map(|m| m.split.iter().map(|s| s.1).sum::<f64>())
        .fold(0.01f64, f64::max);
    let mut c = ChartBuilder::on(area)
        .caption("batch-1 decode: ms per layer", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..modes.len() as f64, 0.0..max_ms * 1.3)
        .map_err(err)?;
    let names: Vec<String> = modes.iter().map(|m| m.name.clone()).collect();
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(modes.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.26 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ms")
        .draw()
        .map_err(err)?;
    for (pi, phase) in phases.iter().enumerate() {
        let color = COLORS[pi % COLORS.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = modes
            .iter()
            .enumerate()
            .filter_map(|(mi, m)| {
                let below: f64 = m
                    .split
                    .iter()
                    .take_while(|(p, _)| p != phase)
                    .map(|s| s.1)
                    .sum();
                let v = m.split.iter().find(|(p, _)| p == phase)?.1;
                Some(Rectangle::new(
                    [(mi as f64 + 0.2, below), (mi as f64 + 0.8, below + v)],
                    color.filled(),
                ))
            })
            .collect();
        c.draw_series(bars)
            .map_err(err)?
            .label(phase.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;

    Ok(())
}

/// TTFT and ITL percentiles against concurrency.
fn latency(area: &Area<'_>, modes: &[ModeFigures], x_max: f64) -> anyhow::Result<()> {
    let max_lat = modes
        .iter()
        .flat_map(|m| m.latency.iter().flat_map(|l| [l.1, l.2, l.3, l.4]))
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    let mut c = ChartBuilder::on(area)
        .caption("TTFT and ITL (ms)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.15..x_max, (0.1f64..max_lat * 2.0).log_scale())
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("concurrent sequences")
        .x_labels(x_max.ceil() as usize + 1)
        .x_label_formatter(&pow2_label)
        .y_label_formatter(&|v| format!("{v}"))
        .y_desc("ms")
        .draw()
        .map_err(err)?;
    for (i, m) in modes.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let series = [
            ("TTFT p50", 1, color.stroke_width(2)),
            ("TTFT p99", 2, color.mix(0.5).stroke_width(2)),
            ("ITL p50", 3, color.stroke_width(1)),
            ("ITL p99", 4, color.mix(0.5).stroke_width(1)),
        ];
        for (label, col, style) in series {
            let pts: Vec<(f64, f64)> = m
                .latency
                .iter()
                .map(|l| ((l.0 as f64).log2(), [l.1, l.2, l.3, l.4][col - 1]))
                .filter(|p| p.1.is_finite() && p.1 > 0.0)
                .collect();
            c.draw_series(LineSeries::new(pts, style))
                .map_err(err)?
                .label(format!("{} {label}", m.name))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
        }
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 11))
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_every_panel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.png");
        let mode = |name: &str, k: f64| ModeFigures {
            name: name.into(),
            throughput: vec![(1, 40.0 * k), (8, 150.0 * k), (32, 400.0 * k)],
            steady: vec![(1, 41.0 * k), (8, 170.0 * k), (32, f64::NAN)],
            split: vec![
                ("attention".into(), 0.2),
                ("router".into(), 0.01),
                ("experts".into(), 1.5 * k),
                ("combine".into(), 0.02),
            ],
            latency: vec![(1, 10.0, 12.0, 25.0, 30.0), (32, 80.0, 120.0, 60.0, 90.0)],
        };
        write(
            &path,
            "test",
            &[mode("embedded", 1.0), mode("cluster", 0.8)],
            None,
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 10_000, "a chart, not an empty image");
    }
}

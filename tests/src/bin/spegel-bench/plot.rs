//! The chart: per phase (one row each), the pull time of every node per scenario (left) and the
//! upstream egress in images per scenario (right), for the largest image measured (each node's
//! median over `--repeat` rounds, the worst round's egress). Text is
//! drawn with a system TrueType font; without one the chart is skipped (the table has it all).

use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::Record;
use crate::phase::{Measurement, Phase, medians};
use crate::report::phase_label;

/// Fonts tried in order (Debian's `fonts-dejavu-core`, `fonts-liberation`).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

const COLORS: [RGBColor; 4] = [
    RGBColor(120, 120, 120),
    RGBColor(230, 140, 30),
    RGBColor(40, 110, 200),
    RGBColor(40, 160, 80),
];

fn register_font() -> Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| anyhow!("no TrueType font found (tried {})", FONTS.join(", ")))?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    // Registered once per process; plotters keeps a `'static` reference.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a font plotters can read"))
}

/// Draws `record` into `path` (PNG).
pub(crate) fn draw(path: &Path, record: &Record) -> Result<()> {
    register_font()?;
    let results = medians(&record.results);
    let mut phases: Vec<Phase> = Vec::new();
    for m in &results {
        if !phases.contains(&m.phase) {
            phases.push(m.phase);
        }
    }
    if phases.is_empty() {
        bail!("nothing measured");
    }
    let height = 420 * phases.len() as u32;
    let root = BitMapBackend::new(path, (1400, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let rows = root.split_evenly((phases.len(), 1));
    for (phase, row) in phases.iter().zip(&rows) {
        let (left, right) = row.split_horizontally(900);
        let ms = largest_case(&results, *phase);
        draw_pulls(&left, *phase, &ms, record.nodes).map_err(|e| anyhow!("{e}"))?;
        draw_egress(&right, *phase, &ms).map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The measurements of `phase` for its largest image (most layers on a tie), scenario order.
fn largest_case(results: &[Measurement], phase: Phase) -> Vec<&Measurement> {
    let key = results
        .iter()
        .filter(|m| m.phase == phase)
        .map(|m| (m.size_mib, m.layers))
        .max();
    results
        .iter()
        .filter(|m| m.phase == phase && Some((m.size_mib, m.layers)) == key)
        .collect()
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_pulls(
    area: &Area<'_>,
    phase: Phase,
    ms: &[&Measurement],
    nodes: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let Some(first) = ms.first() else {
        return Ok(());
    };
    let group = nodes as f64 + 1.0;
    let top = ms
        .iter()
        .flat_map(|m| m.pulls.iter().map(|p| p.secs))
        .fold(0.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "{}: pull time per node ({} MiB, {} layer(s))",
                phase_label(phase),
                first.size_mib,
                first.layers
            ),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..group * ms.len() as f64, 0.0..top.max(0.001))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_desc(format!("nodes 1–{nodes}, grouped by scenario"))
        .y_desc("seconds")
        .draw()?;
    for (i, m) in ms.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let base = i as f64 * group + 0.5;
        chart
            .draw_series(m.pulls.iter().map(|p| {
                let x = base + p.node as f64;
                Rectangle::new([(x, 0.0), (x + 0.8, p.secs)], color.filled())
            }))?
            .label(m.scenario.label())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    Ok(())
}

fn draw_egress(
    area: &Area<'_>,
    phase: Phase,
    ms: &[&Measurement],
) -> Result<(), Box<dyn std::error::Error>> {
    let top = ms.iter().map(|m| m.egress_x()).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{}: upstream egress (× image)", phase_label(phase)),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..ms.len() as f64, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_desc("scenarios, same colours as left")
        .y_desc("× image")
        .draw()?;
    for (i, m) in ms.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let x = i as f64;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.15, 0.0), (x + 0.85, m.egress_x())],
            color.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{:.2}×", m.egress_x()),
            (x + 0.3, m.egress_x() + top * 0.03),
            ("sans-serif", 16),
        )))?;
    }
    Ok(())
}

//! `report.svg`: requests per second of every run, grouped by scenario, our servers next to
//! their baselines.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::report::Report;

const OURS: RGBColor = RGBColor(31, 119, 180);
const SINGLE: RGBColor = RGBColor(127, 127, 127);
const NODE: RGBColor = RGBColor(255, 127, 14);

/// Draws one horizontal bar per run: `scenario: target`, length = requests/s.
pub(crate) fn write_svg(report: &Report, path: &Path) -> Result<()> {
    let bars: Vec<(String, f64, RGBColor)> = report
        .scenarios
        .iter()
        .flat_map(|scenario| {
            scenario.runs.iter().map(move |run| {
                let color = if run.target.starts_with("node") {
                    NODE
                } else if run.target == "single" {
                    SINGLE
                } else {
                    OURS
                };
                (format!("{}: {}", scenario.name, run.target), run.rps, color)
            })
        })
        .collect();
    let height = 120 + 26 * bars.len().max(1) as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let max = bars.iter().map(|(_, rps, _)| *rps).fold(1.0, f64::max) * 1.1;
    let count = bars.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "requests per second (blue: cluster, grey: single process, orange: Node)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(260)
        .build_cartesian_2d(0.0..max, (0..count).into_segmented())
        .map_err(draw_error)?;
    let labels: Vec<String> = bars.iter().map(|(label, _, _)| label.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(count)
        .y_label_formatter(&|segment| match segment {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("requests/s")
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, rps, color))| {
            Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*rps, SegmentValue::Exact(i + 1)),
                ],
                color.mix(0.85).filled(),
            )
        }))
        .map_err(draw_error)?;
    root.present().map_err(draw_error)?;
    Ok(())
}

fn draw_error<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("drawing the chart: {err:?}")
}

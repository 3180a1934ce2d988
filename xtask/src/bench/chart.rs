//! `report.svg`: requests per second of every run, one panel per scenario (each with its own
//! scale), our servers next to their baselines.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::report::{Report, Scenario};

const OURS: RGBColor = RGBColor(31, 119, 180);
const SINGLE: RGBColor = RGBColor(127, 127, 127);
const NODE: RGBColor = RGBColor(255, 127, 14);

const WIDTH: u32 = 900;
const PANEL_TITLE: u32 = 40;
const BAR: u32 = 28;
const AXIS: u32 = 36;

/// Draws one panel per scenario that has runs (the balance scenario repeats the dispatch
/// runs, so it is left out).
pub(crate) fn write_svg(report: &Report, path: &Path) -> Result<()> {
    let panels: Vec<&Scenario> = report
        .scenarios
        .iter()
        .filter(|scenario| !scenario.runs.is_empty() && scenario.name != "balance")
        .collect();
    let heights: Vec<u32> = panels
        .iter()
        .map(|p| PANEL_TITLE + AXIS + BAR * p.runs.len() as u32)
        .collect();
    let total: u32 = heights.iter().sum::<u32>().max(60);
    let root = SVGBackend::new(path, (WIDTH, total)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    if panels.is_empty() {
        root.draw(&Text::new(
            "no throughput scenario ran",
            (20, 20),
            ("sans-serif", 16),
        ))
        .map_err(draw_error)?;
    }
    let mut rest = root.clone();
    for (scenario, height) in panels.iter().zip(&heights) {
        let (panel, below) = rest.split_vertically(*height);
        draw_panel(&panel, scenario)?;
        rest = below;
    }
    root.present().map_err(draw_error)?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    scenario: &Scenario,
) -> Result<()> {
    // Top to bottom in the order the runs happened.
    let runs: Vec<_> = scenario.runs.iter().rev().collect();
    let max = runs.iter().map(|run| run.rps).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{}: requests/s", scenario.title),
            ("sans-serif", 15),
        )
        .margin(8)
        .x_label_area_size(22)
        .y_label_area_size(170)
        .build_cartesian_2d(0.0..max, (0..runs.len()).into_segmented())
        .map_err(draw_error)?;
    let labels: Vec<String> = runs.iter().map(|run| run.target.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(runs.len())
        .y_label_formatter(&|segment| match segment {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_formatter(&|value| format!("{value:.0}"))
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(
            Histogram::horizontal(&chart)
                .margin(5)
                .style_func(|segment, _| {
                    let target = match segment {
                        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels.get(*i),
                        SegmentValue::Last => None,
                    };
                    colour(target.map_or("", String::as_str)).mix(0.85).filled()
                })
                .data(runs.iter().enumerate().map(|(i, run)| (i, run.rps))),
        )
        .map_err(draw_error)?;
    for (i, run) in runs.iter().enumerate() {
        let label = format!("{:.0}", run.rps);
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (run.rps + max * 0.01, SegmentValue::CenterOf(i)),
                ("sans-serif", 11),
            )))
            .map_err(draw_error)?;
    }
    Ok(())
}

fn colour(target: &str) -> RGBColor {
    if target.starts_with("node") {
        NODE
    } else if super::target::is_single_label(target) {
        SINGLE
    } else {
        OURS
    }
}

fn draw_error<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("drawing the chart: {err:?}")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::bench::report::{Latency, Run};

    fn run(target: &str, rps: f64) -> Run {
        Run {
            target: target.into(),
            workers: 2,
            keep_alive: false,
            connections: 16,
            work: 0,
            seconds: 1.0,
            requests: rps as u64,
            rps,
            round_rps: vec![rps],
            latency_us: Latency {
                p50: 1,
                p90: 1,
                p99: 1,
                max: 1,
            },
            errors: BTreeMap::new(),
            per_worker: BTreeMap::new(),
            balance_max_over_min: None,
            balance: None,
            balance_not_applicable: None,
            primary_peak_rss_mib: None,
            primary_cpu_us_per_conn: None,
            round_primary_cpu_us_per_conn: Vec::new(),
            primary_cpu_ticks_min: None,
            primary_cpu_watched: false,
        }
    }

    #[test]
    fn the_chart_has_a_bar_and_a_label_per_run() {
        let mut dispatch = Scenario::new("dispatch", "Connection dispatch");
        dispatch.runs = vec![
            run("single", 10_000.0),
            run("rr 2w", 12_000.0),
            run("node rr 2w", 3_000.0),
        ];
        let mut cpu = Scenario::new("cpu", "CPU-bound");
        cpu.runs = vec![run("single", 600.0), run("rr 2w", 1_100.0)];
        let report = Report::for_tests(vec![dispatch, cpu]);
        let path = std::env::temp_dir().join(format!("xtask-chart-{}.svg", std::process::id()));
        write_svg(&report, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        if std::env::var_os("XTASK_KEEP_CHART").is_none() {
            let _ = std::fs::remove_file(&path);
        }
        for label in ["node rr 2w", "12000", "1100", "Connection dispatch"] {
            assert!(svg.contains(label), "the chart lacks {label:?}");
        }
        assert!(svg.matches("<rect").count() >= 5, "expected a bar per run");
    }
}

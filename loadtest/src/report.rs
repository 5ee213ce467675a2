//! The run's report: `summary.json`, SVG plots (throughput, latency and freshness over
//! time, consumer lag) and `report.html` that shows them with the step table.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::series::SecondSummary;

/// One line of a plot.
pub struct Line<'a> {
    pub label: &'a str,
    pub colour: RGBColor,
    pub points: Vec<(f64, f64)>,
}

pub const BLUE: RGBColor = RGBColor(59, 130, 246);
pub const ORANGE: RGBColor = RGBColor(245, 158, 11);
pub const GREEN: RGBColor = RGBColor(16, 150, 72);
pub const RED: RGBColor = RGBColor(200, 40, 40);
pub const GREY: RGBColor = RGBColor(120, 120, 120);

/// Per-second points of a stream: (second, value).
pub fn points(
    seconds: &[SecondSummary],
    value: impl Fn(&SecondSummary) -> Option<f64>,
) -> Vec<(f64, f64)> {
    seconds
        .iter()
        .filter_map(|s| value(s).map(|v| (s.second as f64, v)))
        .collect()
}

/// Draws `lines` into an SVG file; `log_y` for latencies spanning decades.
pub fn plot(
    path: &Path,
    title: &str,
    y_label: &str,
    lines: &[Line],
    log_y: bool,
) -> anyhow::Result<()> {
    let all: Vec<(f64, f64)> = lines
        .iter()
        .flat_map(|l| l.points.iter().copied())
        .collect();
    let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = all.iter().map(|p| p.1).fold(1e-3, f64::max) * 1.1;
    let y_min_log = all
        .iter()
        .map(|p| p.1)
        .filter(|v| *v > 0.0)
        .fold(f64::MAX, f64::min)
        .min(y_max / 10.0)
        .max(1e-3);
    let root = SVGBackend::new(path, (900, 320)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(64);
    if log_y {
        let mut chart = builder.build_cartesian_2d(0f64..x_max, (y_min_log..y_max).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(y_label)
            .light_line_style(WHITE)
            .draw()?;
        draw_lines(&mut chart, lines)?;
    } else {
        let mut chart = builder.build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(y_label)
            .light_line_style(WHITE)
            .draw()?;
        draw_lines(&mut chart, lines)?;
    }
    root.present()?;
    Ok(())
}

fn draw_lines<'a, Y>(
    chart: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    lines: &[Line],
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    for line in lines {
        let colour = line.colour;
        chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                colour.stroke_width(2),
            ))?
            .label(line.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(GREY)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// Writes `summary.json` and `report.html` (showing `plots`, the SVG files in `dir`).
pub fn write<T: Serialize>(
    dir: &Path,
    title: &str,
    summary: &T,
    table_html: &str,
    plots: &[&str],
) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_vec_pretty(summary)?,
    )?;
    let images: String = plots
        .iter()
        .map(|p| format!("<img src=\"{p}\" alt=\"{p}\">\n"))
        .collect();
    let machine = machine_description();
    let html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2430}}
table{{border-collapse:collapse;margin:12px 0}}th,td{{padding:5px 10px;border-bottom:1px solid #e5e7eb;text-align:right}}
th:first-child,td:first-child{{text-align:left}}img{{display:block;max-width:900px;margin:10px 0;border:1px solid #e5e7eb}}
.no{{color:#b42318}}.yes{{color:#107a48}}</style></head><body>
<h1>{title}</h1><p>{machine}. Data: <a href="summary.json">summary.json</a>.</p>
{table_html}
{images}</body></html>"#
    );
    std::fs::write(dir.join("report.html"), html)?;
    Ok(())
}

/// Cores and CPU model of this machine, for the record.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

//! `--plot FILE.svg`: a latency histogram drawn as a percentile
//! distribution (HdrHistogram style): the x axis runs to the tail in
//! decades (0 %, 90 %, 99 %, 99.9 %, ...), the y axis is latency.

use crate::hist::{Hist, human_ns};
use plotters::prelude::*;
use std::path::Path;

/// Image size in pixels.
const SIZE: (u32, u32) = (960, 540);
/// Points along the x axis.
const STEPS: usize = 600;
/// Deepest tail drawn: 99.9999 %.
const MAX_DECADES: f64 = 6.0;

/// The percentile at `x` decades into the tail, e.g. `99.9%` at 3.
fn percentile_label(x: f64) -> String {
    let pct = 100.0 * (1.0 - 10f64.powf(-x));
    let decimals = (x.round() as i64 - 2).clamp(0, 6) as usize;
    format!("{pct:.decimals$}%")
}

/// Writes the distribution of `h` to `path`; `title` names the run.
pub fn latency_svg(path: &Path, title: &str, h: &Hist) -> Result<(), String> {
    let max_ns = h.max_ns().ok_or("no latency samples to plot")?;
    // Deeper than one sample in n shows nothing but the maximum.
    let decades = (h.len() as f64).log10().clamp(1.0, MAX_DECADES);
    let (unit, div) = if max_ns >= 10_000_000 {
        ("ms", 1e6)
    } else {
        ("us", 1e3)
    };
    let mut points: Vec<(f64, f64)> = (0..=STEPS)
        .map(|i| {
            let x = decades * i as f64 / STEPS as f64;
            let q = 1.0 - 10f64.powf(-x);
            (x, h.quantile_ns(q).unwrap_or(0) as f64 / div)
        })
        .collect();
    // The curve ends at the maximum, which may lie deeper than the axis.
    points.push((decades, max_ns as f64 / div));
    let y_max = (max_ns as f64 / div).max(points.last().map_or(0.0, |p| p.1)) * 1.05;
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let caption = format!(
        "{title}: p50 {}, p99 {}, p99.9 {}, max {}, n = {}",
        human_ns(h.quantile_ns(0.5).unwrap_or(0)),
        human_ns(h.quantile_ns(0.99).unwrap_or(0)),
        human_ns(h.quantile_ns(0.999).unwrap_or(0)),
        human_ns(max_ns),
        h.len()
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 14))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..decades, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_labels(decades.ceil() as usize + 1)
        .x_label_formatter(&|x| percentile_label(*x))
        .x_desc("percentile")
        .y_desc(format!("latency ({unit})"))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_decades_as_percentiles() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(percentile_label(5.0), "99.999%");
    }

    #[test]
    fn draws_an_svg() {
        let mut h = Hist::default();
        for i in 1..=10_000u64 {
            h.record_ns(i * 1_000);
        }
        let path = std::env::temp_dir().join(format!("loadgen-plot-{}.svg", std::process::id()));
        latency_svg(&path, "test", &h).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("<polyline"), "a line series");
        assert!(svg.contains("99.9%"));
        assert!(latency_svg(&path, "empty", &Hist::default()).is_err());
    }
}

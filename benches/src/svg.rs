//! A small SVG line-chart writer: panels side by side, each with axes, "nice" ticks (linear or
//! logarithmic), a legend and one polyline with point markers per series. No dependencies;
//! the output is plain SVG 1.1 that browsers and image viewers show as it is.

use std::fmt::Write as _;

use crate::report::Report;

/// One line on a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points, drawn in the given order.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (for reference lines such as "offered").
    pub dashed: bool,
    /// A CSS colour; `None` picks one from the palette by position.
    pub color: Option<String>,
}

/// One panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Panel title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic y axis (non-positive values are drawn at the bottom).
    pub log_y: bool,
    /// The lines.
    pub series: Vec<Series>,
}

const PANEL_W: f64 = 520.0;
const PANEL_H: f64 = 400.0;
const MARGIN_L: f64 = 72.0;
const MARGIN_R: f64 = 20.0;
const MARGIN_B: f64 = 56.0;
const LEGEND_TOP: f64 = 30.0;
const LEGEND_LINE: f64 = 14.0;
/// The palette, by position.
pub const COLORS: [&str; 8] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// Escapes text for SVG character data and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Linear ticks covering `[lo, hi]`: multiples of 1, 2 or 5 × 10^k, about `target` of them.
/// Returns (ticks, axis low, axis high); the axis is widened to whole ticks.
pub fn linear_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64, f64) {
    let (lo, hi) = if !(lo.is_finite() && hi.is_finite()) {
        (0.0, 1.0)
    } else if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        (lo - 1.0_f64.max(lo.abs() * 0.1), hi + 1.0_f64.max(hi.abs() * 0.1))
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step =
        [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(mag * 10.0);
    let start = (lo / step).floor() * step;
    let end = (hi / step).ceil() * step;
    let n = ((end - start) / step).round() as usize;
    let ticks = (0..=n).map(|i| start + step * i as f64).collect();
    (ticks, start, end)
}

/// Logarithmic ticks (powers of ten) covering `[lo, hi]`, both positive.
pub fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, f64, f64) {
    let lo = if lo.is_finite() && lo > 0.0 { lo } else { 1.0 };
    let hi = if hi.is_finite() && hi > lo { hi } else { lo * 10.0 };
    let a = lo.log10().floor() as i32;
    let b = (hi.log10().ceil() as i32).max(a + 1);
    let ticks = (a..=b).map(|e| 10f64.powi(e)).collect();
    (ticks, 10f64.powi(a), 10f64.powi(b))
}

/// Formats a tick label: 12k, 1.5M, 0.01.
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        trim(format!("{:.2}", v / 1e6)) + "M"
    } else if a >= 1e3 {
        trim(format!("{:.2}", v / 1e3)) + "k"
    } else if a >= 1.0 || a == 0.0 {
        trim(format!("{v:.2}"))
    } else {
        trim(format!("{v:.4}"))
    }
}

fn trim(s: String) -> String {
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_owned() } else { s }
}

/// Renders the panels side by side under one title.
pub fn render(title: &str, charts: &[Chart]) -> String {
    let width = PANEL_W * charts.len().max(1) as f64;
    let height = PANEL_H + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    // Room for the longest legend above every panel, so that panels line up.
    let legend = charts.iter().map(|c| c.series.len()).max().unwrap_or(0) as f64;
    let margin_top = LEGEND_TOP + LEGEND_LINE * legend + 10.0;
    for (i, chart) in charts.iter().enumerate() {
        render_panel(&mut s, chart, PANEL_W * i as f64, 30.0, margin_top);
    }
    s.push_str("</svg>\n");
    s
}

fn render_panel(s: &mut String, chart: &Chart, ox: f64, oy: f64, margin_top: f64) {
    let (x0, x1) = (ox + MARGIN_L, ox + PANEL_W - MARGIN_R);
    let (y0, y1) = (oy + PANEL_H - MARGIN_B, oy + margin_top.min(PANEL_H - MARGIN_B - 80.0)); // y0 is the bottom
    let points = chart.series.iter().flat_map(|sr| sr.points.iter());
    let (mut xmin, mut xmax, mut ymin, mut ymax) =
        (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        if x.is_finite() {
            xmin = xmin.min(x);
            xmax = xmax.max(x);
        }
        if y.is_finite() && (!chart.log_y || y > 0.0) {
            ymin = ymin.min(y);
            ymax = ymax.max(y);
        }
    }
    let (xticks, xa, xb) = linear_ticks(xmin.min(0.0), xmax, 5);
    let (yticks, ya, yb) =
        if chart.log_y { log_ticks(ymin, ymax) } else { linear_ticks(ymin.min(0.0), ymax, 5) };
    let sx = |x: f64| x0 + (x - xa) / (xb - xa) * (x1 - x0);
    let sy = |y: f64| {
        let f = if chart.log_y {
            if y > 0.0 { (y.log10() - ya.log10()) / (yb.log10() - ya.log10()) } else { 0.0 }
        } else {
            (y - ya) / (yb - ya)
        };
        y0 - f.clamp(-0.05, 1.05) * (y0 - y1)
    };

    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"#,
        (x0 + x1) / 2.0,
        oy + 18.0,
        escape(&chart.title)
    );
    // Grid and tick labels.
    for &t in &xticks {
        let x = sx(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y0:.1}" x2="{x:.1}" y2="{y1:.1}" stroke="#e0e0e0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            y0 + 16.0,
            tick_label(t)
        );
    }
    for &t in &yticks {
        let y = sy(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x0:.1}" y1="{y:.1}" x2="{x1:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 6.0,
            y + 4.0,
            tick_label(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{x0:.1}" y="{y1:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="black"/>"#,
        x1 - x0,
        y0 - y1
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        y0 + 36.0,
        escape(&chart.x_label)
    );
    let (lx, ly) = (ox + 16.0, (y0 + y1) / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle" transform="rotate(-90 {lx:.1} {ly:.1})">{}</text>"#,
        escape(&chart.y_label)
    );
    // Series and legend.
    for (i, series) in chart.series.iter().enumerate() {
        let color = series.color.as_deref().unwrap_or(COLORS[i % COLORS.len()]);
        let pts: Vec<String> = series
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let dash = if series.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
            pts.join(" ")
        );
        for p in &pts {
            if let Some((x, y)) = p.split_once(',') {
                let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
            }
        }
        let ly = oy + LEGEND_TOP + LEGEND_LINE * i as f64;
        let lx = x0 + 8.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(&series.name)
        );
    }
}

/// The load generator's plot: offered vs delivered rate, and p50/p99 latency, per step.
pub fn report_charts(report: &Report) -> Vec<Chart> {
    let offered: Vec<(f64, f64)> =
        report.steps.iter().map(|s| (s.offered_rate as f64, s.offered_rate as f64)).collect();
    let delivered: Vec<(f64, f64)> =
        report.steps.iter().map(|s| (s.offered_rate as f64, s.delivered_rate)).collect();
    let with_latency = report.steps.iter().filter(|s| s.latency.count > 0);
    let p50: Vec<(f64, f64)> = with_latency
        .clone()
        .map(|s| (s.offered_rate as f64, s.latency.p50_us as f64 / 1e3))
        .collect();
    let p99: Vec<(f64, f64)> =
        with_latency.map(|s| (s.offered_rate as f64, s.latency.p99_us as f64 / 1e3)).collect();
    vec![
        Chart {
            title: "Throughput".into(),
            x_label: "offered rate (msg/s)".into(),
            y_label: "msg/s".into(),
            log_y: false,
            series: vec![
                Series {
                    name: "offered".into(),
                    points: offered,
                    dashed: true,
                    color: Some("#7f7f7f".into()),
                },
                Series {
                    name: "delivered".into(),
                    points: delivered,
                    dashed: false,
                    color: Some(COLORS[0].into()),
                },
            ],
        },
        Chart {
            title: "Latency (device → delivery counter)".into(),
            x_label: "offered rate (msg/s)".into(),
            y_label: "ms".into(),
            log_y: true,
            series: vec![
                Series {
                    name: "p50".into(),
                    points: p50,
                    dashed: false,
                    color: Some(COLORS[2].into()),
                },
                Series {
                    name: "p99".into(),
                    points: p99,
                    dashed: false,
                    color: Some(COLORS[1].into()),
                },
            ],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(series: Vec<Series>, log_y: bool) -> Chart {
        Chart {
            title: "t <&> \"q\"".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_y,
            series,
        }
    }

    #[test]
    fn nice_linear_ticks() {
        let (t, lo, hi) = linear_ticks(0.0, 87_000.0, 5);
        assert_eq!((lo, hi), (0.0, 100_000.0));
        assert_eq!(t, vec![0.0, 20_000.0, 40_000.0, 60_000.0, 80_000.0, 100_000.0]);
        let (t, lo, hi) = linear_ticks(5.0, 5.0, 5);
        assert!(lo < 5.0 && hi > 5.0 && t.len() >= 2, "{t:?}");
        let (t, _, _) = linear_ticks(f64::INFINITY, f64::NEG_INFINITY, 5);
        assert!(t.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn log_ticks_cover_decades() {
        let (t, lo, hi) = log_ticks(0.25, 37.0);
        assert_eq!(t, vec![0.1, 1.0, 10.0, 100.0]);
        assert_eq!((lo, hi), (0.1, 100.0));
        let (t, _, _) = log_ticks(f64::INFINITY, f64::NEG_INFINITY);
        assert_eq!(t, vec![1.0, 10.0]);
    }

    #[test]
    fn labels() {
        assert_eq!(tick_label(20_000.0), "20k");
        assert_eq!(tick_label(1_500_000.0), "1.5M");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(0.01), "0.01");
    }

    #[test]
    fn renders_well_formed_svg_with_escaped_text() {
        let svg = render(
            "a & b",
            &[
                chart(
                    vec![
                        Series {
                            name: "s<1>".into(),
                            points: vec![(1.0, 2.0), (2.0, 4.0)],
                            dashed: true,
                            color: None,
                        },
                        Series {
                            name: "s2".into(),
                            points: vec![(1.0, 1.0), (2.0, f64::NAN)],
                            dashed: false,
                            color: Some("#123456".into()),
                        },
                    ],
                    false,
                ),
                chart(
                    vec![Series {
                        name: "p99".into(),
                        points: vec![(1.0, 0.0), (3.0, 12.0)],
                        dashed: false,
                        color: None,
                    }],
                    true,
                ),
            ],
        );
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &amp; b") && svg.contains("s&lt;1&gt;"));
        assert!(svg.contains("t &lt;&amp;&gt; &quot;q&quot;"));
        assert!(svg.contains("stroke=\"#123456\""), "an explicit colour is used");
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        // 2 + 1 (the NaN point is left out) + 2 markers.
        assert_eq!(svg.matches("<circle").count(), 5);
        assert_eq!(svg.matches("stroke-dasharray").count(), 2); // line and legend
        // Every element that is opened is closed.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }

    #[test]
    fn empty_charts_render() {
        let svg = render("nothing", &[chart(vec![], false), chart(vec![], true)]);
        assert!(svg.contains("</svg>") && !svg.contains("NaN"));
    }

    #[test]
    fn report_plot_has_both_panels() {
        let mut r = Report::default();
        for (i, rate) in [10_000u64, 20_000].into_iter().enumerate() {
            r.steps.push(crate::report::StepReport {
                index: i,
                offered_rate: rate,
                delivered_rate: rate as f64 * 0.99,
                latency: crate::report::LatencySummary {
                    count: 10,
                    p50_us: 800,
                    p99_us: 4_000,
                    ..Default::default()
                },
                ..Default::default()
            });
        }
        let charts = report_charts(&r);
        assert_eq!(charts.len(), 2);
        assert_eq!(charts[1].series[1].points, vec![(10_000.0, 4.0), (20_000.0, 4.0)]);
        assert!(render("run", &charts).contains("delivered"));
    }
}

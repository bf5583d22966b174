//! The result's files beside the JSON: a CSV (one row per step and a total row) and a
//! self-contained HTML report (no scripts, no external resources: inline SVG plots of rate,
//! latency percentiles, loss and CPU over time and per step, with the run's metadata,
//! failures, thresholds and step table).

use std::fmt::Write as _;

use crate::report::{Report, StepReport};
use crate::svg::{COLORS, Chart, Series, escape, render};

/// Names of the watched processes, in order of first appearance.
fn process_names(report: &Report) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for st in report.steps.iter().chain(std::iter::once(&report.totals)) {
        for p in &st.processes {
            if !names.contains(&p.name) {
                names.push(p.name.clone());
            }
        }
    }
    names
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// One row per step and a `total` row; latencies in ms; per watched process its CPU seconds,
/// CPU seconds per million delivered and resident memory.
pub fn csv(report: &Report) -> String {
    let names = process_names(report);
    let mut s = String::from(
        "step,offered_rate,seconds,scheduled,skipped,attempted,sent,backpressure_window,\
         backpressure_buffer,dropped_closed,acked,ack_errors,responded,errors,delivered,lost,\
         loss_ratio,sent_rate,delivered_rate,p50_ms,p90_ms,p99_ms,p999_ms,max_ms,rtt_p50_ms,\
         rtt_p99_ms,rtt_max_ms,failures,failure_kinds,generator_limited",
    );
    for n in &names {
        for col in ["cpu_s", "cpu_s_per_m", "rss_kib"] {
            let _ = write!(s, ",{}", csv_field(&format!("{n}_{col}")));
        }
    }
    s.push('\n');
    let ms = |us: u64| us as f64 / 1e3;
    for st in report.steps.iter().chain(std::iter::once(&report.totals)) {
        let label =
            if st.index == report.steps.len() { "total".to_owned() } else { st.index.to_string() };
        let kinds: Vec<String> = st.failures.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = write!(
            s,
            "{label},{},{:.3},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.6},{:.1},{:.1},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{}",
            st.offered_rate,
            st.seconds,
            st.scheduled,
            st.skipped,
            st.attempted,
            st.sent,
            st.backpressure_window,
            st.backpressure_buffer,
            st.dropped_closed,
            st.acked,
            st.ack_errors,
            st.responded,
            st.errors,
            st.delivered,
            st.lost,
            st.loss_ratio,
            st.sent_rate,
            st.delivered_rate,
            ms(st.latency.p50_us),
            ms(st.latency.p90_us),
            ms(st.latency.p99_us),
            ms(st.latency.p999_us),
            ms(st.latency.max_us),
            ms(st.rtt.p50_us),
            ms(st.rtt.p99_us),
            ms(st.rtt.max_us),
            st.failure_count(),
            csv_field(&kinds.join(";")),
            st.generator_limited,
        );
        for n in &names {
            match st.processes.iter().find(|p| &p.name == n) {
                Some(p) => {
                    let per_m = st.cpu_secs_per_million(n).map(|v| format!("{v:.3}"));
                    let _ = write!(
                        s,
                        ",{:.3},{},{}",
                        p.cpu_secs,
                        per_m.unwrap_or_default(),
                        p.rss_kib.map(|v| v.to_string()).unwrap_or_default()
                    );
                }
                None => s.push_str(",,,"),
            }
        }
        s.push('\n');
    }
    s
}

fn series(name: &str, points: Vec<(f64, f64)>, color: usize, dashed: bool) -> Series {
    Series { name: name.into(), points, dashed, color: Some(COLORS[color % COLORS.len()].into()) }
}

/// The report's plots: over time (rates, latency, CPU) and per step (latency percentiles, device
/// round trip, loss).
pub fn charts(report: &Report) -> Vec<Chart> {
    let tl = &report.timeline;
    let over_time = |f: &dyn Fn(&crate::report::Sample) -> f64| -> Vec<(f64, f64)> {
        tl.iter().map(|s| (s.t, f(s))).collect()
    };
    let mut out = vec![Chart {
        title: "Rate over time".into(),
        x_label: "seconds".into(),
        y_label: "msg/s".into(),
        log_y: false,
        series: vec![
            series("sent", over_time(&|s| s.sent_rate), 7, true),
            series("delivered", over_time(&|s| s.delivered_rate), 0, false),
            series("acked", over_time(&|s| s.acked_rate), 2, false),
            series("failures", over_time(&|s| s.failure_rate), 1, false),
        ],
    }];
    out.push(Chart {
        title: "Delivery latency over time (per second)".into(),
        x_label: "seconds".into(),
        y_label: "ms".into(),
        log_y: true,
        series: vec![
            series("p50", over_time(&|s| s.p50_ms), 2, false),
            series("p99", over_time(&|s| s.p99_ms), 1, false),
        ],
    });
    let names = process_names(report);
    if !names.is_empty() {
        out.push(Chart {
            title: "CPU over time".into(),
            x_label: "seconds".into(),
            y_label: "% of one core".into(),
            log_y: false,
            series: names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    series(n, over_time(&|s| s.cpu_pct.get(n).copied().unwrap_or(0.0)), i, false)
                })
                .collect(),
        });
    }
    let per_step = |f: &dyn Fn(&StepReport) -> Option<f64>| -> Vec<(f64, f64)> {
        report.steps.iter().filter_map(|s| Some((s.offered_rate as f64, f(s)?))).collect()
    };
    let lat = |pick: fn(&StepReport) -> u64| {
        per_step(&move |s: &StepReport| (s.latency.count > 0).then(|| pick(s) as f64 / 1e3))
    };
    let rtt = |pick: fn(&StepReport) -> u64| {
        per_step(&move |s: &StepReport| (s.rtt.count > 0).then(|| pick(s) as f64 / 1e3))
    };
    out.push(Chart {
        title: "Latency percentiles per step".into(),
        x_label: "offered rate (msg/s)".into(),
        y_label: "ms".into(),
        log_y: true,
        series: vec![
            series("p50 delivery", lat(|s| s.latency.p50_us), 2, false),
            series("p90 delivery", lat(|s| s.latency.p90_us), 0, false),
            series("p99 delivery", lat(|s| s.latency.p99_us), 1, false),
            series("p99.9 delivery", lat(|s| s.latency.p999_us), 4, false),
            series("p50 round trip", rtt(|s| s.rtt.p50_us), 2, true),
            series("p99 round trip", rtt(|s| s.rtt.p99_us), 1, true),
        ],
    });
    out.push(Chart {
        title: "Loss per step".into(),
        x_label: "offered rate (msg/s)".into(),
        y_label: "% of offered".into(),
        log_y: false,
        series: vec![
            series("loss", per_step(&|s| Some(s.loss_ratio * 100.0)), 1, false),
            series(
                "failures",
                per_step(&|s| Some(s.failure_count() as f64 * 100.0 / (s.attempted.max(1)) as f64)),
                3,
                true,
            ),
        ],
    });
    out.extend(crate::svg::report_charts(report).into_iter().take(1));
    out
}

/// `2026-11-30 01:02:03 UTC` from Unix milliseconds.
pub fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem / 60 % 60, rem % 60)
}

fn row(s: &mut String, key: &str, value: &str) {
    let _ = writeln!(s, "<tr><th>{}</th><td>{}</td></tr>", escape(key), escape(value));
}

/// The self-contained HTML report.
pub fn html(report: &Report) -> String {
    let st = &report.settings;
    let title = format!(
        "fleetgate-loadgen {} {} QoS {} → {} — run {}",
        st.target, st.transport, st.qos, st.address, report.run_id
    );
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
body{{font-family:sans-serif;margin:1.5em;color:#222}}table{{border-collapse:collapse;margin:0.5em 0 1.5em}}\
th,td{{border:1px solid #ccc;padding:2px 8px;text-align:right}}th{{background:#f4f4f4}}\
table.meta th,table.meta td{{text-align:left}}.bad{{color:#b00;font-weight:bold}}.ok{{color:#070}}\
figure{{display:inline-block;margin:0.5em}}</style></head><body>",
        escape(&title)
    );
    let _ = writeln!(s, "<h1>{}</h1>", escape(&title));
    if let Some(why) = &report.interrupted {
        let _ = writeln!(
            s,
            "<p class=\"bad\">Partial result: the run was stopped early ({}); its last step may be cut short.</p>",
            escape(why)
        );
    }
    s.push_str("<h2>Run</h2>\n<table class=\"meta\">\n");
    row(&mut s, "run id", &report.run_id);
    row(&mut s, "command", &report.command);
    row(&mut s, "started", &utc(report.started_unix_ms));
    row(&mut s, "finished", &utc(report.finished_unix_ms));
    if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(st) {
        for (k, v) in map {
            row(&mut s, &k, &v.to_string());
        }
    }
    let c = &report.connect;
    row(
        &mut s,
        "connections",
        &format!(
            "{} of {} in {:.1} s, {} failed{}",
            c.connected,
            c.requested,
            c.seconds,
            c.failed,
            c.first_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default()
        ),
    );
    row(&mut s, "connections lost", &report.connections_lost.to_string());
    row(
        &mut s,
        "other deliveries seen",
        &format!(
            "{} of other runs, {} not the generator's",
            report.other_run_deliveries, report.foreign_deliveries
        ),
    );
    if let Some(m) = &report.msr {
        row(
            &mut s,
            "MSR",
            &format!(
                "{} msg/s{}{}",
                m.rate,
                if m.lower_bound { " (lower bound: the highest step held)" } else { "" },
                if m.generator_limited_above {
                    " (a higher step was generator-limited)"
                } else {
                    ""
                }
            ),
        );
    }
    s.push_str("</table>\n");

    if !report.thresholds.is_empty() {
        s.push_str("<h2>Thresholds</h2>\n<table class=\"meta\"><tr><th>--fail-if</th><th>value</th><th>result</th></tr>\n");
        for t in &report.thresholds {
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                escape(&t.expr),
                t.value.map_or_else(|| "none".into(), |v| format!("{v}")),
                if t.failed { "bad" } else { "ok" },
                if t.failed { "FAILED" } else { "passed" }
            );
        }
        s.push_str("</table>\n");
    }

    let failures = &report.totals.failures;
    if !failures.is_empty() || !report.connect.failures.is_empty() {
        s.push_str("<h2>Failures</h2>\n<table class=\"meta\"><tr><th>kind</th><th>count</th><th>first reason given</th></tr>\n");
        for (k, v) in failures.iter().chain(report.connect.failures.iter()) {
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td>{v}</td><td>{}</td></tr>",
                escape(k),
                escape(report.failure_examples.get(k).map_or("", String::as_str))
            );
        }
        s.push_str("</table>\n");
    }

    s.push_str("<h2>Plots</h2>\n");
    for chart in charts(report) {
        let _ = writeln!(s, "<figure>{}</figure>", render("", std::slice::from_ref(&chart)));
    }

    s.push_str("<h2>Steps</h2>\n<table><tr><th>step</th><th>offered/s</th><th>s</th><th>sent</th><th>acked</th><th>delivered</th><th>lost</th><th>loss %</th><th>failures</th><th>p50 ms</th><th>p99 ms</th><th>max ms</th><th>rtt p50 ms</th><th>rtt p99 ms</th>");
    let names = process_names(report);
    for n in &names {
        let _ = write!(s, "<th>{} cpu-s/M</th>", escape(n));
    }
    s.push_str("<th>generator-limited</th></tr>\n");
    for st in report.steps.iter().chain(std::iter::once(&report.totals)) {
        let ms = |us: u64| format!("{:.2}", us as f64 / 1e3);
        let label =
            if st.index == report.steps.len() { "total".to_owned() } else { st.index.to_string() };
        let _ = write!(
            s,
            "<tr><td>{label}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            st.offered_rate,
            st.seconds,
            st.sent,
            st.acked,
            st.delivered,
            st.lost,
            st.loss_ratio * 100.0,
            st.failure_count(),
            ms(st.latency.p50_us),
            ms(st.latency.p99_us),
            ms(st.latency.max_us),
            ms(st.rtt.p50_us),
            ms(st.rtt.p99_us),
        );
        for n in &names {
            let v = st.cpu_secs_per_million(n).map_or_else(|| "-".into(), |v| format!("{v:.2}"));
            let _ = write!(s, "<td>{v}</td>");
        }
        let _ = writeln!(s, "<td>{}</td></tr>", if st.generator_limited { "yes" } else { "" });
    }
    s.push_str("</table>\n</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{LatencySummary, ProcessUsage, Sample};

    fn sample_report() -> Report {
        let mut r = Report { run_id: "ab12".into(), ..Default::default() };
        for i in 0..2 {
            r.steps.push(StepReport {
                index: i,
                offered_rate: 100 * (i as u64 + 1),
                attempted: 100,
                delivered: 99,
                lost: 1,
                loss_ratio: 0.01,
                latency: LatencySummary {
                    count: 99,
                    p50_us: 900,
                    p99_us: 4_000,
                    ..Default::default()
                },
                failures: [("mqtt /error 401".to_owned(), 1)].into_iter().collect(),
                processes: vec![ProcessUsage {
                    name: "a,b".into(),
                    cpu_secs: 0.1,
                    ..Default::default()
                }],
                ..Default::default()
            });
            r.timeline.push(Sample {
                t: i as f64,
                sent_rate: 100.0,
                p99_ms: 4.0,
                cpu_pct: [("a,b".to_owned(), 12.5)].into_iter().collect(),
                ..Default::default()
            });
        }
        r.totals = StepReport { index: 2, ..Default::default() };
        r.failure_examples.insert("mqtt /error 401".into(), "unknown <token>".into());
        r.totals.failures.insert("mqtt /error 401".into(), 2);
        r.interrupted = Some("SIGINT".into());
        r
    }

    #[test]
    fn csv_has_a_row_per_step_and_a_total() {
        let text = csv(&sample_report());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let cols = lines[0].split(',').count();
        assert!(
            lines[0].ends_with(",\"a,b_cpu_s\",\"a,b_cpu_s_per_m\",\"a,b_rss_kib\""),
            "{}",
            lines[0]
        );
        assert!(lines[1].starts_with("0,100,"));
        assert!(lines[1].contains(",mqtt /error 401=1,"));
        assert!(lines[3].starts_with("total,"));
        // Quoted fields aside, every row has as many columns as the header.
        for l in &lines[1..] {
            assert_eq!(l.split(',').count() + 3, cols, "{l}");
        }
    }

    #[test]
    fn html_is_self_contained_with_plots_and_metadata() {
        let page = html(&sample_report());
        assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
        assert!(!page.contains("<script") && !page.contains("src=") && !page.contains("href="));
        assert!(page.contains("Partial result") && page.contains("SIGINT"));
        assert!(page.contains("unknown &lt;token&gt;"));
        assert!(page.contains("run id") && page.contains("ab12"));
        for title in [
            "Rate over time",
            "latency over time",
            "CPU over time",
            "Latency percentiles",
            "Loss per step",
        ] {
            assert!(page.contains(title), "{title}");
        }
        assert_eq!(page.matches("<svg").count(), page.matches("</svg>").count());
        assert!(page.matches("<svg").count() >= 6);
        assert!(!page.contains("NaN"));
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_000_000_123), "2026-11-30 00:53:20 UTC");
    }
}

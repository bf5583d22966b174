//! `--fail-if` thresholds: `METRIC OP VALUE` (e.g. `p99_ms>50`, `loss_pct>=0.1`,
//! `failures>0`), checked against the whole run's totals; a run that crosses any of them exits
//! with status 1, so that CI can gate on it.
//!
//! Metrics (whole run):
//!
//! | name | meaning |
//! |---|---|
//! | `p50_ms` `p90_ms` `p99_ms` `p999_ms` `max_ms` `mean_ms` | device → delivery counter latency |
//! | `rtt_p50_ms` `rtt_p99_ms` `rtt_max_ms` | device round trip (PUBACK, HTTP response, CoAP response) |
//! | `loss_ratio` `loss_pct` `lost` | offered minus delivered (signed) |
//! | `sent` `delivered` `attempted` `acked` | message counts |
//! | `sent_rate` `delivered_rate` | per second over the run |
//! | `failures` | every failure the devices saw (`/error`, error statuses, lost connections) |
//! | `ack_errors` `errors` | error acknowledgements; MQTT `/error` responses |
//! | `backpressure` `skipped` | not sent: window or buffer full; generator behind |
//! | `connect_failed` `connections_lost` | connections that failed to open; that closed |
//! | `msr` | maximum sustainable rate, msg/s |
//! | `generator_limited` | 1 when any step was generator-limited |
//! | `other_runs` | other runs' messages the delivery counter saw |
//!
//! Operators: `>`, `>=`, `<`, `<=`, `==`, `!=`. A metric without a value (no latency recorded)
//! fails every threshold on it: a run that measured nothing has not passed.

use crate::report::{Report, ThresholdResult};

/// Every metric name, in the order of the table above.
pub const METRICS: &[&str] = &[
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "max_ms",
    "mean_ms",
    "rtt_p50_ms",
    "rtt_p99_ms",
    "rtt_max_ms",
    "loss_ratio",
    "loss_pct",
    "lost",
    "sent",
    "delivered",
    "attempted",
    "acked",
    "sent_rate",
    "delivered_rate",
    "failures",
    "ack_errors",
    "errors",
    "backpressure",
    "skipped",
    "connect_failed",
    "connections_lost",
    "msr",
    "generator_limited",
    "other_runs",
];

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Op {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }
}

/// A parsed `--fail-if`.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// As given.
    pub expr: String,
    /// The metric.
    pub metric: &'static str,
    /// The comparison.
    pub op: Op,
    /// The value compared with.
    pub value: f64,
}

impl std::str::FromStr for Threshold {
    type Err = String;

    fn from_str(expr: &str) -> Result<Self, String> {
        let compact: String = expr.chars().filter(|c| !c.is_whitespace()).collect();
        let at = compact.find(['>', '<', '=', '!']).ok_or_else(|| {
            format!("--fail-if {expr:?}: expected METRIC OP VALUE, e.g. p99_ms>50")
        })?;
        let (name, rest) = compact.split_at(at);
        let (op, value) = [
            (">=", Op::Ge),
            ("<=", Op::Le),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            (">", Op::Gt),
            ("<", Op::Lt),
        ]
        .into_iter()
        .find_map(|(s, op)| rest.strip_prefix(s).map(|v| (op, v)))
        .ok_or_else(|| format!("--fail-if {expr:?}: unknown operator (>, >=, <, <=, ==, !=)"))?;
        let metric = METRICS.iter().copied().find(|m| *m == name).ok_or_else(|| {
            format!("--fail-if {expr:?}: unknown metric {name:?} (known: {})", METRICS.join(", "))
        })?;
        let value: f64 = value
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| format!("--fail-if {expr:?}: {value:?} is not a number"))?;
        Ok(Threshold { expr: expr.trim().to_owned(), metric, op, value })
    }
}

/// The value of `metric` in `report` (whole run), `None` when the run has none.
pub fn metric(report: &Report, metric: &str) -> Option<f64> {
    let t = &report.totals;
    let ms = |us: u64, count: u64| (count > 0).then_some(us as f64 / 1e3);
    let lat = &t.latency;
    let rtt = &t.rtt;
    Some(match metric {
        "p50_ms" => ms(lat.p50_us, lat.count)?,
        "p90_ms" => ms(lat.p90_us, lat.count)?,
        "p99_ms" => ms(lat.p99_us, lat.count)?,
        "p999_ms" => ms(lat.p999_us, lat.count)?,
        "max_ms" => ms(lat.max_us, lat.count)?,
        "mean_ms" => (lat.count > 0).then_some(lat.mean_us / 1e3)?,
        "rtt_p50_ms" => ms(rtt.p50_us, rtt.count)?,
        "rtt_p99_ms" => ms(rtt.p99_us, rtt.count)?,
        "rtt_max_ms" => ms(rtt.max_us, rtt.count)?,
        "loss_ratio" => t.loss_ratio,
        "loss_pct" => t.loss_ratio * 100.0,
        "lost" => t.lost as f64,
        "sent" => t.sent as f64,
        "delivered" => t.delivered as f64,
        "attempted" => t.attempted as f64,
        "acked" => t.acked as f64,
        "sent_rate" => t.sent_rate,
        "delivered_rate" => t.delivered_rate,
        "failures" => t.failure_count() as f64,
        "ack_errors" => t.ack_errors as f64,
        "errors" => t.errors as f64,
        "backpressure" => (t.backpressure_window + t.backpressure_buffer) as f64,
        "skipped" => t.skipped as f64,
        "connect_failed" => report.connect.failed as f64,
        "connections_lost" => report.connections_lost as f64,
        "msr" => report.msr.as_ref().map_or(0.0, |m| m.rate as f64),
        "generator_limited" => {
            f64::from(u8::from(report.steps.iter().any(|s| s.generator_limited)))
        }
        "other_runs" => report.other_run_deliveries as f64,
        _ => return None,
    })
}

/// Checks every threshold against `report`, recording the results in it; whether any failed.
pub fn apply(report: &mut Report, thresholds: &[Threshold]) -> bool {
    report.thresholds = thresholds
        .iter()
        .map(|th| {
            let value = metric(report, th.metric);
            ThresholdResult {
                expr: th.expr.clone(),
                value,
                failed: value.is_none_or(|v| th.op.holds(v, th.value)),
            }
        })
        .collect();
    report.thresholds.iter().any(|t| t.failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::LatencySummary;

    #[test]
    fn parses_metric_op_value() {
        let t: Threshold = "p99_ms>50".parse().expect("valid");
        assert_eq!((t.metric, t.op, t.value), ("p99_ms", Op::Gt, 50.0));
        let t: Threshold = " loss_pct >= 0.1 ".parse().expect("valid");
        assert_eq!((t.metric, t.op, t.value), ("loss_pct", Op::Ge, 0.1));
        for (s, op) in
            [("lost<=0", Op::Le), ("lost<1", Op::Lt), ("lost==0", Op::Eq), ("lost!=0", Op::Ne)]
        {
            assert_eq!(s.parse::<Threshold>().map(|t| t.op), Ok(op), "{s}");
        }
        for bad in ["p99_ms", "p98_ms>1", "p99_ms>>1", "p99_ms>x", "p99_ms>inf", ">5", "p99_ms=5"] {
            assert!(bad.parse::<Threshold>().is_err(), "{bad}");
        }
    }

    #[test]
    fn every_metric_has_a_value_and_thresholds_decide() {
        let mut r = Report::default();
        r.totals.latency = LatencySummary { count: 10, p99_us: 60_000, ..Default::default() };
        r.totals.rtt = LatencySummary { count: 10, p50_us: 2_000, ..Default::default() };
        r.totals.attempted = 100;
        r.totals.delivered = 98;
        r.totals.lost = 2;
        r.totals.loss_ratio = 0.02;
        r.totals.failures.insert("mqtt /error 401".into(), 3);
        for m in METRICS {
            assert!(metric(&r, m).is_some(), "{m}");
        }
        assert_eq!(metric(&r, "p99_ms"), Some(60.0));
        assert_eq!(metric(&r, "loss_pct"), Some(2.0));
        assert_eq!(metric(&r, "failures"), Some(3.0));
        let parse = |s: &str| s.parse::<Threshold>().expect("valid");
        assert!(!apply(&mut r, &[parse("p99_ms>100"), parse("rtt_p50_ms<1")]));
        assert!(apply(&mut r, &[parse("p99_ms>100"), parse("failures>0")]));
        assert_eq!(r.thresholds.iter().map(|t| t.failed).collect::<Vec<_>>(), vec![false, true]);
        // No latency recorded: a latency threshold fails.
        r.totals.latency = LatencySummary::default();
        assert!(apply(&mut r, &[parse("p99_ms>100")]));
        assert_eq!(r.thresholds[0].value, None);
    }
}

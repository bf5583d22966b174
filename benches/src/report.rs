//! The load generator's result: what it was asked to do, what happened in each step, and the
//! maximum sustainable rate (MSR) of the run. Written as JSON (read back by the comparison
//! runner and by `fleetgate-loadgen merge`), CSV and HTML.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min_us: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

impl LatencySummary {
    /// The summary of `h` (all zero when it is empty).
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            min_us: h.min(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// CPU and memory of a watched process (the system under test, nats-server) during a step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessUsage {
    /// The name it was watched under (`sut`, `nats`, or the process name).
    pub name: String,
    /// Its pid (the first, when a name matched several processes).
    pub pid: u32,
    /// Every pid watched under this name (their CPU and memory are summed).
    #[serde(default)]
    pub pids: Vec<u32>,
    /// User plus system CPU seconds used during the step.
    pub cpu_secs: f64,
    /// Resident memory at the end of the step, KiB.
    pub rss_kib: Option<u64>,
}

/// One step of a load run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Position in the run, from 0.
    pub index: usize,
    /// The offered rate asked for, messages per second over all devices.
    pub offered_rate: u64,
    /// Step length.
    pub seconds: f64,
    /// Messages the schedule asked for.
    pub scheduled: u64,
    /// Scheduled messages the generator could not offer (it fell behind).
    pub skipped: u64,
    /// Offered: scheduled minus skipped.
    pub attempted: u64,
    /// Written (or queued to be written) to a device connection.
    pub sent: u64,
    /// QoS 1: not sent because the connection's in-flight window was full.
    pub backpressure_window: u64,
    /// Not sent because the connection's write buffer was full (the peer did not read).
    pub backpressure_buffer: u64,
    /// Not sent because the connection had closed.
    pub dropped_closed: u64,
    /// PUBACKs received while the step ran.
    pub acked: u64,
    /// PUBACKs with an error reason code.
    pub ack_errors: u64,
    /// `/status` responses received while the step ran.
    pub responded: u64,
    /// `/error` responses received while the step ran.
    pub errors: u64,
    /// Messages of this step that reached the delivery counter (after the drain).
    pub delivered: u64,
    /// Offered minus delivered; never floored: negative when more of this run's messages
    /// arrived than were offered (duplicates, e.g. QoS 1 redelivery).
    pub lost: i64,
    /// `lost / attempted`.
    pub loss_ratio: f64,
    /// Sent per second.
    pub sent_rate: f64,
    /// Delivered per second.
    pub delivered_rate: f64,
    /// Device → delivery counter latency of this step's messages.
    pub latency: LatencySummary,
    /// Device round trips (MQTT PUBACK, HTTP response, CoAP response) that ended in this step.
    #[serde(default)]
    pub rtt: LatencySummary,
    /// Failures the devices saw in this step, by kind (`mqtt /error 401`, `http 503`,
    /// `coap 4.04`, `mqtt PUBACK 0x87`, `coap RST`, `connection lost`).
    #[serde(default)]
    pub failures: BTreeMap<String, u64>,
    /// The generator skipped more than 0.1 % of the schedule or woke up late more than 10 % of
    /// the time (it was short of CPU): the step does not show what the system under test can
    /// do, and cannot count as sustainable.
    pub generator_limited: bool,
    /// Share of the generator's 1 ms wake-ups that were more than 5 ms late.
    pub generator_late_ratio: f64,
    /// The generator's worst wake-up delay, ms.
    pub generator_max_lag_ms: f64,
    /// Watched processes during the step.
    pub processes: Vec<ProcessUsage>,
    /// The delivery latency histogram as `[µs, count]` pairs (for merging results).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_histogram: Vec<[u64; 2]>,
    /// The round-trip histogram as `[µs, count]` pairs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rtt_histogram: Vec<[u64; 2]>,
}

impl StepReport {
    /// The sum of the failure counts.
    pub fn failure_count(&self) -> u64 {
        self.failures.values().sum()
    }

    /// CPU seconds per million delivered messages of the watched process `name`.
    pub fn cpu_secs_per_million(&self, name: &str) -> Option<f64> {
        let p = self.processes.iter().find(|p| p.name == name)?;
        (self.delivered > 0).then(|| p.cpu_secs * 1e6 / self.delivered as f64)
    }
}

/// Sums steps (of one run, or the same step of several runs): counts and failures add up,
/// latencies merge from their histograms, rates are over the longest `seconds`, the
/// generator's lateness is the worst; `index` and `processes` are left to the caller.
pub fn sum_steps<'a>(
    steps: impl IntoIterator<Item = &'a StepReport>,
    rates_add: bool,
) -> StepReport {
    let mut out = StepReport::default();
    let mut latency = crate::stats::latency_histogram();
    let mut rtt = crate::stats::latency_histogram();
    let mut late_weighted = 0.0;
    for s in steps {
        out.offered_rate = if rates_add {
            out.offered_rate + s.offered_rate
        } else {
            out.offered_rate.max(s.offered_rate)
        };
        out.seconds = if rates_add { out.seconds.max(s.seconds) } else { out.seconds + s.seconds };
        out.scheduled += s.scheduled;
        out.skipped += s.skipped;
        out.attempted += s.attempted;
        out.sent += s.sent;
        out.backpressure_window += s.backpressure_window;
        out.backpressure_buffer += s.backpressure_buffer;
        out.dropped_closed += s.dropped_closed;
        out.acked += s.acked;
        out.ack_errors += s.ack_errors;
        out.responded += s.responded;
        out.errors += s.errors;
        out.delivered += s.delivered;
        out.lost += s.lost;
        crate::stats::add_pairs(&mut latency, &s.latency_histogram);
        crate::stats::add_pairs(&mut rtt, &s.rtt_histogram);
        for (k, v) in &s.failures {
            *out.failures.entry(k.clone()).or_insert(0) += v;
        }
        out.generator_limited |= s.generator_limited;
        late_weighted += s.generator_late_ratio * s.seconds;
        out.generator_late_ratio = out.generator_late_ratio.max(s.generator_late_ratio);
        out.generator_max_lag_ms = out.generator_max_lag_ms.max(s.generator_max_lag_ms);
    }
    if !rates_add && out.seconds > 0.0 {
        out.generator_late_ratio = late_weighted / out.seconds;
    }
    out.loss_ratio = if out.attempted == 0 { 0.0 } else { out.lost as f64 / out.attempted as f64 };
    out.sent_rate = out.sent as f64 / out.seconds.max(1e-9);
    out.delivered_rate = out.delivered as f64 / out.seconds.max(1e-9);
    out.latency = LatencySummary::from_histogram(&latency);
    out.rtt = LatencySummary::from_histogram(&rtt);
    out.latency_histogram = crate::stats::histogram_pairs(&latency);
    out.rtt_histogram = crate::stats::histogram_pairs(&rtt);
    out
}

/// A step's CPU over all steps of a run: CPU adds up, memory is the last step's.
pub fn sum_processes<'a>(steps: impl IntoIterator<Item = &'a StepReport>) -> Vec<ProcessUsage> {
    let mut processes: Vec<ProcessUsage> = Vec::new();
    for step in steps {
        for p in &step.processes {
            match processes.iter_mut().find(|q| q.name == p.name) {
                Some(q) => {
                    q.cpu_secs += p.cpu_secs;
                    q.rss_kib = p.rss_kib;
                }
                None => processes.push(p.clone()),
            }
        }
    }
    processes
}

/// When a step counts as sustained (DESIGN.md, "How performance is measured").
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MsrCriteria {
    /// Highest acceptable loss ratio (0.001 at QoS 0, 0 at QoS 1).
    pub max_loss_ratio: f64,
    /// p99 latency must be below this, µs.
    pub p99_below_us: u64,
}

impl MsrCriteria {
    /// The project's criteria for a QoS level: loss ≤ 0.1 % (QoS 0) or none (QoS 1), p99 under
    /// 50 ms.
    pub fn for_qos(qos: u8) -> Self {
        MsrCriteria { max_loss_ratio: if qos == 0 { 0.001 } else { 0.0 }, p99_below_us: 50_000 }
    }

    /// Whether `step` was sustained.
    pub fn sustained(&self, step: &StepReport) -> bool {
        let loss_ok = if self.max_loss_ratio == 0.0 {
            step.lost <= 0
        } else {
            step.loss_ratio <= self.max_loss_ratio
        };
        step.attempted > 0
            && !step.generator_limited
            && loss_ok
            && step.latency.count > 0
            && step.latency.p99_us < self.p99_below_us
    }
}

/// The maximum sustainable rate of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Msr {
    /// The criteria applied.
    pub criteria: MsrCriteria,
    /// The offered rate of the highest sustained step; 0 when no step was sustained.
    pub rate: u64,
    /// Which step that is.
    pub step: Option<usize>,
    /// Whether the highest step was sustained too (then the MSR is only a lower bound: offer
    /// higher rates to find the real one).
    pub lower_bound: bool,
    /// Whether a step above the MSR was generator-limited (the generator, not the system under
    /// test, may have been what stopped it).
    pub generator_limited_above: bool,
}

/// The MSR of `steps`: the highest offered rate among sustained steps.
pub fn msr(steps: &[StepReport], criteria: MsrCriteria) -> Msr {
    let best =
        steps.iter().filter(|s| criteria.sustained(s)).max_by_key(|s| (s.offered_rate, s.index));
    let rate = best.map_or(0, |s| s.offered_rate);
    let top = steps.iter().map(|s| s.offered_rate).max().unwrap_or(0);
    Msr {
        criteria,
        rate,
        step: best.map(|s| s.index),
        lower_bound: best.is_some() && rate == top,
        generator_limited_above: steps.iter().any(|s| s.offered_rate > rate && s.generator_limited),
    }
}

/// How the run connected its devices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectSummary {
    /// Devices asked for.
    pub requested: usize,
    /// Connections that got a successful CONNACK.
    pub connected: usize,
    /// Connections that failed (TCP, CONNACK refused, timeout).
    pub failed: usize,
    /// Time the ramp-up took.
    pub seconds: f64,
    /// The first failure, as an example.
    pub first_error: Option<String>,
    /// Failed connections by reason.
    #[serde(default)]
    pub failures: BTreeMap<String, u64>,
}

/// The idle-connection result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdleReport {
    /// How long the connections were held after the ramp-up.
    pub hold_secs: f64,
    /// Connections still open at the end of the hold.
    pub held: u64,
    /// Connections closed by the peer during the hold.
    pub lost: u64,
    /// Watched processes at the end of the hold.
    pub processes: Vec<ProcessUsage>,
}

/// What the run was asked to do.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// `fleetgate` or `broker`.
    pub target: String,
    /// The devices' transport: `mqtt`, `coap` or `http` (absent in older results: `mqtt`).
    #[serde(default)]
    pub transport: String,
    /// The address the devices connect to (MQTT, CoAP or HTTP, after `transport`; `mqtt` in
    /// results written before the other transports).
    #[serde(alias = "mqtt")]
    pub address: String,
    /// The NATS URL delivery is counted on (fleetgate), if any.
    pub nats_url: Option<String>,
    /// `3.1.1` or `5`.
    pub mqtt_version: String,
    /// 0 or 1.
    pub qos: u8,
    /// Simulated devices (one connection each).
    pub devices: usize,
    /// The first device's number (tokens are `<prefix><number>`).
    pub device_offset: usize,
    /// Payload bytes per message.
    pub payload_bytes: usize,
    /// Offered rate per step, messages per second.
    pub rates: Vec<u64>,
    /// Step length, seconds.
    pub step_secs: f64,
    /// Whether messages carry request ids.
    pub request_ids: bool,
    /// QoS 1 in-flight window per connection.
    pub window: u32,
    /// Source addresses used.
    pub source_ips: usize,
    /// Sending tasks.
    pub workers: usize,
    /// Runtime threads.
    pub threads: usize,
    /// Idle mode.
    pub idle: bool,
}

/// One second of a run, for the plots over time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the first step began.
    pub t: f64,
    /// The step that ran.
    pub step: usize,
    /// Sent per second over the last interval.
    pub sent_rate: f64,
    /// Delivered per second over the last interval.
    pub delivered_rate: f64,
    /// Acknowledged (PUBACK, response) per second.
    pub acked_rate: f64,
    /// Failures per second.
    pub failure_rate: f64,
    /// Delivery latency median over the last second, ms.
    pub p50_ms: f64,
    /// Delivery latency 99th percentile over the last second, ms.
    pub p99_ms: f64,
    /// Connections open.
    pub connections: u64,
    /// CPU of each watched process over the interval, percent of one core, by name.
    pub cpu_pct: BTreeMap<String, f64>,
}

/// A `--fail-if` threshold and how the run fared against it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThresholdResult {
    /// As given, e.g. `p99_ms>50`.
    pub expr: String,
    /// The metric's value in this run (`None`: it has none, e.g. no latency recorded).
    pub value: Option<f64>,
    /// Whether the threshold was crossed (the run fails).
    pub failed: bool,
}

/// The whole result of one load-generator run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Settings of the run.
    pub settings: Settings,
    /// The run id carried in every message (several after a merge, comma-separated).
    #[serde(default)]
    pub run_id: String,
    /// The generator's version and command line.
    #[serde(default)]
    pub command: String,
    /// Start time, Unix milliseconds.
    pub started_unix_ms: u64,
    /// When the first step began, Unix milliseconds (the origin of `timeline`).
    #[serde(default)]
    pub load_started_unix_ms: u64,
    /// End time, Unix milliseconds.
    #[serde(default)]
    pub finished_unix_ms: u64,
    /// Why the run stopped early (`SIGINT`, `SIGTERM`, `--max-secs`): the result is partial,
    /// its last step may be cut short.
    #[serde(default)]
    pub interrupted: Option<String>,
    /// Connection ramp-up.
    pub connect: ConnectSummary,
    /// Per step (empty in idle mode).
    pub steps: Vec<StepReport>,
    /// Sum over the steps (its `offered_rate` is the highest step's).
    pub totals: StepReport,
    /// Payloads the delivery counter saw that were not the generator's.
    pub foreign_deliveries: u64,
    /// The generator's payloads of other runs the delivery counter saw (not counted as
    /// delivered).
    #[serde(default)]
    pub other_run_deliveries: u64,
    /// The first reason the peer gave for each kind of failure.
    #[serde(default)]
    pub failure_examples: BTreeMap<String, String>,
    /// Connections lost while the run went on.
    pub connections_lost: u64,
    /// The MSR (load mode).
    pub msr: Option<Msr>,
    /// The idle-connection result (idle mode).
    pub idle: Option<IdleReport>,
    /// Once a second: rates, latency, CPU.
    #[serde(default)]
    pub timeline: Vec<Sample>,
    /// `--fail-if` thresholds.
    #[serde(default)]
    pub thresholds: Vec<ThresholdResult>,
}

impl Report {
    /// The step that gave the MSR, if any.
    pub fn msr_step(&self) -> Option<&StepReport> {
        let i = self.msr.as_ref()?.step?;
        self.steps.get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(index: usize, rate: u64, lost: u64, p99_us: u64) -> StepReport {
        let attempted = rate * 5;
        StepReport {
            index,
            offered_rate: rate,
            attempted,
            delivered: attempted - lost,
            lost: lost as i64,
            loss_ratio: lost as f64 / attempted as f64,
            latency: LatencySummary { count: attempted - lost, p99_us, ..Default::default() },
            ..Default::default()
        }
    }

    #[test]
    fn settings_of_older_results_still_read() {
        let old = r#"{"target":"fleetgate","mqtt":"127.0.0.1:1883","nats_url":null,
            "mqtt_version":"3.1.1","qos":0,"devices":1,"device_offset":1,"payload_bytes":64,
            "rates":[10000],"step_secs":1.0,"request_ids":false,"window":1,"source_ips":1,
            "workers":1,"threads":1,"idle":false}"#;
        let s: Settings = match serde_json::from_str(old) {
            Ok(s) => s,
            Err(e) => panic!("an older result no longer reads: {e}"),
        };
        assert_eq!((s.address.as_str(), s.transport.as_str()), ("127.0.0.1:1883", ""));
    }

    #[test]
    fn msr_is_the_highest_sustained_step() {
        let steps = vec![
            step(0, 10_000, 0, 900),
            step(1, 20_000, 50, 2_000), // 0.05 % loss: fine at QoS 0, not at QoS 1
            step(2, 40_000, 0, 60_000), // p99 too high
            step(3, 80_000, 40_000, 9_000), // heavy loss
        ];
        let m = msr(&steps, MsrCriteria::for_qos(0));
        assert_eq!((m.rate, m.step, m.lower_bound), (20_000, Some(1), false));
        let m = msr(&steps, MsrCriteria::for_qos(1));
        assert_eq!((m.rate, m.step), (10_000, Some(0)));
    }

    #[test]
    fn msr_bounds_and_edge_cases() {
        // Exactly 0.1 % loss passes at QoS 0; p99 of exactly 50 ms does not.
        let steps = vec![step(0, 10_000, 50, 1_000), step(1, 20_000, 0, 50_000)];
        let m = msr(&steps, MsrCriteria::for_qos(0));
        assert_eq!(m.rate, 10_000);
        // The top step sustained: a lower bound.
        let steps = vec![step(0, 10_000, 0, 1_000), step(1, 20_000, 0, 1_000)];
        let m = msr(&steps, MsrCriteria::for_qos(1));
        assert_eq!((m.rate, m.lower_bound), (20_000, true));
        // Nothing sustained, nothing delivered, no steps.
        let mut s = step(0, 10_000, 50_000, 1_000);
        s.latency.count = 0;
        assert_eq!(msr(&[s], MsrCriteria::for_qos(0)).rate, 0);
        assert_eq!(msr(&[], MsrCriteria::for_qos(0)).step, None);
    }

    #[test]
    fn generator_limited_steps_never_count() {
        let mut top = step(1, 20_000, 0, 1_000);
        top.generator_limited = true;
        let m = msr(&[step(0, 10_000, 0, 1_000), top], MsrCriteria::for_qos(0));
        assert_eq!(m.rate, 10_000);
        assert!(m.generator_limited_above);
    }

    #[test]
    fn cpu_per_million() {
        let mut s = step(0, 10_000, 0, 1_000);
        s.processes.push(ProcessUsage { name: "sut".into(), cpu_secs: 2.5, ..Default::default() });
        assert_eq!(s.cpu_secs_per_million("sut"), Some(2.5 * 1e6 / 50_000.0));
        assert_eq!(s.cpu_secs_per_million("nats"), None);
    }
}

//! The load generator's result: what it was asked to do, what happened in each step, and the
//! maximum sustainable rate (MSR) of the run. Written as JSON; read back by the comparison
//! runner.

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
    /// The name it was watched under (`sut`, `nats`).
    pub name: String,
    /// Its pid.
    pub pid: u32,
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
    /// Offered minus delivered (0 when more arrived than were offered).
    pub lost: u64,
    /// `lost / attempted`.
    pub loss_ratio: f64,
    /// Sent per second.
    pub sent_rate: f64,
    /// Delivered per second.
    pub delivered_rate: f64,
    /// Device → delivery counter latency of this step's messages.
    pub latency: LatencySummary,
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
}

impl StepReport {
    /// CPU seconds per million delivered messages of the watched process `name`.
    pub fn cpu_secs_per_million(&self, name: &str) -> Option<f64> {
        let p = self.processes.iter().find(|p| p.name == name)?;
        (self.delivered > 0).then(|| p.cpu_secs * 1e6 / self.delivered as f64)
    }
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
            step.lost == 0
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

/// The whole result of one load-generator run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Settings of the run.
    pub settings: Settings,
    /// Start time, Unix milliseconds.
    pub started_unix_ms: u64,
    /// Connection ramp-up.
    pub connect: ConnectSummary,
    /// Per step (empty in idle mode).
    pub steps: Vec<StepReport>,
    /// Sum over the steps (its `offered_rate` is the highest step's).
    pub totals: StepReport,
    /// Payloads the delivery counter saw that were not the generator's.
    pub foreign_deliveries: u64,
    /// Connections lost while the run went on.
    pub connections_lost: u64,
    /// The MSR (load mode).
    pub msr: Option<Msr>,
    /// The idle-connection result (idle mode).
    pub idle: Option<IdleReport>,
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
            lost,
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

//! Counters shared by the generator's tasks, and the delivery side's per-step latency
//! histograms.
//!
//! Senders add to the counters of the step they sent in (exact); acknowledgements, responses,
//! failures and round-trip times are added to the step that runs when they arrive (they trail
//! by a round trip). Delivery is attributed to the step written in the payload, so late
//! deliveries still count for the step that offered them; payloads of another run (another run
//! id) are counted apart and never as this run's deliveries.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use crate::payload;
use crate::report::LatencySummary;

/// Latencies are recorded in microseconds from 1 µs to this bound (values above are clamped).
pub const MAX_LATENCY_US: u64 = 120_000_000;

/// The current time in Unix nanoseconds (0 before 1970, saturating far in the future).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Nanoseconds on a monotonic clock since the first call in this process (device round trips
/// are measured on it: wall-clock steps must not distort them).
pub fn mono_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Why a message failed, as the device saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// An MQTT `/error` response with this `statusCode`.
    ErrorTopic(u16),
    /// An MQTT 5 PUBACK with this error reason code.
    PubAck(u8),
    /// An HTTP response with this status (400 or more).
    Http(u16),
    /// A CoAP response of class 4 or 5: the code byte (`class << 5 | detail`).
    Coap(u8),
    /// A CoAP Reset for a request.
    CoapReset,
    /// An FGU/1 RESPONSE frame with this status (400 or more).
    Udp(u16),
    /// The peer closed the connection (or it failed) while the run went on.
    ConnectionLost,
}

/// Slots of the failure counters: status codes up to 999, reason codes and CoAP codes up to
/// 255, then the transport failures.
const FAIL_ERROR_TOPIC: usize = 0;
const FAIL_PUBACK: usize = 1000;
const FAIL_HTTP: usize = FAIL_PUBACK + 256;
const FAIL_COAP: usize = FAIL_HTTP + 1000;
const FAIL_COAP_RESET: usize = FAIL_COAP + 256;
const FAIL_UDP: usize = FAIL_COAP_RESET + 1;
const FAIL_LOST: usize = FAIL_UDP + 1000;
const FAIL_SLOTS: usize = FAIL_LOST + 1;

impl Failure {
    fn slot(self) -> usize {
        match self {
            Failure::ErrorTopic(c) => FAIL_ERROR_TOPIC + usize::from(c.min(999)),
            Failure::PubAck(c) => FAIL_PUBACK + usize::from(c),
            Failure::Http(c) => FAIL_HTTP + usize::from(c.min(999)),
            Failure::Coap(c) => FAIL_COAP + usize::from(c),
            Failure::CoapReset => FAIL_COAP_RESET,
            Failure::Udp(c) => FAIL_UDP + usize::from(c.min(999)),
            Failure::ConnectionLost => FAIL_LOST,
        }
    }

    fn from_slot(slot: usize) -> Option<Failure> {
        let small = |v: usize| u8::try_from(v).ok();
        Some(match slot {
            s if s < FAIL_PUBACK => Failure::ErrorTopic(u16::try_from(s).ok()?),
            s if s < FAIL_HTTP => Failure::PubAck(small(s - FAIL_PUBACK)?),
            s if s < FAIL_COAP => Failure::Http(u16::try_from(s - FAIL_HTTP).ok()?),
            s if s < FAIL_COAP_RESET => Failure::Coap(small(s - FAIL_COAP)?),
            FAIL_COAP_RESET => Failure::CoapReset,
            s if s < FAIL_LOST => Failure::Udp(u16::try_from(s - FAIL_UDP).ok()?),
            FAIL_LOST => Failure::ConnectionLost,
            _ => return None,
        })
    }

    /// The name it is counted under in results: `mqtt /error 401`, `mqtt PUBACK 0x87`,
    /// `http 401`, `coap 4.01`, `coap RST`, `udp 401`, `connection lost`.
    pub fn key(self) -> String {
        match self {
            Failure::ErrorTopic(c) => format!("mqtt /error {c}"),
            Failure::PubAck(c) => format!("mqtt PUBACK 0x{c:02x}"),
            Failure::Http(c) => format!("http {c}"),
            Failure::Coap(c) => format!("coap {}.{:02}", c >> 5, c & 0x1f),
            Failure::CoapReset => "coap RST".into(),
            Failure::Udp(c) => format!("udp {c}"),
            Failure::ConnectionLost => "connection lost".into(),
        }
    }
}

/// Failure counts of one step, one atomic per [`Failure`] value.
#[derive(Debug)]
pub struct FailureCounters {
    slots: Box<[AtomicU64]>,
}

impl Default for FailureCounters {
    fn default() -> Self {
        FailureCounters { slots: (0..FAIL_SLOTS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl FailureCounters {
    /// Counts one; `true` when it is the first of its kind in this step.
    pub fn add(&self, f: Failure) -> bool {
        self.slots[f.slot()].fetch_add(1, Ordering::Relaxed) == 0
    }

    /// The non-zero counts by [`Failure::key`].
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then(|| Failure::from_slot(i).map(|f| (f.key(), n)))?
            })
            .collect()
    }

    /// The sum of every count.
    pub fn total(&self) -> u64 {
        self.slots.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Buckets below this are exact (µs); above, 64 per power of two (about 1.6 % wide).
const RTT_LINEAR: u64 = 128;
const RTT_SUB_BITS: u32 = 6;
/// Enough buckets for [`MAX_LATENCY_US`].
const RTT_BUCKETS: usize = 128 + (27 - 7 + 1) * 64;

/// A latency histogram many tasks record into at once without a lock (device round trips are
/// recorded by every device's reader): log-linear buckets of at most 1/64 of their value.
#[derive(Debug)]
pub struct AtomicHistogram {
    buckets: Box<[AtomicU64]>,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram { buckets: (0..RTT_BUCKETS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl AtomicHistogram {
    fn index(us: u64) -> usize {
        let us = us.clamp(1, MAX_LATENCY_US);
        if us < RTT_LINEAR {
            return us as usize;
        }
        let e = 63 - us.leading_zeros(); // ≥ 7
        let sub = (us >> (e - RTT_SUB_BITS)) & ((1 << RTT_SUB_BITS) - 1);
        RTT_LINEAR as usize + (e as usize - 7) * 64 + sub as usize
    }

    /// The highest value of bucket `i`.
    fn high(i: usize) -> u64 {
        if (i as u64) < RTT_LINEAR {
            return i as u64;
        }
        let j = i - RTT_LINEAR as usize;
        let e = 7 + (j / 64) as u32;
        let sub = (j % 64) as u64;
        ((64 + sub + 1) << (e - RTT_SUB_BITS)) - 1
    }

    /// Records one latency, µs.
    pub fn record(&self, us: u64) {
        self.buckets[Self::index(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// An HDR histogram holding each bucket's count at the bucket's highest value.
    pub fn to_histogram(&self) -> Histogram<u64> {
        let mut h = latency_histogram();
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            if n > 0 {
                h.saturating_record_n(Self::high(i).min(MAX_LATENCY_US), n);
            }
        }
        h
    }
}

/// A histogram as `[value µs, count]` pairs of its non-empty buckets: how results carry
/// histograms so that the results of several generator processes merge exactly.
pub fn histogram_pairs(h: &Histogram<u64>) -> Vec<[u64; 2]> {
    h.iter_recorded().map(|v| [v.value_iterated_to(), v.count_at_value()]).collect()
}

/// Adds `[value, count]` pairs into `h`.
pub fn add_pairs(h: &mut Histogram<u64>, pairs: &[[u64; 2]]) {
    for [v, n] in pairs {
        h.saturating_record_n((*v).clamp(1, MAX_LATENCY_US), *n);
    }
}

/// A histogram of microsecond latencies with three significant digits.
#[expect(clippy::expect_used, reason = "constant bounds, valid for hdrhistogram")]
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant bounds are valid")
}

/// What the sending side counts, per step.
#[derive(Debug, Default)]
pub struct StepCounters {
    /// Messages the schedule asked for.
    pub scheduled: AtomicU64,
    /// Scheduled messages the generator dropped because it fell too far behind.
    pub skipped: AtomicU64,
    /// Messages written (or queued to be written) to a connection.
    pub sent: AtomicU64,
    /// QoS 1 messages not sent because the connection's in-flight window was full.
    pub backpressure_window: AtomicU64,
    /// Messages not sent because the connection's unwritten bytes exceeded the buffer bound
    /// (the system under test is not reading).
    pub backpressure_buffer: AtomicU64,
    /// Messages not sent because their connection had closed.
    pub dropped_closed: AtomicU64,
    /// PUBACKs received.
    pub acked: AtomicU64,
    /// PUBACKs with an error reason code (MQTT 5).
    pub ack_errors: AtomicU64,
    /// `/status` responses received.
    pub responded: AtomicU64,
    /// `/error` responses received.
    pub errors: AtomicU64,
    /// Sender wake-ups (1 ms ticks).
    pub ticks: AtomicU64,
    /// Sender wake-ups more than [`LATE_TICK_US`] behind their time: the generator is short of
    /// CPU.
    pub late_ticks: AtomicU64,
    /// The worst sender wake-up delay, µs.
    pub max_tick_lag_us: AtomicU64,
    /// Failures the devices saw.
    pub failures: FailureCounters,
    /// Device round trips: MQTT PUBACK, HTTP response, CoAP response, µs.
    pub rtt: AtomicHistogram,
}

/// A sender wake-up this late (µs) counts as late.
pub const LATE_TICK_US: u64 = 5_000;

/// A plain copy of [`StepCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    /// See [`StepCounters::scheduled`].
    pub scheduled: u64,
    /// See [`StepCounters::skipped`].
    pub skipped: u64,
    /// See [`StepCounters::sent`].
    pub sent: u64,
    /// See [`StepCounters::backpressure_window`].
    pub backpressure_window: u64,
    /// See [`StepCounters::backpressure_buffer`].
    pub backpressure_buffer: u64,
    /// See [`StepCounters::dropped_closed`].
    pub dropped_closed: u64,
    /// See [`StepCounters::acked`].
    pub acked: u64,
    /// See [`StepCounters::ack_errors`].
    pub ack_errors: u64,
    /// See [`StepCounters::responded`].
    pub responded: u64,
    /// See [`StepCounters::errors`].
    pub errors: u64,
    /// See [`StepCounters::ticks`].
    pub ticks: u64,
    /// See [`StepCounters::late_ticks`].
    pub late_ticks: u64,
    /// See [`StepCounters::max_tick_lag_us`] (a maximum, not a sum).
    pub max_tick_lag_us: u64,
}

impl StepCounters {
    /// Reads every counter.
    pub fn snapshot(&self) -> StepCounts {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StepCounts {
            scheduled: r(&self.scheduled),
            skipped: r(&self.skipped),
            sent: r(&self.sent),
            backpressure_window: r(&self.backpressure_window),
            backpressure_buffer: r(&self.backpressure_buffer),
            dropped_closed: r(&self.dropped_closed),
            acked: r(&self.acked),
            ack_errors: r(&self.ack_errors),
            responded: r(&self.responded),
            errors: r(&self.errors),
            ticks: r(&self.ticks),
            late_ticks: r(&self.late_ticks),
            max_tick_lag_us: r(&self.max_tick_lag_us),
        }
    }

    /// Adds a batch of locally counted sends.
    pub fn add(&self, c: &StepCounts) {
        let add = |a: &AtomicU64, v: u64| {
            if v != 0 {
                a.fetch_add(v, Ordering::Relaxed);
            }
        };
        add(&self.scheduled, c.scheduled);
        add(&self.skipped, c.skipped);
        add(&self.sent, c.sent);
        add(&self.backpressure_window, c.backpressure_window);
        add(&self.backpressure_buffer, c.backpressure_buffer);
        add(&self.dropped_closed, c.dropped_closed);
        add(&self.acked, c.acked);
        add(&self.ack_errors, c.ack_errors);
        add(&self.responded, c.responded);
        add(&self.errors, c.errors);
        add(&self.ticks, c.ticks);
        add(&self.late_ticks, c.late_ticks);
        if c.max_tick_lag_us != 0 {
            self.max_tick_lag_us.fetch_max(c.max_tick_lag_us, Ordering::Relaxed);
        }
    }
}

impl StepCounts {
    /// Whether the generator fell short in this step: it skipped more than 0.1 % of the
    /// schedule, or more than 10 % of its wake-ups were late.
    pub fn generator_limited(&self) -> bool {
        self.skipped as f64 > 0.001 * self.scheduled as f64
            || self.late_ticks as f64 > 0.1 * self.ticks as f64
    }

    /// Messages the generator tried to send: scheduled minus skipped.
    pub fn attempted(&self) -> u64 {
        self.scheduled.saturating_sub(self.skipped)
    }

    /// The sum of two snapshots.
    pub fn plus(&self, o: &StepCounts) -> StepCounts {
        StepCounts {
            scheduled: self.scheduled + o.scheduled,
            skipped: self.skipped + o.skipped,
            sent: self.sent + o.sent,
            backpressure_window: self.backpressure_window + o.backpressure_window,
            backpressure_buffer: self.backpressure_buffer + o.backpressure_buffer,
            dropped_closed: self.dropped_closed + o.dropped_closed,
            acked: self.acked + o.acked,
            ack_errors: self.ack_errors + o.ack_errors,
            responded: self.responded + o.responded,
            errors: self.errors + o.errors,
            ticks: self.ticks + o.ticks,
            late_ticks: self.late_ticks + o.late_ticks,
            max_tick_lag_us: self.max_tick_lag_us.max(o.max_tick_lag_us),
        }
    }
}

/// Everything the sending tasks share: per-step counters, the running step, connection counts.
#[derive(Debug)]
pub struct RunCounters {
    /// One entry per step.
    pub steps: Vec<StepCounters>,
    /// The step that runs now (acknowledgements are counted here).
    pub current_step: AtomicUsize,
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Connections the peer closed (or that failed) while the run was going on.
    pub connections_lost: AtomicU64,
    /// The first reason given for each kind of failure (an `/error` reasonPhrase, a response
    /// body), by [`Failure::key`].
    pub failure_examples: Mutex<BTreeMap<String, String>>,
    /// The run is stopping early (a signal): senders stop.
    pub halted: std::sync::atomic::AtomicBool,
}

impl RunCounters {
    /// Counters for `steps` steps (at least one, for idle runs).
    pub fn new(steps: usize) -> Arc<Self> {
        Arc::new(RunCounters {
            steps: (0..steps.max(1)).map(|_| StepCounters::default()).collect(),
            current_step: AtomicUsize::new(0),
            connections_open: AtomicU64::new(0),
            connections_lost: AtomicU64::new(0),
            failure_examples: Mutex::default(),
            halted: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Counts a failure in the running step; `example` (called only for the first of its kind
    /// in a step) gives the reason the peer stated, if any.
    pub fn fail(&self, f: Failure, example: impl FnOnce() -> Option<String>) {
        if self.current().failures.add(f)
            && let Some(text) = example()
            && let Ok(mut m) = self.failure_examples.lock()
        {
            m.entry(f.key()).or_insert_with(|| text.chars().take(200).collect());
        }
    }

    /// Records a device round trip that started at `sent_mono_nanos` ([`mono_nanos`]).
    pub fn round_trip(&self, sent_mono_nanos: u64) {
        self.current().rtt.record(mono_nanos().saturating_sub(sent_mono_nanos) / 1000);
    }

    /// Failures over all steps, by key.
    pub fn failure_totals(&self) -> BTreeMap<String, u64> {
        let mut all = BTreeMap::new();
        for s in &self.steps {
            for (k, v) in s.failures.snapshot() {
                *all.entry(k).or_insert(0) += v;
            }
        }
        all
    }

    /// The counters of the running step.
    pub fn current(&self) -> &StepCounters {
        let i = self.current_step.load(Ordering::Relaxed).min(self.steps.len() - 1);
        &self.steps[i]
    }

    /// The sum over all steps.
    pub fn totals(&self) -> StepCounts {
        self.steps.iter().fold(StepCounts::default(), |acc, s| acc.plus(&s.snapshot()))
    }
}

/// Delivery as seen live (for the progress line): totals and the last second's percentiles.
#[derive(Debug, Default)]
pub struct LiveDelivery {
    /// Messages delivered so far (all steps).
    pub delivered: AtomicU64,
    /// Median latency over the last full second, µs.
    pub p50_us: AtomicU64,
    /// 99th percentile latency over the last full second, µs.
    pub p99_us: AtomicU64,
}

/// Delivery of one step.
#[derive(Debug)]
pub struct StepDelivery {
    /// Messages of this step that arrived.
    pub delivered: u64,
    /// Their latencies, µs.
    pub latency: Histogram<u64>,
}

/// The receiving side's bookkeeping: owned by the one task that receives deliveries.
#[derive(Debug)]
pub struct DeliveryRecorder {
    steps: Vec<StepDelivery>,
    window: Histogram<u64>,
    /// Payloads that were not the generator's (or named a step out of range).
    pub foreign: u64,
    /// The generator's payloads of another run (another run id): never counted as delivered.
    pub other_runs: u64,
    run_id: Vec<u8>,
    live: Arc<LiveDelivery>,
}

impl DeliveryRecorder {
    /// A recorder for `steps` steps of the run `run_id`.
    pub fn new(steps: usize, run_id: &str) -> Self {
        DeliveryRecorder {
            steps: (0..steps.max(1))
                .map(|_| StepDelivery { delivered: 0, latency: latency_histogram() })
                .collect(),
            window: latency_histogram(),
            foreign: 0,
            other_runs: 0,
            run_id: run_id.as_bytes().to_vec(),
            live: Arc::default(),
        }
    }

    /// The live view, to share with the progress reporter.
    pub fn live(&self) -> Arc<LiveDelivery> {
        self.live.clone()
    }

    /// Records one delivered device payload that arrived at `now_unix_nanos`.
    pub fn record(&mut self, device_payload: &[u8], now_unix_nanos: u64) {
        let Some(stamp) = payload::parse(device_payload) else {
            self.foreign += 1;
            return;
        };
        if stamp.run_id != self.run_id.as_slice() {
            self.other_runs += 1;
            return;
        }
        let Some(s) = self.steps.get_mut(stamp.step as usize) else {
            self.foreign += 1;
            return;
        };
        let us =
            (now_unix_nanos.saturating_sub(stamp.sent_unix_nanos) / 1000).clamp(1, MAX_LATENCY_US);
        s.delivered += 1;
        s.latency.saturating_record(us);
        self.window.saturating_record(us);
        self.live.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// Publishes the window's percentiles to the live view and starts a new window (call once a
    /// second).
    pub fn roll_window(&mut self) {
        let (p50, p99) = if self.window.is_empty() {
            (0, 0)
        } else {
            (self.window.value_at_quantile(0.5), self.window.value_at_quantile(0.99))
        };
        self.live.p50_us.store(p50, Ordering::Relaxed);
        self.live.p99_us.store(p99, Ordering::Relaxed);
        self.window.reset();
    }

    /// Per-step results.
    pub fn steps(&self) -> &[StepDelivery] {
        &self.steps
    }

    /// The latency summary of step `i`.
    pub fn summary(&self, i: usize) -> LatencySummary {
        self.steps.get(i).map(|s| LatencySummary::from_histogram(&s.latency)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_attributes_by_step_and_measures_latency() {
        let mut r = DeliveryRecorder::new(2, "run1");
        let mut p = Vec::new();
        payload::write(&mut p, 1_000_000_000, 1, b"run1", 64);
        r.record(&p, 1_002_000_000); // 2 ms
        payload::write(&mut p, 1_000_000_000, 0, b"run1", 64);
        r.record(&p, 1_000_500_000); // 0.5 ms
        payload::write(&mut p, 1_000_000_000, 7, b"run1", 64);
        r.record(&p, 1_000_500_000); // no such step
        r.record(b"[{\"temperature\":1}]", 5);
        // Another run's messages are never this run's deliveries.
        payload::write(&mut p, 1_000_000_000, 0, b"run2", 64);
        r.record(&p, 1_000_500_000);
        payload::write(&mut p, 1_000_000_000, 0, b"run", 64);
        r.record(&p, 1_000_500_000);
        assert_eq!(r.steps()[0].delivered, 1);
        assert_eq!(r.steps()[1].delivered, 1);
        assert_eq!(r.foreign, 2);
        assert_eq!(r.other_runs, 2);
        let s = r.summary(1);
        assert_eq!(s.count, 1);
        assert!((1999..=2001).contains(&s.p99_us), "{s:?}");
        r.roll_window();
        let live = r.live();
        assert_eq!(live.delivered.load(Ordering::Relaxed), 2);
        assert!(live.p99_us.load(Ordering::Relaxed) >= 1999);
        r.roll_window();
        assert_eq!(live.p99_us.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn counters_sum_over_steps() {
        let c = RunCounters::new(3);
        c.steps[0].add(&StepCounts { scheduled: 10, skipped: 1, sent: 9, ..Default::default() });
        c.steps[2].add(&StepCounts { scheduled: 5, sent: 5, acked: 4, ..Default::default() });
        c.current_step.store(99, Ordering::Relaxed);
        c.current().acked.fetch_add(1, Ordering::Relaxed); // clamped to the last step
        let t = c.totals();
        assert_eq!((t.scheduled, t.skipped, t.sent, t.acked), (15, 1, 14, 5));
        assert_eq!(t.attempted(), 14);
        assert!(t.generator_limited(), "1 of 15 skipped");
        c.steps[1].add(&StepCounts {
            scheduled: 1000,
            ticks: 100,
            late_ticks: 5,
            max_tick_lag_us: 9,
            ..Default::default()
        });
        c.steps[1].add(&StepCounts { max_tick_lag_us: 7, ..Default::default() });
        let s = c.steps[1].snapshot();
        assert!(!s.generator_limited());
        assert_eq!(s.max_tick_lag_us, 9);
        assert!(
            StepCounts { ticks: 100, late_ticks: 11, ..Default::default() }.generator_limited()
        );
    }

    #[test]
    fn failures_are_counted_by_kind_with_the_first_reason() {
        let c = RunCounters::new(2);
        c.fail(Failure::ErrorTopic(401), || Some("unknown token".into()));
        c.fail(Failure::ErrorTopic(401), || panic!("only the first is asked for its reason"));
        c.fail(Failure::Http(503), || None);
        c.current_step.store(1, Ordering::Relaxed);
        c.fail(Failure::ErrorTopic(401), || Some("later".into()));
        c.fail(Failure::Coap(0x81), || None); // 4.01
        c.fail(Failure::PubAck(0x87), || None);
        c.fail(Failure::CoapReset, || None);
        c.fail(Failure::ConnectionLost, || None);
        let s0 = c.steps[0].failures.snapshot();
        assert_eq!(s0.get("mqtt /error 401"), Some(&2));
        assert_eq!(s0.get("http 503"), Some(&1));
        let all = c.failure_totals();
        assert_eq!(all.get("mqtt /error 401"), Some(&3));
        for k in ["coap 4.01", "mqtt PUBACK 0x87", "coap RST", "connection lost"] {
            assert_eq!(all.get(k), Some(&1), "{k} in {all:?}");
        }
        assert_eq!(c.steps[1].failures.total(), 5);
        let ex = c.failure_examples.lock().expect("not poisoned");
        assert_eq!(ex.get("mqtt /error 401").map(String::as_str), Some("unknown token"));
        // Every slot maps back to the failure it counts.
        for slot in 0..FAIL_SLOTS {
            let f = Failure::from_slot(slot).expect("every slot is a failure");
            assert_eq!(f.slot(), slot, "{f:?}");
        }
    }

    #[test]
    fn atomic_histogram_is_within_its_resolution() {
        let h = AtomicHistogram::default();
        for us in 1..=100_000u64 {
            h.record(us);
        }
        h.record(MAX_LATENCY_US * 10); // clamped
        let hdr = h.to_histogram();
        assert_eq!(hdr.len(), 100_001);
        for (q, want) in [(0.5, 50_000.0), (0.99, 99_000.0), (0.001, 100.0)] {
            let got = hdr.value_at_quantile(q) as f64;
            assert!((got - want).abs() <= want / 50.0 + 1.0, "q {q}: {got} vs {want}");
        }
        for i in 1..AtomicHistogram::index(MAX_LATENCY_US) {
            assert_eq!(AtomicHistogram::index(AtomicHistogram::high(i)), i, "bucket {i}");
            assert_eq!(AtomicHistogram::index(AtomicHistogram::high(i) + 1), i + 1, "bucket {i}");
        }
        assert!(AtomicHistogram::index(MAX_LATENCY_US) < RTT_BUCKETS);
    }

    #[test]
    fn histogram_pairs_merge_exactly() {
        let mut a = latency_histogram();
        let mut b = latency_histogram();
        for v in [3, 900, 1_234, 77_777] {
            a.record(v).expect("in range");
            b.record(v * 2).expect("in range");
        }
        let mut both = latency_histogram();
        add_pairs(&mut both, &histogram_pairs(&a));
        add_pairs(&mut both, &histogram_pairs(&b));
        let mut want = a.clone();
        want.add(&b).expect("same bounds");
        assert_eq!(both.len(), 8);
        for q in [0.0, 0.25, 0.5, 0.9, 1.0] {
            assert_eq!(both.value_at_quantile(q), want.value_at_quantile(q), "q {q}");
        }
    }
}

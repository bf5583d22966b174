//! Counters shared by the generator's tasks, and the delivery side's per-step latency
//! histograms.
//!
//! Senders add to the counters of the step they sent in (exact); acknowledgements and responses
//! are added to the step that runs when they arrive (they trail by a round trip). Delivery is
//! attributed to the step written in the payload, so late deliveries still count for the step
//! that offered them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

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
}

impl RunCounters {
    /// Counters for `steps` steps (at least one, for idle runs).
    pub fn new(steps: usize) -> Arc<Self> {
        Arc::new(RunCounters {
            steps: (0..steps.max(1)).map(|_| StepCounters::default()).collect(),
            current_step: AtomicUsize::new(0),
            connections_open: AtomicU64::new(0),
            connections_lost: AtomicU64::new(0),
        })
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
    live: Arc<LiveDelivery>,
}

impl DeliveryRecorder {
    /// A recorder for `steps` steps.
    pub fn new(steps: usize) -> Self {
        DeliveryRecorder {
            steps: (0..steps.max(1))
                .map(|_| StepDelivery { delivered: 0, latency: latency_histogram() })
                .collect(),
            window: latency_histogram(),
            foreign: 0,
            live: Arc::default(),
        }
    }

    /// The live view, to share with the progress reporter.
    pub fn live(&self) -> Arc<LiveDelivery> {
        self.live.clone()
    }

    /// Records one delivered device payload that arrived at `now_unix_nanos`.
    pub fn record(&mut self, device_payload: &[u8], now_unix_nanos: u64) {
        let Some((sent, step)) = payload::parse(device_payload) else {
            self.foreign += 1;
            return;
        };
        let Some(s) = self.steps.get_mut(step as usize) else {
            self.foreign += 1;
            return;
        };
        let us = (now_unix_nanos.saturating_sub(sent) / 1000).clamp(1, MAX_LATENCY_US);
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
        let mut r = DeliveryRecorder::new(2);
        let mut p = Vec::new();
        payload::write(&mut p, 1_000_000_000, 1, 64);
        r.record(&p, 1_002_000_000); // 2 ms
        payload::write(&mut p, 1_000_000_000, 0, 64);
        r.record(&p, 1_000_500_000); // 0.5 ms
        payload::write(&mut p, 1_000_000_000, 7, 64);
        r.record(&p, 1_000_500_000); // no such step
        r.record(b"[{\"temperature\":1}]", 5);
        assert_eq!(r.steps()[0].delivered, 1);
        assert_eq!(r.steps()[1].delivered, 1);
        assert_eq!(r.foreign, 2);
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
}

//! Open-loop scheduling: when messages are due, independent of when earlier ones were answered.
//!
//! Time is passed in as a value (a [`Duration`] since the run's origin), so everything here is
//! deterministic and tested without a clock. A [`Pacer`] turns a rate into a count of sends due
//! by a given time, the way a token bucket that starts empty and never overflows would; a
//! [`StepPlan`] cuts the run into steps of fixed length, each with its own offered rate.

use std::time::Duration;

/// What a [`Pacer`] says is due at a point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Due {
    /// Messages to send now.
    pub send: u64,
    /// Messages the schedule wanted but that are dropped from it because the generator fell
    /// further behind than the allowed backlog (it is too slow to offer this rate).
    pub skipped: u64,
}

/// A token bucket that fills at `rate` per second from `start` on: `due(now)` hands out the
/// whole tokens that accumulated since the last call. The backlog it hands out at once is
/// capped; tokens beyond the cap are reported as skipped rather than sent in a burst, so that a
/// stalled generator shows up as "generator-limited" instead of as a burst the system under
/// test never asked for.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate_per_sec: f64,
    start: Duration,
    end: Option<Duration>,
    issued: u64,
    max_backlog: u64,
}

impl Pacer {
    /// A pacer at `rate_per_sec` from `start` (inclusive) to `end` (exclusive; `None`: open),
    /// handing out at most `max_backlog` tokens in one call (at least 1).
    pub fn new(
        rate_per_sec: f64,
        start: Duration,
        end: Option<Duration>,
        max_backlog: u64,
    ) -> Self {
        Pacer {
            rate_per_sec: rate_per_sec.max(0.0),
            start,
            end,
            issued: 0,
            max_backlog: max_backlog.max(1),
        }
    }

    /// The backlog cap for a rate and a tolerated lag: `rate × lag`, at least 1.
    pub fn backlog_for(rate_per_sec: f64, lag: Duration) -> u64 {
        ((rate_per_sec * lag.as_secs_f64()).ceil() as u64).max(1)
    }

    /// Tokens the schedule holds by `now`: `floor(rate × (now − start))`, counted up to `end`.
    pub fn scheduled_by(&self, now: Duration) -> u64 {
        let now = match self.end {
            Some(end) if now > end => end,
            _ => now,
        };
        let elapsed = now.saturating_sub(self.start).as_secs_f64();
        (self.rate_per_sec * elapsed).floor() as u64
    }

    /// What is due at `now`; every token is handed out (as sent or skipped) exactly once.
    pub fn due(&mut self, now: Duration) -> Due {
        let total = self.scheduled_by(now);
        let backlog = total.saturating_sub(self.issued);
        let send = backlog.min(self.max_backlog);
        let skipped = backlog - send;
        self.issued += backlog;
        Due { send, skipped }
    }

    /// Tokens handed out so far (sent and skipped).
    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// When the pacer stops accumulating, if ever.
    pub fn end(&self) -> Option<Duration> {
        self.end
    }
}

/// The run's steps: step `i` offers `rates[i]` messages per second from `i × step` to
/// `(i + 1) × step` after the origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    rates: Vec<u64>,
    step: Duration,
}

impl StepPlan {
    /// A plan; `step` must be non-zero and `rates` non-empty (else the plan is empty).
    pub fn new(rates: Vec<u64>, step: Duration) -> Self {
        StepPlan { rates, step }
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        if self.step.is_zero() { 0 } else { self.rates.len() }
    }

    /// Whether the plan has no step.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The offered rate of each step.
    pub fn rates(&self) -> &[u64] {
        &self.rates
    }

    /// The length of one step.
    pub fn step_len(&self) -> Duration {
        self.step
    }

    /// The total length of the plan.
    pub fn total(&self) -> Duration {
        self.step * self.len() as u32
    }

    /// The step that runs at `elapsed` after the origin, `None` once the plan is over.
    pub fn step_at(&self, elapsed: Duration) -> Option<usize> {
        if self.is_empty() {
            return None;
        }
        let i = (elapsed.as_nanos() / self.step.as_nanos()) as usize;
        (i < self.len()).then_some(i)
    }

    /// Start and end of step `i` after the origin.
    pub fn bounds(&self, i: usize) -> (Duration, Duration) {
        (self.step * i as u32, self.step * (i as u32 + 1))
    }

    /// A pacer for a `share` (0..=1) of step `i`'s rate, bounded to the step.
    pub fn pacer(&self, i: usize, share: f64, max_lag: Duration) -> Pacer {
        let rate = self.rates.get(i).copied().unwrap_or(0) as f64 * share;
        let (start, end) = self.bounds(i);
        Pacer::new(rate, start, Some(end), Pacer::backlog_for(rate, max_lag))
    }
}

/// Spreads `total` items over `parts` as evenly as possible: the first `total % parts` parts get
/// one more. Used to split devices over workers and over load-generator processes.
pub fn split_even(total: usize, parts: usize) -> Vec<usize> {
    if parts == 0 {
        return Vec::new();
    }
    let base = total / parts;
    let extra = total % parts;
    (0..parts).map(|i| base + usize::from(i < extra)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn pacer_hands_out_rate_times_elapsed() {
        let mut p = Pacer::new(1000.0, ms(0), None, 1_000_000);
        assert_eq!(p.due(ms(0)), Due { send: 0, skipped: 0 });
        assert_eq!(p.due(ms(1)).send, 1);
        assert_eq!(p.due(ms(10)).send, 9);
        // Calling again at the same time hands out nothing new.
        assert_eq!(p.due(ms(10)).send, 0);
        assert_eq!(p.due(ms(1000)).send, 990);
        assert_eq!(p.issued(), 1000);
    }

    #[test]
    fn pacer_is_open_loop_and_catches_up_within_the_backlog() {
        // 10 k/s with a 100 ms backlog: a 50 ms stall is caught up in one call, nothing lost.
        let mut p = Pacer::new(10_000.0, ms(0), None, Pacer::backlog_for(10_000.0, ms(100)));
        assert_eq!(p.due(ms(50)), Due { send: 500, skipped: 0 });
        // A 300 ms stall exceeds it: 1000 are sent, the rest are reported as skipped.
        assert_eq!(p.due(ms(350)), Due { send: 1000, skipped: 2000 });
        assert_eq!(p.issued(), 3500);
    }

    #[test]
    fn pacer_fractional_rates_accumulate() {
        // 2.5 per second: 2 by 1 s, 5 by 2 s; nothing is lost to rounding.
        let mut p = Pacer::new(2.5, ms(0), None, 100);
        assert_eq!(p.due(ms(999)).send, 2);
        assert_eq!(p.due(ms(2000)).send, 3);
        let total: u64 = (0..=10_000).map(|t| p.due(ms(2000 + t)).send).sum();
        assert_eq!(total, 25);
    }

    #[test]
    fn pacer_stops_at_its_end_and_starts_at_its_start() {
        let mut p = Pacer::new(100.0, ms(1000), Some(ms(2000)), 1000);
        assert_eq!(p.due(ms(500)).send, 0);
        assert_eq!(p.due(ms(1500)).send, 50);
        assert_eq!(p.due(ms(9000)).send, 50);
        assert_eq!(p.scheduled_by(ms(9000)), 100);
        assert_eq!(p.due(ms(10_000)), Due::default());
    }

    #[test]
    fn pacer_handles_zero_rate_and_minimum_backlog() {
        let mut p = Pacer::new(0.0, ms(0), None, 0);
        assert_eq!(p.due(ms(100_000)), Due::default());
        assert_eq!(Pacer::backlog_for(0.0, ms(100)), 1);
        let mut p = Pacer::new(1000.0, ms(0), None, 0);
        assert_eq!(p.due(ms(5)), Due { send: 1, skipped: 4 });
    }

    #[test]
    fn step_plan_maps_time_to_steps() {
        let plan = StepPlan::new(vec![10, 20, 40], Duration::from_secs(5));
        assert_eq!(plan.len(), 3);
        assert_eq!(plan.total(), Duration::from_secs(15));
        assert_eq!(plan.step_at(ms(0)), Some(0));
        assert_eq!(plan.step_at(ms(4999)), Some(0));
        assert_eq!(plan.step_at(ms(5000)), Some(1));
        assert_eq!(plan.step_at(ms(14_999)), Some(2));
        assert_eq!(plan.step_at(ms(15_000)), None);
        assert_eq!(plan.bounds(1), (ms(5000), ms(10_000)));
        assert!(StepPlan::new(vec![1], Duration::ZERO).is_empty());
        assert_eq!(StepPlan::new(vec![1], Duration::ZERO).step_at(ms(1)), None);
    }

    #[test]
    fn step_pacers_split_the_rate_and_add_up() {
        let plan = StepPlan::new(vec![1000, 3000], Duration::from_secs(2));
        let shares = [0.5, 0.25, 0.25];
        let mut total = 0;
        for share in shares {
            let mut p = plan.pacer(1, share, ms(100));
            // Poll every 1 ms across the step and beyond it.
            for t in (0..=5000).step_by(1) {
                total += p.due(ms(t)).send;
            }
        }
        assert_eq!(total, 6000);
    }

    #[test]
    fn split_even_spreads_remainders() {
        assert_eq!(split_even(10, 3), vec![4, 3, 3]);
        assert_eq!(split_even(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(split_even(5, 0), Vec::<usize>::new());
        assert_eq!(split_even(100_000, 7).iter().sum::<usize>(), 100_000);
    }
}

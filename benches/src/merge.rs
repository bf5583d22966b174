//! `fleetgate-loadgen merge`: the results of several generator processes that loaded the same
//! system at the same time (each with its own devices and run id) as one result.
//!
//! Step `i` of the merged result is step `i` of every input added up: offered rates, counts,
//! failures and signed loss add; latency percentiles come from the inputs' histograms merged
//! (exact, not averaged); the MSR is found again on the merged steps. A watched process that
//! several inputs watched (same pids) is counted once; different pids under one name add up.
//! The timeline is aligned on wall-clock seconds: rates add, latency percentiles take the worst
//! input (a bound, not a merge), CPU per process is counted once per pid set.

use std::collections::BTreeMap;

use crate::report::{
    ConnectSummary, IdleReport, MsrCriteria, ProcessUsage, Report, Sample, StepReport, msr,
    sum_processes, sum_steps,
};

/// Merges `reports` into one (see the module documentation).
pub fn merge(reports: &[Report]) -> Result<Report, String> {
    let first = reports.first().ok_or("nothing to merge")?;
    for (i, r) in reports.iter().enumerate().skip(1) {
        let s = &r.settings;
        let f = &first.settings;
        if (s.transport.as_str(), s.qos, s.idle, s.target.as_str())
            != (f.transport.as_str(), f.qos, f.idle, f.target.as_str())
        {
            return Err(format!(
                "result {} is of another kind of run ({} QoS {} {}) than the first ({} QoS {} {})",
                i + 1,
                s.transport,
                s.qos,
                if s.idle { "idle" } else { "load" },
                f.transport,
                f.qos,
                if f.idle { "idle" } else { "load" }
            ));
        }
        if !f.idle && (s.rates.len() != f.rates.len() || (s.step_secs - f.step_secs).abs() > 1e-9) {
            return Err(format!(
                "result {} has other steps ({} of {} s) than the first ({} of {} s)",
                i + 1,
                s.rates.len(),
                s.step_secs,
                f.rates.len(),
                f.step_secs
            ));
        }
    }
    for (i, r) in reports.iter().enumerate() {
        if r.steps.iter().any(|s| s.latency.count > 0 && s.latency_histogram.is_empty()) {
            return Err(format!(
                "result {} carries no latency histograms (written by an older generator)",
                i + 1
            ));
        }
    }

    let mut out = Report {
        settings: first.settings.clone(),
        run_id: join(reports.iter().map(|r| r.run_id.as_str())),
        command: format!("fleetgate-loadgen merge of {} results", reports.len()),
        started_unix_ms: reports.iter().map(|r| r.started_unix_ms).min().unwrap_or(0),
        load_started_unix_ms: reports
            .iter()
            .map(|r| r.load_started_unix_ms)
            .filter(|t| *t > 0)
            .min()
            .unwrap_or(0),
        finished_unix_ms: reports.iter().map(|r| r.finished_unix_ms).max().unwrap_or(0),
        interrupted: {
            let why = join(reports.iter().filter_map(|r| r.interrupted.as_deref()));
            (!why.is_empty()).then_some(why)
        },
        foreign_deliveries: reports.iter().map(|r| r.foreign_deliveries).sum(),
        other_run_deliveries: reports.iter().map(|r| r.other_run_deliveries).sum(),
        connections_lost: reports.iter().map(|r| r.connections_lost).sum(),
        ..Default::default()
    };
    let s = &mut out.settings;
    s.devices = reports.iter().map(|r| r.settings.devices).sum();
    s.device_offset = reports.iter().map(|r| r.settings.device_offset).min().unwrap_or(1);
    s.workers = reports.iter().map(|r| r.settings.workers).sum();
    s.threads = reports.iter().map(|r| r.settings.threads).sum();
    s.source_ips = reports.iter().map(|r| r.settings.source_ips).max().unwrap_or(0);
    s.rates = (0..first.settings.rates.len())
        .map(|i| reports.iter().map(|r| r.settings.rates.get(i).copied().unwrap_or(0)).sum())
        .collect();

    let mut connect = ConnectSummary::default();
    for r in reports {
        let c = &r.connect;
        connect.requested += c.requested;
        connect.connected += c.connected;
        connect.failed += c.failed;
        connect.seconds = connect.seconds.max(c.seconds);
        if connect.first_error.is_none() {
            connect.first_error.clone_from(&c.first_error);
        }
        for (k, v) in &c.failures {
            *connect.failures.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &r.failure_examples {
            out.failure_examples.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    out.connect = connect;

    let steps = reports.iter().map(|r| r.steps.len()).max().unwrap_or(0);
    for i in 0..steps {
        let parts: Vec<&StepReport> = reports.iter().filter_map(|r| r.steps.get(i)).collect();
        let mut step = sum_steps(parts.iter().copied(), true);
        step.index = i;
        step.processes = merge_processes(parts.iter().map(|p| p.processes.as_slice()));
        out.steps.push(step);
    }
    if !first.settings.idle {
        let mut totals = sum_steps(&out.steps, false);
        totals.index = out.steps.len();
        totals.processes = sum_processes(&out.steps);
        out.totals = totals;
        out.msr = Some(msr(&out.steps, MsrCriteria::for_qos(first.settings.qos)));
    }
    if reports.iter().all(|r| r.idle.is_some()) {
        let idles: Vec<&IdleReport> = reports.iter().filter_map(|r| r.idle.as_ref()).collect();
        out.idle = Some(IdleReport {
            hold_secs: idles.iter().map(|i| i.hold_secs).fold(0.0, f64::max),
            held: idles.iter().map(|i| i.held).sum(),
            lost: idles.iter().map(|i| i.lost).sum(),
            processes: merge_processes(idles.iter().map(|i| i.processes.as_slice())),
        });
    }
    out.timeline = merge_timelines(reports, out.load_started_unix_ms);
    Ok(out)
}

fn join<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for p in parts.filter(|p| !p.is_empty()) {
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    seen.join(",")
}

fn pid_set(p: &ProcessUsage) -> Vec<u32> {
    let mut pids = if p.pids.is_empty() { vec![p.pid] } else { p.pids.clone() };
    pids.sort_unstable();
    pids
}

/// One entry per name: the same processes seen by several inputs count once (the largest
/// reading), other processes under the same name add up.
fn merge_processes<'a>(lists: impl Iterator<Item = &'a [ProcessUsage]>) -> Vec<ProcessUsage> {
    let mut by_name: BTreeMap<String, Vec<ProcessUsage>> = BTreeMap::new();
    for list in lists {
        for p in list {
            let same = by_name.entry(p.name.clone()).or_default();
            match same.iter_mut().find(|q| pid_set(q) == pid_set(p)) {
                Some(q) => {
                    q.cpu_secs = q.cpu_secs.max(p.cpu_secs);
                    q.rss_kib = q.rss_kib.max(p.rss_kib);
                }
                None => same.push(p.clone()),
            }
        }
    }
    by_name
        .into_iter()
        .map(|(name, group)| {
            let mut pids: Vec<u32> = group.iter().flat_map(pid_set).collect();
            pids.sort_unstable();
            pids.dedup();
            ProcessUsage {
                name,
                pid: pids.first().copied().unwrap_or(0),
                cpu_secs: group.iter().map(|p| p.cpu_secs).sum(),
                rss_kib: group.iter().map(|p| p.rss_kib).sum(),
                pids,
            }
        })
        .collect()
}

fn merge_timelines(reports: &[Report], origin_ms: u64) -> Vec<Sample> {
    let mut by_second: BTreeMap<i64, Sample> = BTreeMap::new();
    for r in reports {
        let offset = (r.load_started_unix_ms as f64 - origin_ms as f64) / 1e3;
        for s in &r.timeline {
            let t = s.t + offset;
            let m = by_second.entry(t.round() as i64).or_insert_with(|| Sample {
                t: t.round(),
                step: s.step,
                ..Default::default()
            });
            m.sent_rate += s.sent_rate;
            m.delivered_rate += s.delivered_rate;
            m.acked_rate += s.acked_rate;
            m.failure_rate += s.failure_rate;
            m.connections += s.connections;
            m.p50_ms = m.p50_ms.max(s.p50_ms);
            m.p99_ms = m.p99_ms.max(s.p99_ms);
            for (k, v) in &s.cpu_pct {
                let e = m.cpu_pct.entry(k.clone()).or_insert(0.0);
                *e = e.max(*v);
            }
        }
    }
    by_second.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Settings;
    use crate::stats::{histogram_pairs, latency_histogram};

    fn step(index: usize, rate: u64, delivered: u64, latencies: &[u64]) -> StepReport {
        let mut h = latency_histogram();
        for v in latencies {
            h.record(*v).expect("in range");
        }
        StepReport {
            index,
            offered_rate: rate,
            seconds: 1.0,
            scheduled: rate,
            attempted: rate,
            sent: rate,
            delivered,
            lost: rate as i64 - delivered as i64,
            latency: crate::report::LatencySummary::from_histogram(&h),
            latency_histogram: histogram_pairs(&h),
            failures: [("http 503".to_owned(), rate - delivered)].into_iter().collect(),
            processes: vec![ProcessUsage {
                name: "sut".into(),
                pid: 42,
                pids: vec![42],
                cpu_secs: 0.5,
                rss_kib: Some(1000),
            }],
            ..Default::default()
        }
    }

    fn report(run: &str, steps: Vec<StepReport>) -> Report {
        Report {
            settings: Settings {
                transport: "http".into(),
                rates: steps.iter().map(|s| s.offered_rate).collect(),
                step_secs: 1.0,
                devices: 10,
                ..Default::default()
            },
            run_id: run.into(),
            steps,
            ..Default::default()
        }
    }

    #[test]
    fn merged_steps_add_up_and_latencies_merge_exactly() {
        let a =
            report("a", vec![step(0, 100, 100, &[1_000; 100]), step(1, 200, 190, &[2_000; 190])]);
        let b = report("b", vec![step(0, 100, 98, &[9_000; 98]), step(1, 200, 200, &[4_000; 200])]);
        let m = merge(&[a, b]).expect("compatible");
        assert_eq!(m.run_id, "a,b");
        assert_eq!(m.settings.devices, 20);
        assert_eq!(m.settings.rates, vec![200, 400]);
        assert_eq!(m.steps.len(), 2);
        let s0 = &m.steps[0];
        assert_eq!((s0.offered_rate, s0.sent, s0.delivered, s0.lost), (200, 200, 198, 2));
        assert_eq!(s0.latency.count, 198);
        // 100 at 1 ms, 98 at 9 ms: the median is 1 ms, p99 is 9 ms.
        assert_eq!(s0.latency.p50_us / 100, 10);
        assert_eq!(s0.latency.p99_us / 100, 90);
        assert_eq!(s0.failures.get("http 503"), Some(&2));
        // The same process watched by both counts once.
        assert_eq!(s0.processes.len(), 1);
        assert!((s0.processes[0].cpu_secs - 0.5).abs() < 1e-9);
        let t = &m.totals;
        assert_eq!((t.sent, t.delivered, t.lost, t.latency.count), (600, 588, 12, 588));
        assert!((t.loss_ratio - 0.02).abs() < 1e-9);
        assert_eq!(t.failures.get("http 503"), Some(&12));
        assert_eq!(m.msr.as_ref().map(|m| m.step), Some(None), "1 % loss is not sustained");
    }

    #[test]
    fn incompatible_results_are_refused() {
        let a = report("a", vec![step(0, 100, 100, &[1_000])]);
        let mut b = a.clone();
        b.settings.rates.push(5);
        assert!(merge(&[a.clone(), b]).is_err());
        let mut c = a.clone();
        c.settings.transport = "mqtt".into();
        assert!(merge(&[a.clone(), c]).is_err());
        let mut d = a.clone();
        d.steps[0].latency_histogram.clear();
        assert!(merge(&[a, d]).is_err());
        assert!(merge(&[]).is_err());
    }

    #[test]
    fn different_processes_under_one_name_add_up() {
        let a = report("a", vec![step(0, 100, 100, &[1_000])]);
        let mut b = report("b", vec![step(0, 100, 100, &[1_000])]);
        b.steps[0].processes[0].pid = 43;
        b.steps[0].processes[0].pids = vec![43];
        let m = merge(&[a, b]).expect("compatible");
        let p = &m.steps[0].processes[0];
        assert_eq!((p.pids.clone(), p.rss_kib), (vec![42, 43], Some(2000)));
        assert!((p.cpu_secs - 1.0).abs() < 1e-9);
    }
}

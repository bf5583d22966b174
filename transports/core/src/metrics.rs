//! Lock-free counters and their Prometheus text exposition, shared by every component that
//! reports to `/metrics`. Names follow DESIGN's `fleetgate_<area>_<what>_<unit>`.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Appends one metric family with a single sample. `labels` is empty or `{k="v",...}`.
pub fn write_metric(
    out: &mut String,
    kind: &str,
    name: &str,
    help: &str,
    labels: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{labels} {value}");
}

/// Regroups Prometheus text so that each metric family appears once: its first `# HELP` and
/// `# TYPE` lines, then every sample of that name in the order rendered. Several components
/// (each transport, say) may render samples of the same family with different labels; strict
/// parsers reject a family that is declared twice.
pub fn merge_families(text: &str) -> String {
    #[derive(Default)]
    struct Family<'a> {
        name: &'a str,
        help: Option<&'a str>,
        kind: Option<&'a str>,
        samples: Vec<&'a str>,
    }
    // A few dozen families: a linear search keeps the first-rendered order simply.
    let mut families: Vec<Family<'_>> = Vec::new();
    fn family<'a, 'b>(families: &'b mut Vec<Family<'a>>, name: &'a str) -> &'b mut Family<'a> {
        let i = match families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                families.push(Family { name, ..Default::default() });
                families.len() - 1
            }
        };
        &mut families[i]
    }
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            family(&mut families, rest.split(' ').next().unwrap_or("")).help.get_or_insert(line);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            family(&mut families, rest.split(' ').next().unwrap_or("")).kind.get_or_insert(line);
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            family(&mut families, name).samples.push(line);
        }
    }
    let mut out = String::with_capacity(text.len());
    for f in &families {
        for line in f.help.iter().chain(f.kind.iter()).chain(f.samples.iter()) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_declared_once() {
        let mut text = String::new();
        write_metric(&mut text, "counter", "a_total", "A", "{transport=\"mqtt\"}", 1);
        write_metric(&mut text, "gauge", "b", "B", "", 2);
        write_metric(&mut text, "counter", "a_total", "A", "{transport=\"http\"}", 3);
        let merged = merge_families(&text);
        assert_eq!(
            merged,
            "# HELP a_total A\n# TYPE a_total counter\na_total{transport=\"mqtt\"} 1\n\
             a_total{transport=\"http\"} 3\n# HELP b B\n# TYPE b gauge\nb 2\n"
        );
    }
}

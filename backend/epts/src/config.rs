//! EPTS settings (`epts.*`) and the time-series part of an application's configuration
//! (`applications.<app>.time_series`), mirroring Kaa's EPTS configuration in snake case.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `epts.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EptsConfig {
    /// Service instance name: the queue group replicas share, the transmitter token of 14/TSTP
    /// subjects, `receiverServiceInstanceName` in 13/DSTP answers (what
    /// `dcx.reliable_receivers` lists).
    pub instance: String,
    /// Data-samples events waiting to be stored before reading from the bus waits.
    pub queue_capacity: usize,
    /// Points written to storage in one batch (one fsync or one transaction) at most.
    pub max_batch_points: usize,
    /// The most points one REST query answers (its `limit` is capped here).
    pub max_query_points: usize,
    /// Whether stored points are broadcast on 14/TSTP.
    pub emit_events: bool,
    /// How often the retention sweep runs.
    pub retention_sweep_interval_ms: u64,
}

impl Default for EptsConfig {
    fn default() -> Self {
        Self {
            instance: "epts".into(),
            queue_capacity: 1024,
            max_batch_points: 8192,
            max_query_points: 10_000,
            emit_events: true,
            retention_sweep_interval_ms: 3_600_000,
        }
    }
}

impl EptsConfig {
    /// Values out of range, as `(setting, what is wrong)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("queue_capacity", self.queue_capacity as u64),
            ("max_batch_points", self.max_batch_points as u64),
            ("max_query_points", self.max_query_points as u64),
            ("retention_sweep_interval_ms", self.retention_sweep_interval_ms),
        ] {
            if value == 0 {
                problems.push((key, "0 is too small: the minimum is 1".to_owned()));
            }
        }
        if !fleetgate_messages::subjects::is_valid_token(&self.instance) {
            problems
                .push(("instance", format!("`{}` is not a valid subject token", self.instance)));
        }
        problems
    }
}

/// An application's app versions and time-series settings, as EPTS needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppTimeSeries {
    /// Its app versions (what devices name).
    pub versions: Vec<String>,
    /// Its time-series settings.
    pub time_series: TimeSeriesConfig,
}

/// `applications.<app>.time_series`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeSeriesConfig {
    /// Every numeric top-level field of a sample becomes series `auto~<field>` with one value
    /// named `value`.
    pub auto_extract: bool,
    /// Named series and the sample fields their values come from.
    pub names: BTreeMap<String, SeriesConfig>,
    /// Where a sample's time is; unset: the time EPTS received it.
    pub timestamp: Option<TimestampConfig>,
    /// Points older than this many days are deleted; 0 keeps them forever.
    pub retention_days: u32,
}

/// `applications.<app>.time_series.names.<series>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeriesConfig {
    /// The series' values.
    pub values: Vec<ValueConfig>,
}

/// One value of a named series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueConfig {
    /// Path of the field in the sample: field names separated by `.` (a leading `$.` is
    /// allowed, as in Kaa 1.0).
    pub path: String,
    /// The value's name in responses and events.
    #[serde(default = "default_value_name")]
    pub name: String,
    /// What the field must hold.
    #[serde(rename = "type", default)]
    pub kind: ValueKind,
}

fn default_value_name() -> String {
    "value".into()
}

/// The type a value must have; a sample whose field has another is skipped for that series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueKind {
    /// A JSON number.
    #[default]
    Number,
    /// A JSON string.
    String,
}

/// `applications.<app>.time_series.timestamp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestampConfig {
    /// Path of the field (as for values).
    pub path: String,
    /// How the field is written.
    #[serde(default)]
    pub format: TimestampFormat,
    /// What to do when it is missing or unreadable.
    #[serde(default)]
    pub fallback: Fallback,
}

/// How a sample's timestamp is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimestampFormat {
    /// A number of milliseconds since the Unix epoch.
    #[default]
    MillisUnixEpoch,
    /// A number of seconds since the Unix epoch (fractions allowed).
    UnixSeconds,
    /// An ISO-8601 string (`2019-04-26T15:41:07Z`, `...+0000`, `...+02:00`).
    Iso8601,
}

/// What happens to a sample without a readable timestamp.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// The time EPTS received it.
    #[default]
    ServerTimestamp,
    /// It is skipped (and counted).
    Reject,
}

/// Names Kaa reserves (they are identifiers of its time-series database).
const RESERVED: &[&str] = &["time", "kaaEndpointID", "kaaEmpty", "_field", "_measurement"];

/// Whether `name` is a valid series name or auto-extracted field: `[A-Za-z0-9_-]+`, not
/// reserved.
pub fn is_valid_series_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && !RESERVED.contains(&name)
}

/// Whether `name` is a valid value name: not empty, none of `\ ^ $ ' " = ,`, not reserved.
pub fn is_valid_value_name(name: &str) -> bool {
    !name.is_empty()
        && !name.chars().any(|c| matches!(c, '\\' | '^' | '$' | '\'' | '"' | '=' | ','))
        && !RESERVED.contains(&name)
}

impl TimeSeriesConfig {
    /// Values that break Kaa's name rules, as `(setting under time_series, what is wrong)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        for (series, config) in &self.names {
            let key = format!("names.{series}");
            if !is_valid_series_name(series) {
                problems.push((
                    key.clone(),
                    "a series name is made of A-Z, a-z, 0-9, `_` and `-` and is not one of time, kaaEndpointID, kaaEmpty, _field, _measurement".into(),
                ));
            }
            if config.values.is_empty() {
                problems
                    .push((format!("{key}.values"), "a series needs at least one value".into()));
            }
            let mut seen = std::collections::BTreeSet::new();
            for (i, value) in config.values.iter().enumerate() {
                let at = format!("{key}.values[{i}]");
                if !is_valid_value_name(&value.name) {
                    problems.push((
                        format!("{at}.name"),
                        format!("`{}` is not a valid value name (none of \\ ^ $ ' \" = , and not reserved)", value.name),
                    ));
                }
                if !seen.insert(value.name.as_str()) {
                    problems
                        .push((format!("{at}.name"), format!("`{}` is used twice", value.name)));
                }
                if parse_path(&value.path).is_none() {
                    problems.push((
                        format!("{at}.path"),
                        format!("`{}` is not a field path", value.path),
                    ));
                }
            }
        }
        if let Some(ts) = &self.timestamp
            && parse_path(&ts.path).is_none()
        {
            problems.push(("timestamp.path".into(), format!("`{}` is not a field path", ts.path)));
        }
        problems
    }
}

/// The field names of a path (`a.b`, `$.a.b`); `None` when it is empty or has an empty part.
pub fn parse_path(path: &str) -> Option<Vec<&str>> {
    let path = path.strip_prefix("$.").unwrap_or(path);
    let parts: Vec<&str> = path.split('.').collect();
    parts.iter().all(|p| !p.is_empty()).then_some(parts)
}

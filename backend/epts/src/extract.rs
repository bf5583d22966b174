//! Data points from a JSON data sample, per an application's time-series configuration:
//! auto-extraction, named series, the sample's timestamp. A value that is missing or of the
//! wrong type skips that series' point (with its reason); the rest of the sample is kept.

use fleetgate_storage::Value;
use serde_json::Value as Json;

use crate::config::{
    Fallback, TimeSeriesConfig, TimestampFormat, ValueKind, is_valid_series_name, parse_path,
};
use crate::time::parse_iso8601;

/// Series names made by auto-extraction start with this.
pub const AUTO_PREFIX: &str = "auto~";

/// Why a point (or a whole sample) was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The sample is not JSON.
    NotJson,
    /// The sample is JSON but not an object.
    NotAnObject,
    /// A configured value's field is missing.
    MissingPath,
    /// A configured value's field holds another type.
    WrongType,
    /// The timestamp is missing or unreadable and the fallback is `reject`.
    BadTimestamp,
    /// The sample's app version belongs to no configured application.
    UnknownAppVersion,
}

impl SkipReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotJson => "not_json",
            SkipReason::NotAnObject => "not_an_object",
            SkipReason::MissingPath => "missing_path",
            SkipReason::WrongType => "wrong_type",
            SkipReason::BadTimestamp => "bad_timestamp",
            SkipReason::UnknownAppVersion => "unknown_app_version",
        }
    }
}

/// One extracted point, before it is given its application and endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// The series.
    pub series: String,
    /// Its time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// Its values.
    pub values: Vec<(String, Value)>,
}

/// What happened to one sample besides the points it gave.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Points or samples skipped, by reason.
    pub skipped: Vec<SkipReason>,
    /// Whether the receipt time stood in for a missing or unreadable timestamp.
    pub fell_back: bool,
}

struct NamedValue {
    path: Vec<String>,
    name: String,
    kind: ValueKind,
}

/// The extraction settings of one application, with paths parsed once.
pub struct Extractor {
    auto: bool,
    named: Vec<(String, Vec<NamedValue>)>,
    timestamp: Option<(Vec<String>, TimestampFormat, Fallback)>,
}

fn owned_path(path: &str) -> Vec<String> {
    parse_path(path).unwrap_or_default().into_iter().map(str::to_owned).collect()
}

fn lookup<'a>(sample: &'a Json, path: &[String]) -> Option<&'a Json> {
    if path.is_empty() {
        return None;
    }
    path.iter().try_fold(sample, |v, part| v.get(part.as_str()))
}

fn number(n: &serde_json::Number) -> Value {
    match n.as_i64() {
        Some(i) => Value::Long(i),
        None => Value::Double(n.as_f64().unwrap_or(f64::NAN)),
    }
}

impl Extractor {
    /// The extractor for `config` (whose problems were checked at start-up).
    pub fn new(config: &TimeSeriesConfig) -> Self {
        Self {
            auto: config.auto_extract,
            named: config
                .names
                .iter()
                .map(|(series, c)| {
                    let values = c
                        .values
                        .iter()
                        .map(|v| NamedValue {
                            path: owned_path(&v.path),
                            name: v.name.clone(),
                            kind: v.kind,
                        })
                        .collect();
                    (series.clone(), values)
                })
                .collect(),
            timestamp: config
                .timestamp
                .as_ref()
                .map(|t| (owned_path(&t.path), t.format, t.fallback)),
        }
    }

    /// The points of one `sample` received at `received_ms`, appended to `out`.
    pub fn extract(&self, sample: &[u8], received_ms: i64, out: &mut Vec<Extracted>) -> Report {
        let mut report = Report::default();
        let json: Json = match serde_json::from_slice(sample) {
            Ok(j) => j,
            Err(_) => {
                report.skipped.push(SkipReason::NotJson);
                return report;
            }
        };
        let Json::Object(fields) = &json else {
            report.skipped.push(SkipReason::NotAnObject);
            return report;
        };
        let timestamp_ms = match &self.timestamp {
            None => received_ms,
            Some((path, format, fallback)) => {
                match lookup(&json, path).and_then(|v| read_timestamp(v, *format)) {
                    Some(ts) => ts,
                    None if *fallback == Fallback::ServerTimestamp => {
                        report.fell_back = true;
                        received_ms
                    }
                    None => {
                        report.skipped.push(SkipReason::BadTimestamp);
                        return report;
                    }
                }
            }
        };
        if self.auto {
            // The timestamp field is the points' time, not a series of its own.
            let ts_field =
                self.timestamp.as_ref().and_then(|(p, _, _)| (p.len() == 1).then(|| &p[0]));
            for (key, value) in fields {
                let Json::Number(n) = value else { continue };
                if Some(key) == ts_field || !is_valid_series_name(key) {
                    continue;
                }
                out.push(Extracted {
                    series: format!("{AUTO_PREFIX}{key}"),
                    timestamp_ms,
                    values: vec![("value".into(), number(n))],
                });
            }
        }
        'series: for (series, values) in &self.named {
            let mut point = Vec::with_capacity(values.len());
            for v in values {
                let value = match (lookup(&json, &v.path), v.kind) {
                    (None, _) => {
                        report.skipped.push(SkipReason::MissingPath);
                        continue 'series;
                    }
                    (Some(Json::Null), _) => Value::Null,
                    (Some(Json::Number(n)), ValueKind::Number) => number(n),
                    (Some(Json::String(s)), ValueKind::String) => Value::String(s.clone()),
                    (Some(_), _) => {
                        report.skipped.push(SkipReason::WrongType);
                        continue 'series;
                    }
                };
                point.push((v.name.clone(), value));
            }
            out.push(Extracted { series: series.clone(), timestamp_ms, values: point });
        }
        report
    }
}

fn read_timestamp(value: &Json, format: TimestampFormat) -> Option<i64> {
    let in_range = |ms: f64| (ms.is_finite() && ms.abs() < 9.0e15).then_some(ms.round() as i64);
    match (format, value) {
        (TimestampFormat::MillisUnixEpoch, Json::Number(n)) => match n.as_i64() {
            Some(i) => Some(i),
            None => in_range(n.as_f64()?),
        },
        (TimestampFormat::UnixSeconds, Json::Number(n)) => in_range(n.as_f64()? * 1000.0),
        (TimestampFormat::Iso8601, Json::String(s)) => parse_iso8601(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SeriesConfig, TimestampConfig, ValueConfig};

    fn config(yaml: &str) -> TimeSeriesConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn run(c: &TimeSeriesConfig, sample: &str) -> (Vec<Extracted>, Report) {
        let mut out = Vec::new();
        let report = Extractor::new(c).extract(sample.as_bytes(), 1000, &mut out);
        out.sort_by(|a, b| a.series.cmp(&b.series));
        (out, report)
    }

    #[test]
    fn auto_extraction_takes_numeric_top_level_fields() {
        let c = config("auto_extract: true");
        let (points, report) = run(
            &c,
            r#"{"temperature":21.5,"humidity":80,"name":"x","nested":{"a":1},"bad.key":3,"time":4}"#,
        );
        let got: Vec<_> = points.iter().map(|p| (p.series.as_str(), p.values.clone())).collect();
        assert_eq!(
            got,
            [
                ("auto~humidity", vec![("value".to_owned(), Value::Long(80))]),
                ("auto~temperature", vec![("value".to_owned(), Value::Double(21.5))]),
            ]
        );
        assert!(points.iter().all(|p| p.timestamp_ms == 1000));
        assert_eq!(report, Report::default());
    }

    #[test]
    fn named_series_take_their_values_and_skip_with_a_reason() {
        let c = config(
            r#"
names:
  location:
    values:
      - {path: gps.lat, name: latitude, type: number}
      - {path: gps.lon, name: longitude}
  label:
    values:
      - {path: "$.label", type: string}
"#,
        );
        let (points, report) = run(&c, r#"{"gps":{"lat":1.5,"lon":-2},"label":"a"}"#);
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].values, [("value".to_owned(), Value::String("a".into()))]);
        assert_eq!(
            points[1].values,
            [
                ("latitude".to_owned(), Value::Double(1.5)),
                ("longitude".to_owned(), Value::Long(-2))
            ]
        );
        assert!(report.skipped.is_empty());

        let (points, report) = run(&c, r#"{"gps":{"lat":"north","lon":1},"label":null}"#);
        assert_eq!(points.len(), 1, "the label point (explicit null) is kept");
        assert_eq!(points[0].values, [("value".to_owned(), Value::Null)]);
        assert_eq!(report.skipped, [SkipReason::WrongType]);

        let (points, report) = run(&c, r#"{"label":"b"}"#);
        assert_eq!(points.len(), 1);
        assert_eq!(report.skipped, [SkipReason::MissingPath]);
    }

    #[test]
    fn timestamps_in_every_format_and_their_fallbacks() {
        let with = |format: &str, fallback: &str| {
            config(&format!(
                "auto_extract: true\ntimestamp: {{path: ts, format: {format}, fallback: {fallback}}}"
            ))
        };
        let millis = with("millis-unix-epoch", "reject");
        let (p, _) = run(&millis, r#"{"t":1,"ts":1556293267123}"#);
        assert_eq!((p.len(), p[0].timestamp_ms), (1, 1_556_293_267_123), "ts is not a series");
        let (p, _) = run(&with("unix-seconds", "reject"), r#"{"t":1,"ts":1556293267.5}"#);
        assert_eq!(p[0].timestamp_ms, 1_556_293_267_500);
        let (p, _) = run(&with("iso8601", "reject"), r#"{"t":1,"ts":"2019-04-26T15:41:07+0000"}"#);
        assert_eq!(p[0].timestamp_ms, 1_556_293_267_000);

        let (p, r) = run(&millis, r#"{"t":1,"ts":"soon"}"#);
        assert!(p.is_empty());
        assert_eq!(r.skipped, [SkipReason::BadTimestamp]);
        let (p, r) = run(&millis, r#"{"t":1}"#);
        assert!(p.is_empty());
        assert_eq!(r.skipped, [SkipReason::BadTimestamp]);

        let lenient = with("iso8601", "server-timestamp");
        let (p, r) = run(&lenient, r#"{"t":1,"ts":"2019-13-45"}"#);
        assert_eq!(p[0].timestamp_ms, 1000);
        assert!(r.fell_back && r.skipped.is_empty());
    }

    #[test]
    fn samples_that_are_not_objects_are_skipped() {
        let c = config("auto_extract: true");
        assert_eq!(run(&c, "[1,2]").1.skipped, [SkipReason::NotAnObject]);
        assert_eq!(run(&c, "42").1.skipped, [SkipReason::NotAnObject]);
        assert_eq!(run(&c, "{nope").1.skipped, [SkipReason::NotJson]);
    }

    #[test]
    fn name_rules_are_checked() {
        let mut c = TimeSeriesConfig::default();
        c.names.insert(
            "time".into(),
            SeriesConfig {
                values: vec![ValueConfig {
                    path: "a..b".into(),
                    name: "x,y".into(),
                    kind: ValueKind::Number,
                }],
            },
        );
        c.names.insert("ok-name_1".into(), SeriesConfig { values: vec![] });
        c.timestamp = Some(TimestampConfig {
            path: String::new(),
            format: TimestampFormat::Iso8601,
            fallback: Fallback::Reject,
        });
        let keys: Vec<_> = c.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "names.ok-name_1.values",
                "names.time",
                "names.time.values[0].name",
                "names.time.values[0].path",
                "timestamp.path"
            ]
        );
    }
}

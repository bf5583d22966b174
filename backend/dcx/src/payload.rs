//! 2/DCP payloads turned into data samples.

use std::borrow::Cow;

use serde_json::value::RawValue;

/// Why a request's payload cannot become samples. Always the device's fault.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// Not valid JSON.
    #[error("payload is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    /// A `plain` payload that does not start with a number.
    #[error("plain payload must be a number with an optional unit, e.g. `47` or `47%`")]
    InvalidPlain,
    /// The resource path is not one of DCX's.
    #[error("unknown data collection resource `{0}`; use /json or /plain/<metric>")]
    UnknownResource(String),
}

impl SampleError {
    /// The DESIGN status code for this error.
    pub fn status(&self) -> i32 {
        match self {
            SampleError::UnknownResource(_) => 404,
            SampleError::InvalidJson(_) | SampleError::InvalidPlain => 400,
        }
    }
}

/// The samples of a request to `resource_path` with `payload`, each one JSON value. Samples of
/// a `/json` batch are slices of the payload, not copies.
pub fn samples_of<'a>(
    resource_path: &str,
    payload: &'a [u8],
) -> Result<Vec<Cow<'a, [u8]>>, SampleError> {
    if resource_path == "/json" {
        return json_samples(payload);
    }
    if let Some(metric) = resource_path.strip_prefix("/plain/")
        && !metric.is_empty()
        && !metric.contains('/')
    {
        return plain_sample(metric, payload).map(|s| vec![Cow::Owned(s)]);
    }
    Err(SampleError::UnknownResource(resource_path.to_owned()))
}

/// DESIGN decision 4: a JSON array is a batch, any other JSON value is one sample.
fn json_samples(payload: &[u8]) -> Result<Vec<Cow<'_, [u8]>>, SampleError> {
    let invalid = SampleError::InvalidJson;
    let whole: &RawValue = serde_json::from_slice(payload).map_err(invalid)?;
    let text = whole.get();
    if text.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).map_err(invalid)?;
        Ok(items.into_iter().map(|v| Cow::Borrowed(v.get().as_bytes())).collect())
    } else {
        Ok(vec![Cow::Borrowed(text.as_bytes())])
    }
}

/// `47%` on `/plain/humidity` becomes `{"humidity-value":47,"humidity-unit":"%"}`; without a
/// unit the unit is `number`.
fn plain_sample(metric: &str, payload: &[u8]) -> Result<Vec<u8>, SampleError> {
    let text = std::str::from_utf8(payload).map_err(|_| SampleError::InvalidPlain)?.trim();
    let end = number_prefix_len(text);
    let number: serde_json::Number = text[..end].parse().map_err(|_| SampleError::InvalidPlain)?;
    let unit = text[end..].trim();
    let unit = if unit.is_empty() { "number" } else { unit };
    let mut sample = serde_json::Map::new();
    sample.insert(format!("{metric}-value"), serde_json::Value::Number(number));
    sample.insert(format!("{metric}-unit"), serde_json::Value::String(unit.to_owned()));
    serde_json::to_vec(&sample).map_err(|_| SampleError::InvalidPlain)
}

/// Length of the JSON-number-shaped prefix of `s` (sign, digits, fraction, exponent).
fn number_prefix_len(s: &str) -> usize {
    let b = s.as_bytes();
    let digits = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    let mut i = usize::from(b.first() == Some(&b'-'));
    let int_end = digits(i);
    if int_end == i {
        return 0;
    }
    i = int_end;
    if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        i = digits(i + 1);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let exp_end = digits(j);
        if exp_end > j {
            i = exp_end;
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(samples: Vec<Cow<'_, [u8]>>) -> Vec<String> {
        samples.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect()
    }

    #[test]
    fn array_is_a_batch_of_raw_slices() {
        let payload = br#"[{"temperature":21}, 15, ["an","array",13], {"humidity": 88}]"#;
        let samples = samples_of("/json", payload).expect("valid");
        assert!(samples.iter().all(|s| matches!(s, Cow::Borrowed(_))));
        assert_eq!(
            strings(samples),
            [r#"{"temperature":21}"#, "15", r#"["an","array",13]"#, r#"{"humidity": 88}"#]
        );
    }

    #[test]
    fn any_other_value_is_one_sample() {
        assert_eq!(strings(samples_of("/json", br#" {"t":1} "#).expect("valid")), [r#"{"t":1}"#]);
        assert_eq!(strings(samples_of("/json", b"42").expect("valid")), ["42"]);
        assert_eq!(strings(samples_of("/json", b"[]").expect("valid")), Vec::<String>::new());
    }

    #[test]
    fn invalid_json_is_400() {
        for bad in [&b"[{"[..], b"", b"{\"a\":}", b"[1,]", b"\xff"] {
            let e = samples_of("/json", bad).expect_err("invalid");
            assert_eq!(e.status(), 400, "{e}");
        }
    }

    #[test]
    fn plain_metric() {
        let s = strings(samples_of("/plain/humidity", b"47%").expect("valid"));
        assert_eq!(s, [r#"{"humidity-unit":"%","humidity-value":47}"#]);
        let s = strings(samples_of("/plain/temp", b" -21.5e1 C\n").expect("valid"));
        assert_eq!(s, [r#"{"temp-unit":"C","temp-value":-215.0}"#]);
        let s = strings(samples_of("/plain/count", b"3").expect("valid"));
        assert_eq!(s, [r#"{"count-unit":"number","count-value":3}"#]);
        for bad in [&b"abc"[..], b"", b"-", b".5", b"\xff"] {
            assert!(matches!(samples_of("/plain/x", bad), Err(SampleError::InvalidPlain)));
        }
    }

    #[test]
    fn unknown_resources_are_404() {
        for path in ["/xml", "/plain", "/plain/", "/plain/a/b", "/json/x"] {
            assert_eq!(samples_of(path, b"1").map_err(|e| e.status()), Err(404), "{path}");
        }
    }
}

//! 7/CMP requests as devices send them: the resource (`/config/json[/<name>]`,
//! `/applied/json[/<name>]`) and the JSON bodies, checked field by field so that a device
//! hears exactly what is wrong. Bodies are objects with only the fields 7/CMP defines
//! (`additionalProperties: false`); an empty body is an empty object.

use serde_json::{Map, Value};

/// Which 7/CMP resource, with its configuration name (`default` when none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// `/config/json[/<name>]`.
    Config(String),
    /// `/applied/json[/<name>]`.
    Applied(String),
}

/// Whether `name` can name a configuration: `^[a-zA-Z0-9_-]+$`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The resource of an ESP `resourcePath` (leading slash, no token, no request id); a name in
/// the ESP `configName` field counts when the path has none. `Err`: why it is not one (404).
pub fn resource_of(path: &str, config_name: Option<&str>) -> Result<Resource, String> {
    let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
    let kind = parts.next().unwrap_or_default();
    let format = parts.next();
    let name = parts.next();
    if parts.next().is_some() || format != Some("json") {
        return Err(format!(
            "unknown resource path {path}: use /config/json[/<name>] or /applied/json[/<name>]"
        ));
    }
    let name = match name.or(config_name) {
        None => crate::DEFAULT_NAME.to_owned(),
        Some(n) if is_valid_name(n) => n.to_owned(),
        Some(n) => return Err(format!("configuration name `{n}` does not match ^[a-zA-Z0-9_-]+$")),
    };
    match kind {
        "config" => Ok(Resource::Config(name)),
        "applied" => Ok(Resource::Applied(name)),
        _ => Err(format!(
            "unknown resource path {path}: use /config/json[/<name>] or /applied/json[/<name>]"
        )),
    }
}

fn object(payload: &[u8], known: &[&str]) -> Result<Map<String, Value>, String> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| format!("payload: not valid JSON: {e}"))?;
    let Value::Object(map) = value else {
        return Err("payload: must be a JSON object".into());
    };
    if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("{k}: unknown field (known: {})", known.join(", ")));
    }
    Ok(map)
}

/// A `/config` request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigAsk {
    /// The id the device has applied.
    pub config_id: Option<String>,
    /// Its observe choice.
    pub observe: Option<bool>,
}

/// Parses a `/config` body: `{"configId"?: string, "observe"?: boolean}`.
pub fn parse_config_request(payload: &[u8]) -> Result<ConfigAsk, String> {
    let map = object(payload, &["configId", "observe"])?;
    let config_id = match map.get("configId") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("configId: must be a string".into()),
    };
    let observe = match map.get("observe") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err("observe: must be true or false".into()),
    };
    Ok(ConfigAsk { config_id, observe })
}

/// An `/applied` request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The configuration the device tried.
    pub config_id: String,
    /// 2xx: applied (200 when absent).
    pub status_code: i32,
    /// Why, especially on failure.
    pub reason: Option<String>,
}

/// Parses an `/applied` body: `{"configId": string, "statusCode"?: integer,
/// "reasonPhrase"?: string}`.
pub fn parse_applied(payload: &[u8]) -> Result<Applied, String> {
    let map = object(payload, &["configId", "statusCode", "reasonPhrase"])?;
    let config_id = match map.get("configId") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("configId: must be a string".into()),
        None => return Err("configId: required".into()),
    };
    let status_code = match map.get("statusCode") {
        None => 200,
        Some(v) => v
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .filter(|n| (100..=599).contains(n))
            .ok_or("statusCode: must be an integer status code from 100 to 599")?,
    };
    let reason = match map.get("reasonPhrase") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("reasonPhrase: must be a string".into()),
    };
    Ok(Applied { config_id, status_code, reason })
}

/// Runs every parser on arbitrary input (the fuzz target).
pub fn fuzz(path: &str, payload: &[u8]) {
    let _ = resource_of(path, None);
    let _ = parse_config_request(payload);
    let _ = parse_applied(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_and_names() {
        assert_eq!(resource_of("/config/json", None), Ok(Resource::Config("default".into())));
        assert_eq!(
            resource_of("/config/json/network", None),
            Ok(Resource::Config("network".into()))
        );
        assert_eq!(
            resource_of("/config/json", Some("net_2")),
            Ok(Resource::Config("net_2".into()))
        );
        assert_eq!(resource_of("/applied/json/a-b", None), Ok(Resource::Applied("a-b".into())));
        for bad in [
            "/config",
            "/config/xml",
            "/json",
            "/config/json/a/b",
            "/other/json",
            "",
            "/config/json/",
        ] {
            assert!(resource_of(bad, None).is_err(), "{bad}");
        }
        let e = resource_of("/config/json/bad.name", None).unwrap_err();
        assert!(e.contains("bad.name"), "{e}");
    }

    #[test]
    fn config_bodies() {
        assert_eq!(parse_config_request(b""), Ok(ConfigAsk::default()));
        assert_eq!(parse_config_request(b"{}"), Ok(ConfigAsk::default()));
        assert_eq!(
            parse_config_request(br#"{"configId":"c1","observe":false}"#),
            Ok(ConfigAsk { config_id: Some("c1".into()), observe: Some(false) })
        );
        for (body, reason) in [
            (&b"[1]"[..], "payload: must be a JSON object"),
            (b"{", "payload: not valid JSON"),
            (br#"{"observe":"yes"}"#, "observe: must be true or false"),
            (br#"{"configId":1}"#, "configId: must be a string"),
            (br#"{"colour":1}"#, "colour: unknown field"),
        ] {
            let e = parse_config_request(body).unwrap_err();
            assert!(e.starts_with(reason), "{e}");
        }
    }

    #[test]
    fn applied_bodies() {
        assert_eq!(
            parse_applied(br#"{"configId":"c1"}"#),
            Ok(Applied { config_id: "c1".into(), status_code: 200, reason: None })
        );
        assert_eq!(
            parse_applied(br#"{"configId":"c1","statusCode":400,"reasonPhrase":"no"}"#),
            Ok(Applied { config_id: "c1".into(), status_code: 400, reason: Some("no".into()) })
        );
        for (body, reason) in [
            (&b"{}"[..], "configId: required"),
            (b"", "configId: required"),
            (br#"{"configId":"c","statusCode":2.5}"#, "statusCode:"),
            (br#"{"configId":"c","statusCode":99999999999}"#, "statusCode:"),
            (br#"{"configId":"c","extra":true}"#, "extra: unknown field"),
            (b"\"x\"", "payload: must be a JSON object"),
        ] {
            let e = parse_applied(body).unwrap_err();
            assert!(e.starts_with(reason), "{e}");
        }
    }
}

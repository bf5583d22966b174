//! Loading fleetgate's YAML configuration, with `FLEETGATE_*` environment overrides.
//!
//! The file is chosen by [`ConfigSource::resolve`]; [`load`] reads it, lays every
//! `FLEETGATE_<KEY_PATH>` variable over it and deserializes the result strictly, so an unknown key
//! or a value of the wrong type is an error naming its dotted key path (and the variable, if the
//! value came from the environment). Every [`ConfigError`] is the operator's fault.
//!
//! This module knows nothing about the settings themselves: it works for any `T` whose structs are
//! all `#[serde(default, deny_unknown_fields)]` with a `Default`. Environment variables are
//! resolved against the keys of `T::default()` serialized to YAML, so `T` must serialize every
//! field, including `None` ones (no `skip_serializing_if`), or that key cannot be set from the
//! environment. A variable aimed at a key whose default is a string or `null` is taken verbatim as
//! a string, so an `Option` of a non-string type needs its value in the file instead.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

/// Prefix of every environment variable that overrides a setting.
const ENV_PREFIX: &str = "FLEETGATE_";
/// The variable naming the configuration file; never an override.
const CONFIG_VAR: &str = "FLEETGATE_CONFIG";
/// Configuration file used when neither `--config` nor `FLEETGATE_CONFIG` is given.
const DEFAULT_PATH: &str = "/srv/fleetgate/service-config.yml";

/// Where the configuration comes from, resolved by [`ConfigSource::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A YAML file; it must exist.
    File(PathBuf),
    /// No file: every setting keeps its built-in default unless overridden from the environment.
    BuiltInDefaults,
}

impl ConfigSource {
    /// `--config` path if given, else `$FLEETGATE_CONFIG`, else
    /// `/srv/fleetgate/service-config.yml` where it exists, else built-in defaults.
    /// `env` is the process environment (injectable for tests).
    pub fn resolve(cli: Option<&Path>, env: &HashMap<String, String>) -> ConfigSource {
        Self::resolve_with(cli, env, Path::new(DEFAULT_PATH))
    }

    fn resolve_with(cli: Option<&Path>, env: &HashMap<String, String>, fallback: &Path) -> Self {
        if let Some(path) = cli {
            ConfigSource::File(path.to_path_buf())
        } else if let Some(path) = env.get(CONFIG_VAR).filter(|p| !p.is_empty()) {
            ConfigSource::File(PathBuf::from(path))
        } else if fallback.is_file() {
            ConfigSource::File(fallback.to_path_buf())
        } else {
            ConfigSource::BuiltInDefaults
        }
    }
}

/// A configuration error: the file, a key in it or a `FLEETGATE_*` variable is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read (missing, unreadable).
    #[error("configuration file {}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not valid YAML; the message carries line and column.
    #[error("configuration file {}: invalid YAML: {source}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's error, with its location.
        source: serde_yaml::Error,
    },
    /// The file's top level is not a mapping of settings.
    #[error("configuration file {}: the top level must be a mapping of settings", path.display())]
    NotAMapping {
        /// The file.
        path: PathBuf,
    },
    /// A `FLEETGATE_*` variable matches no setting.
    #[error("{var} is not a fleetgate setting")]
    UnknownVariable {
        /// The variable.
        var: String,
    },
    /// A `FLEETGATE_*` variable matches more than one setting.
    #[error("{var} is ambiguous: it matches the settings {}", keys.join(", "))]
    AmbiguousVariable {
        /// The variable.
        var: String,
        /// Dotted paths of every setting it matches.
        keys: Vec<String>,
    },
    /// A `FLEETGATE_*` variable's value is not a valid YAML flow value.
    #[error("{var}: invalid value for `{key}`: {source}")]
    BadValue {
        /// The variable.
        var: String,
        /// Dotted path of the setting it overrides.
        key: String,
        /// The parser's error.
        source: serde_yaml::Error,
    },
    /// A key is unknown or its value has the wrong type.
    #[error("{}{key}: {message}", origin(file.as_deref(), var.as_deref()))]
    Invalid {
        /// The file the value came from, if any.
        file: Option<PathBuf>,
        /// The variable the value came from, if it came from the environment.
        var: Option<String>,
        /// Dotted path of the key, e.g. `transports.mqtt.listen` or `auth.endpoints[0].token`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The built-in defaults cannot be serialized; a bug in the configuration type.
    #[error("bug: the built-in configuration defaults cannot be serialized: {0}")]
    Defaults(#[source] serde_yaml::Error),
}

fn origin(file: Option<&Path>, var: Option<&str>) -> String {
    match (var, file) {
        (Some(var), _) => format!("{var}: "),
        (None, Some(file)) => format!("configuration file {}: ", file.display()),
        (None, None) => String::new(),
    }
}

/// Loads `T` from `source`, then applies every `FLEETGATE_*` environment variable (except
/// `FLEETGATE_CONFIG`) as an override, in sorted order, then deserializes strictly.
///
/// See the module documentation for what `T` must look like.
pub fn load<T>(source: &ConfigSource, env: &HashMap<String, String>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default + Checked,
{
    let defaults = serde_yaml::to_value(T::default()).map_err(ConfigError::Defaults)?;
    let (file, mut root) = match source {
        ConfigSource::File(path) => (Some(path.as_path()), read_file(path)?),
        ConfigSource::BuiltInDefaults => (None, Mapping::new()),
    };
    let overrides = apply_env(&mut root, &defaults, env)?;
    // The override whose key path is the longest prefix of the faulty key is at fault.
    let invalid = |key: String, message: String| {
        let var = overrides
            .iter()
            .filter(|(path, _)| {
                let mut segments = key.split(['.', '[']);
                path.iter().all(|p| segments.next() == Some(p.as_str()))
            })
            .max_by_key(|(path, _)| path.len())
            .map(|(_, var)| var.clone());
        ConfigError::Invalid { file: file.map(Path::to_path_buf), var, key, message }
    };
    let config: T = serde_path_to_error::deserialize(Value::Mapping(root))
        .map_err(|err| invalid(err.path().to_string(), err.inner().to_string()))?;
    match config.problems().into_iter().next() {
        Some(problem) => Err(invalid(problem.key, problem.message)),
        None => Ok(config),
    }
}

/// Settings whose values have limits their types do not express (a packet size of 0, a block
/// size that is not a power of two): [`load`] refuses the first problem found, naming its key.
pub trait Checked {
    /// Every value out of its range, as dotted key path and what is wrong.
    fn problems(&self) -> Vec<Problem>;
}

/// A value out of its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `transports.mqtt.max_packet_size_bytes`.
    pub key: String,
    /// What is wrong with the value, e.g. `0 is below the minimum, 64`.
    pub message: String,
}

impl Problem {
    /// `(key, message)` pairs a section reports about itself, with their keys under `section`.
    pub fn within(section: &str, problems: Vec<(&'static str, String)>) -> Vec<Problem> {
        problems
            .into_iter()
            .map(|(key, message)| Problem { key: format!("{section}.{key}"), message })
            .collect()
    }
}

fn read_file(path: &Path) -> Result<Mapping, ConfigError> {
    let text = fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    let syntax = |source| ConfigError::Syntax { path: path.to_path_buf(), source };
    let mut value: Value = serde_yaml::from_str(&text).map_err(syntax)?;
    value.apply_merge().map_err(syntax)?;
    match value {
        Value::Null => Ok(Mapping::new()),
        Value::Mapping(mapping) => Ok(mapping),
        _ => Err(ConfigError::NotAMapping { path: path.to_path_buf() }),
    }
}

/// Applies the overrides to `root`; returns each override's key path and variable.
fn apply_env(
    root: &mut Mapping,
    defaults: &Value,
    env: &HashMap<String, String>,
) -> Result<Vec<(Vec<String>, String)>, ConfigError> {
    let mut vars: Vec<(&String, &String)> = env
        .iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX) && name.as_str() != CONFIG_VAR)
        .collect();
    vars.sort();
    let empty = Mapping::new();
    let tree = defaults.as_mapping().unwrap_or(&empty);
    let mut applied = Vec::with_capacity(vars.len());
    for (var, raw) in vars {
        let mut found = Vec::new();
        find_leaves(tree, &var[ENV_PREFIX.len()..], &mut Vec::new(), &mut found);
        let (path, default) = match found.len() {
            // Kubernetes injects variables for every Service (`<SERVICE>_PORT=tcp://...`); a
            // Service named `fleetgate-...` would otherwise stop every pod.
            0 if is_kubernetes_service_link(var, raw) => continue,
            0 => return Err(ConfigError::UnknownVariable { var: var.clone() }),
            1 => found.swap_remove(0),
            _ => {
                let keys = found.iter().map(|(path, _)| path.join(".")).collect();
                return Err(ConfigError::AmbiguousVariable { var: var.clone(), keys });
            }
        };
        let value = match default {
            Value::Null if raw.is_empty() => Value::Null,
            Value::Null | Value::String(_) => Value::String(raw.clone()),
            _ => serde_yaml::from_str(raw).map_err(|source| ConfigError::BadValue {
                var: var.clone(),
                key: path.join("."),
                source,
            })?,
        };
        set_path(root, &path, value);
        applied.push((path, var.clone()));
    }
    Ok(applied)
}

/// The `FLEETGATE_*` variables of `env` that are not settings but Kubernetes service links
/// (`load` ignores them), for a debug line once logging is up.
pub fn ignored_service_links(env: &HashMap<String, String>) -> Vec<&str> {
    let defaults = match serde_yaml::to_value(crate::config::Config::default()) {
        Ok(Value::Mapping(m)) => m,
        _ => return Vec::new(),
    };
    let mut ignored: Vec<&str> = env
        .iter()
        .filter(|(name, value)| {
            name.starts_with(ENV_PREFIX)
                && name.as_str() != CONFIG_VAR
                && is_kubernetes_service_link(name, value)
                && {
                    let mut found = Vec::new();
                    find_leaves(&defaults, &name[ENV_PREFIX.len()..], &mut Vec::new(), &mut found);
                    found.is_empty()
                }
        })
        .map(|(name, _)| name.as_str())
        .collect();
    ignored.sort_unstable();
    ignored
}

/// Whether `name=value` is one of the variables the kubelet sets for a Service in the pod's
/// namespace: `<SVC>_SERVICE_HOST=<ip>`, `<SVC>_SERVICE_PORT[_<NAME>]=<port>`,
/// `<SVC>_PORT=<proto>://<ip>:<port>`, `<SVC>_PORT_<port>_<PROTO>=<proto>://<ip>:<port>` and its
/// `_PROTO`, `_PORT` and `_ADDR` companions. Both the name and the value must have that shape.
fn is_kubernetes_service_link(name: &str, value: &str) -> bool {
    let url = ["tcp://", "udp://", "sctp://"].iter().any(|p| value.starts_with(p));
    let number = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    let ip = value.parse::<std::net::IpAddr>().is_ok();
    if name.ends_with("_SERVICE_HOST") {
        return ip;
    }
    if let Some(i) = name.find("_SERVICE_PORT")
        && (name.len() == i + "_SERVICE_PORT".len() || name[i..].starts_with("_SERVICE_PORT_"))
    {
        return number;
    }
    if name.ends_with("_PORT") && url {
        return true;
    }
    // <SVC>_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]
    let parts: Vec<&str> = name.rsplitn(4, '_').collect();
    let proto = |p: &str| matches!(p, "TCP" | "UDP" | "SCTP");
    let port = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        [p, n, "PORT", _] if proto(p) && port(n) => url,
        [suffix, p, n, rest] if proto(p) && port(n) && rest.ends_with("_PORT") => match *suffix {
            "PROTO" => matches!(value, "tcp" | "udp" | "sctp"),
            "PORT" => number,
            "ADDR" => ip,
            _ => false,
        },
        _ => false,
    }
}

/// Collects every leaf of `node` whose upper-snake key path (joined by `_`) is exactly `rest`.
/// A leaf is any value but a non-empty mapping.
fn find_leaves<'a>(
    node: &'a Mapping,
    rest: &str,
    prefix: &mut Vec<String>,
    found: &mut Vec<(Vec<String>, &'a Value)>,
) {
    for (key, value) in node {
        let Some(key) = key.as_str().filter(|k| !k.is_empty()) else {
            continue;
        };
        let upper = key.to_ascii_uppercase().replace('-', "_");
        let Some(after) = rest.strip_prefix(upper.as_str()) else {
            continue;
        };
        prefix.push(key.to_owned());
        match value {
            Value::Mapping(inner) if !inner.is_empty() => {
                if let Some(after) = after.strip_prefix('_') {
                    find_leaves(inner, after, prefix, found);
                }
            }
            _ if after.is_empty() => found.push((prefix.clone(), value)),
            _ => {}
        }
        prefix.pop();
    }
}

/// Sets `path` in `root` to `value`, replacing whatever is on the way that is not a mapping.
fn set_path(root: &mut Mapping, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = root;
    for key in parents {
        let slot = node
            .entry(Value::String(key.clone()))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if !slot.is_mapping() {
            *slot = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(inner) = slot else {
            return;
        };
        node = inner;
    }
    node.insert(Value::String(last.clone()), value);
}

#[cfg(test)]
mod service_link_tests {
    use super::is_kubernetes_service_link as link;

    #[test]
    fn kubernetes_service_links_are_recognised_by_name_and_value() {
        assert!(link("FLEETGATE_MQTT_SERVICE_HOST", "10.0.0.11"));
        assert!(link("FLEETGATE_MQTT_SERVICE_PORT", "1883"));
        assert!(link("FLEETGATE_MQTT_SERVICE_PORT_MQTT", "1883"));
        assert!(link("FLEETGATE_MQTT_PORT", "tcp://10.0.0.11:1883"));
        assert!(link("FLEETGATE_MQTT_PORT_1883_TCP", "tcp://10.0.0.11:1883"));
        assert!(link("FLEETGATE_COAP_PORT_5683_UDP_PROTO", "udp"));
        assert!(link("FLEETGATE_MQTT_PORT_1883_TCP_PORT", "1883"));
        assert!(link("FLEETGATE_MQTT_PORT_1883_TCP_ADDR", "10.0.0.11"));
        // A typo of a real setting is not excused: its value has another shape.
        assert!(!link("FLEETGATE_NATS_ULR", "nats://127.0.0.1:4222"));
        assert!(!link("FLEETGATE_MQTT_PORT", "1883"));
        assert!(!link("FLEETGATE_MQTT_SERVICE_HOST", "mqtt.example"));
        assert!(!link("FLEETGATE_X_PORT_1883_TCP_ADDR", "nowhere"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::net::SocketAddr;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Root {
        nats: Nats,
        transports: Transports,
        auth: Auth,
        dcx: Dcx,
    }
    impl Checked for Root {
        fn problems(&self) -> Vec<Problem> {
            let mqtt = &self.transports.mqtt;
            let mut problems = Vec::new();
            if mqtt.max_packet_size_bytes < 64 {
                problems.push(("max_packet_size_bytes", "must be at least 64".to_owned()));
            }
            Problem::within("transports.mqtt", problems)
        }
    }
    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Nats {
        url: Option<String>,
    }
    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Transports {
        mqtt: Mqtt,
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Mqtt {
        listen: SocketAddr,
        max_packet_size_bytes: u32,
    }
    impl Default for Mqtt {
        fn default() -> Self {
            Mqtt { listen: SocketAddr::from(([0, 0, 0, 0], 1883)), max_packet_size_bytes: 65536 }
        }
    }
    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Auth {
        auto_register: bool,
        admin_token: String,
        endpoints: Vec<Endpoint>,
    }
    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Endpoint {
        app_version: String,
        token: String,
        endpoint_id: String,
    }
    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Dcx {
        reliable_receivers: Vec<String>,
        receiver_timeout_ms: u64,
    }

    fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("fleetgate-{}-{name}.yml", std::process::id()));
        fs::write(&path, text).expect("write temp config");
        path
    }

    fn from_env(vars: &[(&str, &str)]) -> Result<Root, ConfigError> {
        load(&ConfigSource::BuiltInDefaults, &env(vars))
    }

    fn error(result: Result<Root, ConfigError>) -> String {
        result.expect_err("expected a configuration error").to_string()
    }

    #[test]
    fn built_in_defaults() {
        assert_eq!(from_env(&[]).expect("load"), Root::default());
    }

    #[test]
    fn file_values_and_empty_file() {
        let path = temp_file(
            "values",
            "nats:\n  url: nats://a:4222\ntransports:\n  mqtt:\n    max_packet_size_bytes: 1024\n\
             dcx:\n  reliable_receivers: [x, y]\nauth:\n",
        );
        let root: Root = load(&ConfigSource::File(path), &env(&[])).expect("load");
        assert_eq!(root.nats.url.as_deref(), Some("nats://a:4222"));
        assert_eq!(root.transports.mqtt.max_packet_size_bytes, 1024);
        assert_eq!(root.transports.mqtt.listen, Mqtt::default().listen);
        assert_eq!(root.dcx.reliable_receivers, ["x", "y"]);
        assert_eq!(root.auth, Auth::default());
        let empty = temp_file("empty", "");
        let root: Root = load(&ConfigSource::File(empty), &env(&[])).expect("load");
        assert_eq!(root, Root::default());
    }

    #[test]
    fn unknown_key_names_its_path_and_file() {
        let path = temp_file("unknown", "transports:\n  mqtt:\n    listn: 0.0.0.0:1\n");
        let msg = error(load(&ConfigSource::File(path.clone()), &env(&[])));
        assert!(msg.contains("transports.mqtt.listn: unknown field `listn`"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn env_overrides_file() {
        let path =
            temp_file("env", "nats:\n  url: nats://file:4222\ndcx:\n  receiver_timeout_ms: 9\n");
        let vars = env(&[
            ("FLEETGATE_TRANSPORTS_MQTT_LISTEN", "127.0.0.1:11883"),
            ("FLEETGATE_NATS_URL", "nats://nats:4222"),
            ("FLEETGATE_AUTH_AUTO_REGISTER", "true"),
            ("FLEETGATE_DCX_RECEIVER_TIMEOUT_MS", "500"),
            ("FLEETGATE_DCX_RELIABLE_RECEIVERS", "[a, b]"),
            ("FLEETGATE_CONFIG", "/nonexistent.yml"),
            ("PATH", "/bin"),
        ]);
        let root: Root = load(&ConfigSource::File(path), &vars).expect("load");
        assert_eq!(root.transports.mqtt.listen.to_string(), "127.0.0.1:11883");
        assert_eq!(root.nats.url.as_deref(), Some("nats://nats:4222"));
        assert!(root.auth.auto_register);
        assert_eq!(root.dcx.receiver_timeout_ms, 500);
        assert_eq!(root.dcx.reliable_receivers, ["a", "b"]);
    }

    #[test]
    fn string_values_are_verbatim_and_empty_clears_an_option() {
        let root =
            from_env(&[("FLEETGATE_AUTH_ADMIN_TOKEN", "0123"), ("FLEETGATE_NATS_URL", "true")])
                .expect("load");
        assert_eq!(root.auth.admin_token, "0123");
        assert_eq!(root.nats.url.as_deref(), Some("true"));
        let path = temp_file("clear", "nats: {url: nats://file:4222}\n");
        let vars = env(&[("FLEETGATE_NATS_URL", "")]);
        let root: Root = load(&ConfigSource::File(path), &vars).expect("load");
        assert_eq!(root.nats.url, None);
    }

    #[test]
    fn list_of_structs_from_env() {
        let value = "[{app_version: demo-v1, token: t1, endpoint_id: e1}]";
        let root = from_env(&[("FLEETGATE_AUTH_ENDPOINTS", value)]).expect("load");
        let expected = Endpoint {
            app_version: "demo-v1".into(),
            token: "t1".into(),
            endpoint_id: "e1".into(),
        };
        assert_eq!(root.auth.endpoints, [expected]);
        let msg = error(from_env(&[("FLEETGATE_AUTH_ENDPOINTS", "[{tokn: t1}]")]));
        assert!(msg.starts_with("FLEETGATE_AUTH_ENDPOINTS: auth.endpoints[0].tokn:"), "{msg}");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let msg = error(from_env(&[("FLEETGATE_NATS_ULR", "x")]));
        assert_eq!(msg, "FLEETGATE_NATS_ULR is not a fleetgate setting");
        let msg = error(from_env(&[("FLEETGATE_TRANSPORTS_MQTT", "x")]));
        assert!(msg.contains("FLEETGATE_TRANSPORTS_MQTT is not"), "{msg}");
        let msg = error(from_env(&[("FLEETGATE_DCX_RECEIVER_TIMEOUT_MS", "soon")]));
        assert!(msg.starts_with("FLEETGATE_DCX_RECEIVER_TIMEOUT_MS: dcx.receiver_timeout_ms:"));
        let msg = error(from_env(&[("FLEETGATE_DCX_RELIABLE_RECEIVERS", "[a, ")]));
        assert!(msg.starts_with(
            "FLEETGATE_DCX_RELIABLE_RECEIVERS: invalid value for `dcx.reliable_receivers`"
        ));
    }

    #[test]
    fn value_out_of_range_names_key_and_origin() {
        let msg = error(from_env(&[("FLEETGATE_TRANSPORTS_MQTT_MAX_PACKET_SIZE_BYTES", "0")]));
        assert_eq!(
            msg,
            "FLEETGATE_TRANSPORTS_MQTT_MAX_PACKET_SIZE_BYTES: \
             transports.mqtt.max_packet_size_bytes: must be at least 64"
        );
        let path = temp_file("range", "transports:\n  mqtt:\n    max_packet_size_bytes: 10\n");
        let msg = error(load(&ConfigSource::File(path.clone()), &env(&[])));
        assert!(msg.starts_with("configuration file "), "{msg}");
        assert!(
            msg.ends_with("transports.mqtt.max_packet_size_bytes: must be at least 64"),
            "{msg}"
        );
        let _ = fs::remove_file(path);
    }

    #[test]
    fn ambiguous_variable() {
        #[derive(Default, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        struct Amb {
            a_b: u8,
            a: Inner,
        }
        #[derive(Default, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        struct Inner {
            b: u8,
        }
        impl Checked for Amb {
            fn problems(&self) -> Vec<Problem> {
                Vec::new()
            }
        }
        let result = load::<Amb>(&ConfigSource::BuiltInDefaults, &env(&[("FLEETGATE_A_B", "1")]));
        let msg = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("a_b") && msg.contains("a.b"), "{msg}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let path = temp_file("syntax", "nats:\n  url: [unclosed\n");
        let msg = error(load(&ConfigSource::File(path.clone()), &env(&[])));
        assert!(msg.contains(&path.display().to_string()) && msg.contains("line"), "{msg}");
        let missing = PathBuf::from("/nonexistent/fleetgate.yml");
        let msg = error(load(&ConfigSource::File(missing), &env(&[])));
        assert!(msg.contains("/nonexistent/fleetgate.yml"), "{msg}");
    }

    #[test]
    fn resolve_precedence() {
        let srv = temp_file("srv", "");
        let cli = Path::new("/cli.yml");
        let vars = env(&[("FLEETGATE_CONFIG", "/env.yml")]);
        let file = |p: &str| ConfigSource::File(PathBuf::from(p));
        let resolve = ConfigSource::resolve_with;
        assert_eq!(resolve(Some(cli), &vars, &srv), file("/cli.yml"));
        assert_eq!(resolve(None, &vars, &srv), file("/env.yml"));
        assert_eq!(resolve(None, &env(&[]), &srv), ConfigSource::File(srv.clone()));
        let absent = Path::new("/nonexistent/service-config.yml");
        assert_eq!(resolve(None, &env(&[]), absent), ConfigSource::BuiltInDefaults);
    }
}

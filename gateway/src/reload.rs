//! Configuration reloads while the process runs: on SIGHUP, and when the configuration file's
//! content changes (checked every `process.config_check_interval_ms`; a Kubernetes ConfigMap
//! update swaps a symlink, which a content check sees where file events may not).
//!
//! A new configuration is loaded exactly as at start-up (file, then `FLEETGATE_*` overrides,
//! then range checks): a bad one is refused with the same error, and the running one stays.
//! A good one is compared with the running one key by key. Each changed key that some part of
//! the process declared live ([`Reloads::follow`]) is applied there without dropping a
//! connection; every other changed key (a listen address, a queue size) is named in a warning:
//! it takes effect at the next start.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_live::Live;
use fleetgate_transport_core::metrics::{Counter, Family, Registry};
use prometheus_client::encoding::EncodeLabelSet;
use serde_json::Value;
use tokio::sync::watch;

use crate::config::Config;
use crate::config::loader::{ConfigSource, load};
use crate::logging::LogControl;

/// Which keys of a section a part of the process applies live.
#[derive(Debug, Clone, Copy)]
pub enum Keys {
    /// Only these keys of the section.
    Only(&'static [&'static str]),
    /// Every key of the section but these.
    AllBut(&'static [&'static str]),
}

struct Follower {
    section: &'static str,
    keys: Keys,
    apply: Box<dyn Fn(&Config) + Send + Sync>,
}

impl Follower {
    /// Whether the dotted `key` (e.g. `auth.endpoints`, `transports.mqtt.listen`) is applied
    /// live by this follower.
    fn covers(&self, key: &str) -> bool {
        let Some(rest) = key.strip_prefix(self.section).and_then(|r| r.strip_prefix('.')) else {
            return false;
        };
        let field = rest.split(['.', '[']).next().unwrap_or(rest);
        match self.keys {
            Keys::Only(keys) => keys.contains(&field),
            Keys::AllBut(keys) => !keys.contains(&field),
        }
    }
}

/// The parts of the process that take new settings while running, collected while the
/// services are made (see `crate::registry`).
#[derive(Default)]
pub struct Reloads {
    followers: Vec<Follower>,
}

impl Reloads {
    /// `live` follows `section(config)`: the keys `keys` of the dotted `path` (e.g.
    /// `transports.mqtt`) are applied by replacing the whole section value.
    pub fn follow<T>(
        &mut self,
        path: &'static str,
        keys: Keys,
        live: Live<T>,
        section: fn(&Config) -> &T,
    ) where
        T: Clone + PartialEq + Send + Sync + 'static,
    {
        let apply = move |c: &Config| {
            live.set_if_changed(section(c).clone());
        };
        self.followers.push(Follower { section: path, keys, apply: Box::new(apply) });
    }

    /// `apply` runs with the new configuration when one of `keys` of `path` changed.
    pub fn on(
        &mut self,
        path: &'static str,
        keys: Keys,
        apply: impl Fn(&Config) + Send + Sync + 'static,
    ) {
        self.followers.push(Follower { section: path, keys, apply: Box::new(apply) });
    }

    /// Applies `new` where `old` differs from it; returns the changed keys applied and those
    /// that take effect at the next start.
    pub fn apply(&self, old: &Config, new: &Config) -> Changes {
        let mut changes = Changes::default();
        let mut due = vec![false; self.followers.len()];
        for key in changed_keys(old, new) {
            let mut live = false;
            for (i, f) in self.followers.iter().enumerate() {
                if f.covers(&key) {
                    due[i] = true;
                    live = true;
                }
            }
            match live {
                true => changes.applied.push(key),
                false => changes.at_restart.push(key),
            }
        }
        for (follower, due) in self.followers.iter().zip(due) {
            if due {
                (follower.apply)(new);
            }
        }
        changes
    }
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Keys applied live.
    pub applied: Vec<String>,
    /// Keys that changed but apply only at the next start.
    pub at_restart: Vec<String>,
}

/// The dotted keys whose values differ, lists compared whole (`auth.endpoints`), in order.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(old), Ok(new)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    diff("", &old, &new, &mut keys);
    keys
}

fn diff(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let names: BTreeMap<&String, ()> = a.keys().chain(b.keys()).map(|k| (k, ())).collect();
            for name in names.keys() {
                let key = match path {
                    "" => (*name).clone(),
                    _ => format!("{path}.{name}"),
                };
                diff(
                    &key,
                    a.get(*name).unwrap_or(&Value::Null),
                    b.get(*name).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if old != new => out.push(path.to_owned()),
        _ => {}
    }
}

/// Where the running configuration came from, so that it can be loaded again.
pub struct Origin {
    /// The file (or built-in defaults).
    pub source: ConfigSource,
    /// The environment at start-up (its overrides apply again).
    pub env: HashMap<String, String>,
    /// Run on every newly loaded configuration before it is compared: what `main` added at
    /// start-up (the demo endpoint of built-in defaults) is added again.
    pub amend: fn(&mut Config),
    /// The logger, whose filter follows `log.filter`.
    pub log: Option<Arc<LogControl>>,
}

/// `fleetgate_config_reloads_total{result}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Reloads on SIGHUP and on file changes until `stop`. `running` is the configuration the
/// process started with.
pub fn watch_and_reload(
    origin: Origin,
    mut running: Config,
    mut reloads: Reloads,
    registry: &mut Registry,
    mut stop: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let outcomes = Family::<ResultLabel, Counter>::default();
    registry.register(
        "config_reloads",
        "Configuration reloads (SIGHUP or file change), by result: applied, unchanged, refused",
        outcomes.clone(),
    );
    // Every result shows from the start (at 0), so that rates and alerts have a series.
    for result in ["applied", "unchanged", "refused"] {
        let _ = outcomes.get_or_create(&ResultLabel { result });
    }
    if let Some(log) = origin.log.clone() {
        reloads.on("log", Keys::Only(&["filter"]), move |c| {
            if let Err(e) = log.set_filter(&c.log.filter) {
                tracing::error!(error = e, "log.filter: not applied");
            }
        });
    }
    let path: Option<PathBuf> = match &origin.source {
        ConfigSource::File(p) => Some(p.clone()),
        ConfigSource::BuiltInDefaults => None,
    };
    async move {
        let mut hangups = hangups();
        let interval = Duration::from_millis(running.process.config_check_interval_ms);
        let mut last_read = path.as_ref().and_then(|p| std::fs::read(p).ok());
        loop {
            let check = async {
                match interval.is_zero() || path.is_none() {
                    true => std::future::pending().await,
                    false => tokio::time::sleep(interval).await,
                }
            };
            let why = tokio::select! {
                _ = check => {
                    let now = path.as_ref().and_then(|p| std::fs::read(p).ok());
                    // A file that is briefly missing (being replaced) is not a change.
                    if now.is_none() || now == last_read {
                        continue;
                    }
                    last_read = now;
                    "the configuration file changed"
                }
                Some(()) = next_hangup(&mut hangups) => {
                    last_read = path.as_ref().and_then(|p| std::fs::read(p).ok());
                    "SIGHUP"
                }
                _ = fleetgate_bus::stopped(&mut stop) => return,
            };
            let result = reload(&origin, &mut running, &reloads, why);
            outcomes.get_or_create(&ResultLabel { result }).inc();
        }
    }
}

/// Loads the configuration again and applies what changed; returns the outcome's label.
fn reload(origin: &Origin, running: &mut Config, reloads: &Reloads, why: &str) -> &'static str {
    let mut new: Config = match load(&origin.source, &origin.env) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                reason = why,
                "configuration reload refused, the running configuration stays: {e}"
            );
            return "refused";
        }
    };
    (origin.amend)(&mut new);
    let changes = reloads.apply(running, &new);
    *running = new;
    if changes.applied.is_empty() && changes.at_restart.is_empty() {
        tracing::info!(reason = why, "configuration reloaded: nothing changed");
        return "unchanged";
    }
    if !changes.at_restart.is_empty() {
        tracing::warn!(
            reason = why,
            settings = changes.at_restart.join(", "),
            "configuration reloaded: these settings take effect only after a restart"
        );
    }
    if !changes.applied.is_empty() {
        tracing::info!(
            reason = why,
            settings = changes.applied.join(", "),
            "configuration reloaded: applied"
        );
    }
    "applied"
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

fn hangups() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::hangup())
            .inspect_err(|e| tracing::warn!(error = %e, "SIGHUP will not reload the configuration"))
            .ok()
    }
}

async fn next_hangup(hangups: &mut Hangups) -> Option<()> {
    #[cfg(unix)]
    match hangups {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
    #[cfg(not(unix))]
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_are_dotted_and_lists_whole() {
        let old = Config::default();
        let mut new = Config::default();
        new.transports.mqtt.max_packet_size_bytes = 4096;
        new.auth.endpoints.push(fleetgate_auth::EndpointEntry {
            app_version: "a".into(),
            token: "t".into(),
            endpoint_id: "e".into(),
        });
        new.log.filter = "debug".into();
        assert_eq!(
            changed_keys(&old, &new),
            ["auth.endpoints", "log.filter", "transports.mqtt.max_packet_size_bytes"]
        );
    }

    #[test]
    fn live_keys_are_applied_and_the_rest_named() {
        let mut reloads = Reloads::default();
        let mqtt = Live::new(Config::default().transports.mqtt);
        reloads.follow("transports.mqtt", Keys::AllBut(&["listen"]), mqtt.clone(), |c| {
            &c.transports.mqtt
        });
        let old = Config::default();
        let mut new = Config::default();
        new.transports.mqtt.max_packet_size_bytes = 4096;
        new.transports.mqtt.listen = "127.0.0.1:1".parse().unwrap();
        new.log.format = crate::config::LogFormat::Json;
        let changes = reloads.apply(&old, &new);
        assert_eq!(changes.applied, ["transports.mqtt.max_packet_size_bytes"]);
        assert_eq!(changes.at_restart, ["log.format", "transports.mqtt.listen"]);
        assert_eq!(mqtt.get().max_packet_size_bytes, 4096);
    }
}

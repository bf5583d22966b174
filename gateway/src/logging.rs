//! Log lines on stderr: `log.filter` chooses which (`RUST_LOG` wins when set), `log.format` how
//! (text or one JSON object per line). Text is coloured only on a terminal, and never when
//! `NO_COLOR` is set to anything but the empty string (no-color.org). The filter can be
//! replaced while the process runs ([`LogControl::set_filter`], used by reload).

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::{LogConfig, LogFormat};

/// Changes what is logged after start-up.
pub struct LogControl {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set: it keeps winning over the configuration.
    from_env: bool,
}

impl LogControl {
    /// Logs what `filter` lets through from now on (unless `RUST_LOG` chose at start-up).
    /// An invalid filter is refused with the parser's message.
    pub fn set_filter(&self, filter: &str) -> Result<(), String> {
        if self.from_env {
            return Ok(());
        }
        let parsed = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        self.filter.reload(parsed).map_err(|e| e.to_string())
    }
}

/// Installs the process's logger. An invalid `log.filter` falls back to `info`, with a warning
/// once logging is up.
pub fn init(config: &LogConfig) -> LogControl {
    let from_env = std::env::var_os(EnvFilter::DEFAULT_ENV).is_some();
    let parsed = match from_env {
        true => EnvFilter::try_from_default_env().map_err(|e| e.to_string()),
        false => EnvFilter::try_new(&config.filter).map_err(|e| e.to_string()),
    };
    let (filter, bad_filter) = match parsed {
        Ok(filter) => (filter, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let text = (config.format == LogFormat::Text)
        .then(|| fmt::layer().with_writer(std::io::stderr).with_ansi(colour()));
    let json = (config.format == LogFormat::Json)
        .then(|| fmt::layer().json().with_writer(std::io::stderr).with_current_span(false));
    tracing_subscriber::registry().with(filter).with(text).with(json).init();
    if let Some(error) = bad_filter {
        tracing::warn!(error, "invalid log filter; logging at info");
    }
    LogControl { filter: handle, from_env }
}

/// Colour when stderr is a terminal and `NO_COLOR` is unset or empty.
fn colour() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    std::io::stderr().is_terminal() && !no_color
}

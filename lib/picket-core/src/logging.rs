//! Structured logging set-up shared by both binaries.
//!
//! The level comes from `RUST_LOG` when set (it wins, as operators expect from Rust tools),
//! otherwise from the config file; [`LogHandle::set_level`] changes it on SIGHUP without a
//! restart. Output is human-readable text or JSON lines for log shippers.

use serde::Deserialize;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "invalid log level {0:?}: use error, warn, info, debug, trace or a RUST_LOG-style filter such as \"info,picket_agent=debug\""
    )]
    BadLevel(String),
    #[error("a logger is already installed")]
    AlreadyInstalled,
}

/// The `[log]` section both binaries' configs share.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a `RUST_LOG`-style filter.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogConfig {
    /// Checks the level without installing anything (for config validation).
    pub fn validate(&self) -> Result<(), LogError> {
        parse_filter(&self.level).map(|_| ())
    }

    /// Installs the global subscriber as configured.
    pub fn init(&self) -> Result<LogHandle, LogError> {
        init(&self.level, self.format == LogFormat::Json)
    }
}

/// Changes the log filter at run time.
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    from_env: bool,
}

impl LogHandle {
    /// Applies a new level from the config, unless `RUST_LOG` fixed it at start.
    pub fn set_level(&self, level: &str) -> Result<(), LogError> {
        if self.from_env {
            return Ok(());
        }
        let filter = parse_filter(level)?;
        self.handle
            .reload(filter)
            .map_err(|_| LogError::AlreadyInstalled)
    }
}

fn parse_filter(level: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(level).map_err(|_| LogError::BadLevel(level.to_owned()))
}

/// Installs the global subscriber writing to stderr.
fn init(level: &str, json: bool) -> Result<LogHandle, LogError> {
    let env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let from_env = env.is_some();
    let filter = parse_filter(env.as_deref().unwrap_or(level))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init()
    } else {
        // Colour only for a person at a terminal; journald and log files get plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        registry
            .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
            .try_init()
    };
    result.map_err(|_| LogError::AlreadyInstalled)?;
    Ok(LogHandle { handle, from_env })
}

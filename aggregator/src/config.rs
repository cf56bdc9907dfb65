//! The aggregator's configuration file (`aggregator.toml`) and its embedded defaults.
//!
//! Every section has defaults, so an empty file (or none) is a valid config: gRPC on
//! 127.0.0.1:7400 with TLS from `/etc/picket/tls`, HTTP on 127.0.0.1:7401. See
//! `docs/configuration.md` for every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use picket_core::config::ConfigError;
use serde::Deserialize;

pub use crate::http::HttpConfig;
pub use picket_core::logging::{LogConfig, LogFormat};

/// Where `certs init` writes and the default config reads TLS material.
pub const DEFAULT_TLS_DIR: &str = "/etc/picket/tls";

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    pub log: LogConfig,
    pub grpc: GrpcConfig,
    pub tls: TlsConfig,
    pub http: HttpConfig,
    pub agents: AgentsConfig,
    pub exposition: ExpositionConfig,
    pub queues: QueuesConfig,
    pub sinks: Vec<SinkConfig>,
    pub receivers: crate::receivers::ReceiversConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueuesConfig {
    /// Each network sink keeps its disk queue in `<directory>/<sink name>`.
    pub directory: PathBuf,
}

impl Default for QueuesConfig {
    fn default() -> Self {
        QueuesConfig {
            directory: PathBuf::from("/var/lib/picket/aggregator/queues"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    pub listen: SocketAddr,
    /// Largest batch accepted, after decompression. Larger ones end the stream with
    /// `OUT_OF_RANGE`; the agent drops that batch and counts it.
    pub max_message_bytes: usize,
    /// How long a new stream may take to send its `Hello`.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// A stream that sends nothing for this long, or leaves its acks unread for this long,
    /// is closed. Agents send at least one batch per collection interval and read acks as
    /// they come, so only dead or misbehaving peers reach it.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// HTTP/2 keepalive pings; a peer that does not answer within the timeout is dropped,
    /// which is how half-open connections are noticed.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A TLS handshake not finished within this is abandoned and its connection closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection with no stream open for this long (since it was accepted, or since its
    /// last stream ended) is closed: a peer that connects and never streams holds nothing.
    #[serde(with = "humantime_serde")]
    pub idle_connection_timeout: Duration,
    /// Open connections at most. At the cap the oldest connection without a stream is closed
    /// to make room; when every one streams, new connections are refused.
    pub max_connections: usize,
    /// Concurrent streams one connection may open (an agent needs one).
    pub max_streams_per_connection: u32,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            max_message_bytes: 4 * 1024 * 1024,
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            idle_connection_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_streams_per_connection: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Serve plaintext gRPC. Only for tests and trusted networks; logged as a warning.
    pub insecure: bool,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that signs agent certificates. When set, agents are verified against it (mutual
    /// TLS) and an agent's identity is the common name of its certificate.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca` set: refuse agents that present no certificate.
    pub require_client_cert: bool,
    /// How often `cert`, `key` and `client_ca` are checked for changes; changed files are used
    /// for new connections without a restart (certificate rotation).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        let dir = Path::new(DEFAULT_TLS_DIR);
        TlsConfig {
            insecure: false,
            cert: dir.join("aggregator.pem"),
            key: dir.join("aggregator-key.pem"),
            client_ca: None,
            require_client_cert: true,
            reload_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// An agent is reported down (`picket_aggregator_agent_up 0`) after this many of its
    /// collection intervals without a batch.
    pub down_after_intervals: u32,
    /// Floor for the above, for agents with very short intervals.
    #[serde(with = "humantime_serde")]
    pub min_down_after: Duration,
    /// A silent agent's state and metrics are forgotten after this long.
    #[serde(with = "humantime_serde")]
    pub forget_after: Duration,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            down_after_intervals: 3,
            min_down_after: Duration::from_secs(15),
            forget_after: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExpositionConfig {
    /// Serve the latest sample of every series agents and pushes send on `/metrics` (the
    /// aggregator's own metrics are served either way). Off, for an aggregator that only
    /// relays to databases, it keeps no latest sample per series (ingest still keeps each
    /// stream's last batch as a template).
    pub enabled: bool,
    /// A series not updated for this long disappears from `/metrics`.
    #[serde(with = "humantime_serde")]
    pub series_ttl: Duration,
}

impl Default for ExpositionConfig {
    fn default() -> Self {
        ExpositionConfig {
            enabled: true,
            series_ttl: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum SinkConfig {
    /// Appends every accepted sample to a JSON-lines journal: an audit trail, a debugging aid,
    /// and the record the delivery tests count.
    File {
        path: PathBuf,
        /// Flush to disk (fsync) after each batch. Off, a process crash loses nothing (the
        /// kernel has the data) but a power cut may lose the last seconds.
        #[serde(default)]
        fsync: bool,
    },
    /// Prometheus remote write 1.0 (Prometheus, VictoriaMetrics, Mimir, Thanos receive).
    PrometheusRemoteWrite(crate::sinks::prometheus_remote_write::RemoteWriteConfig),
    /// InfluxDB line protocol over the v1 or v2 write API.
    Influxdb(crate::sinks::influxdb::InfluxConfig),
}

/// The settings every network sink has, whatever its kind.
pub struct NetworkSettings<'a> {
    pub name: &'a str,
    pub url: &'a str,
    pub queue: &'a crate::sinks::queue::QueueConfig,
    pub routing: &'a crate::sinks::routing::RoutingConfig,
    pub batch: &'a crate::sinks::driver::BatchConfig,
    pub retry: &'a crate::sinks::driver::RetryConfig,
    pub concurrency: usize,
}

impl SinkConfig {
    /// The shared settings of a network sink; `None` for the file journal.
    pub fn network(&self) -> Option<NetworkSettings<'_>> {
        macro_rules! settings {
            ($c:expr) => {
                Some(NetworkSettings {
                    name: &$c.name,
                    url: &$c.url,
                    queue: &$c.queue,
                    routing: &$c.routing,
                    batch: &$c.batch,
                    retry: &$c.retry,
                    concurrency: $c.concurrency,
                })
            };
        }
        match self {
            SinkConfig::File { .. } => None,
            SinkConfig::PrometheusRemoteWrite(c) => settings!(c),
            SinkConfig::Influxdb(c) => settings!(c),
        }
    }
}

/// A config with its origin and text, for error messages.
pub type Loaded = picket_core::config::Loaded<AggregatorConfig>;

/// Loads `path`, or the embedded defaults when `None`, and validates it.
pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
    let loaded = picket_core::config::load::<AggregatorConfig>(path)?;
    validate(&loaded.config, &loaded.origin, &loaded.text)?;
    Ok(loaded)
}

/// Checks that span several keys or need the file system.
pub fn validate(config: &AggregatorConfig, origin: &str, text: &str) -> Result<(), ConfigError> {
    let err = |path: &[&str], message: String| ConfigError::at_key(origin, text, path, message);
    if let Err(e) = config.log.validate() {
        return Err(err(&["log", "level"], e.to_string()));
    }
    if config.grpc.max_message_bytes < 1024 {
        return Err(err(
            &["grpc", "max_message_bytes"],
            "must be at least 1024 bytes (the default is 4194304)".into(),
        ));
    }
    // A gRPC message's length is 32 bits; batches are read with 32-bit indices.
    if u32::try_from(config.grpc.max_message_bytes).is_err() {
        return Err(err(
            &["grpc", "max_message_bytes"],
            "must be under 4 GiB (4294967296 bytes: a gRPC message's length is 32 bits; the default is 4194304)".into(),
        ));
    }
    check_grpc_limits(&err, &config.grpc)?;
    if let Some((key, message)) = config.http.problem() {
        return Err(err(&["http", key], message));
    }
    if config.grpc.listen == config.http.listen {
        return Err(err(
            &["http", "listen"],
            format!(
                "{} is also grpc.listen; give HTTP its own port",
                config.http.listen
            ),
        ));
    }
    if !config.tls.insecure {
        let tls = &config.tls;
        picket_core::tls::read_certificates(&tls.cert).map_err(|e| {
            err(&["tls", "cert"], format!("{e}; create one with `picket-aggregator certs init`, or set tls.insecure = true for plaintext"))
        })?;
        picket_core::tls::read_private_key(&tls.key)
            .map_err(|e| err(&["tls", "key"], e.to_string()))?;
        if let Some(ca) = &tls.client_ca {
            picket_core::tls::read_certificates(ca)
                .map_err(|e| err(&["tls", "client_ca"], e.to_string()))?;
        }
    }
    if config.tls.reload_interval < Duration::from_millis(100) {
        return Err(err(
            &["tls", "reload_interval"],
            "must be at least 100ms (e.g. \"10s\")".into(),
        ));
    }
    let influx = &config.receivers.influxdb;
    if influx.enabled {
        if let Err(e) = influx.resolved_password() {
            let key = if influx.password_file.is_some() {
                "password_file"
            } else if influx.password_env.is_some() {
                "password_env"
            } else {
                "password"
            };
            return Err(err(&["receivers", "influxdb", key], e));
        }
        if influx.username.is_some() != influx.password_source().is_set() {
            return Err(err(
                &["receivers", "influxdb", "username"],
                "set username together with password, password_file or password_env".into(),
            ));
        }
    }
    for (receiver, bytes) in [
        ("pushgateway", config.receivers.pushgateway.max_body_bytes),
        ("influxdb", config.receivers.influxdb.max_body_bytes),
    ] {
        if bytes < 1024 {
            return Err(err(
                &["receivers", receiver, "max_body_bytes"],
                format!("{bytes} is too small for any real push; use at least 1024"),
            ));
        }
    }
    if config.receivers.pushgateway.group_ttl < Duration::from_secs(1) {
        return Err(err(
            &["receivers", "pushgateway", "group_ttl"],
            "must be at least 1s (a few times the pushers' interval)".into(),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, sink) in config.sinks.iter().enumerate() {
        let index = i.to_string();
        if let Some(network) = sink.network() {
            let name = network.name;
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(err(
                    &["sinks", &index, "name"],
                    format!(
                        "sink name {name:?} must be 1-64 letters, digits, '_' or '-' (it names the sink's queue directory)"
                    ),
                ));
            }
            if !names.insert(name) {
                return Err(err(
                    &["sinks", &index, "name"],
                    format!("two sinks are named {name:?}; each needs its own name"),
                ));
            }
        }
        if let Some(network) = sink.network() {
            check_network_sink(&err, &index, &network)?;
        }
        if let SinkConfig::Influxdb(c) = sink
            && let Some((key, message)) = c.problem()
        {
            return Err(err(&["sinks", &index, key], message));
        }
        match sink {
            SinkConfig::PrometheusRemoteWrite(_) | SinkConfig::Influxdb(_) => {}
            SinkConfig::File { path, .. } => {
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
                if let Some(parent) = parent
                    && !parent.is_dir()
                {
                    return Err(err(
                        &["sinks", &index, "path"],
                        format!("directory {} does not exist", parent.display()),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn check_grpc_limits(
    err: &dyn Fn(&[&str], String) -> ConfigError,
    grpc: &GrpcConfig,
) -> Result<(), ConfigError> {
    for (key, value) in [
        ("handshake_timeout", grpc.handshake_timeout),
        ("idle_connection_timeout", grpc.idle_connection_timeout),
    ] {
        if value < Duration::from_secs(1) {
            return Err(err(
                &["grpc", key],
                format!("{value:?} is too short for a real agent on a slow link; use at least 1s"),
            ));
        }
    }
    if !(1..=crate::http::MAX_CONNECTIONS_LIMIT).contains(&grpc.max_connections) {
        return Err(err(
            &["grpc", "max_connections"],
            format!(
                "must be between 1 and {} (one per agent, plus room for reconnects)",
                crate::http::MAX_CONNECTIONS_LIMIT
            ),
        ));
    }
    if grpc.max_streams_per_connection == 0 {
        return Err(err(
            &["grpc", "max_streams_per_connection"],
            "must be at least 1 (an agent opens one stream)".into(),
        ));
    }
    Ok(())
}

fn check_network_sink(
    err: &dyn Fn(&[&str], String) -> ConfigError,
    index: &str,
    settings: &NetworkSettings<'_>,
) -> Result<(), ConfigError> {
    let NetworkSettings {
        url,
        routing,
        queue,
        batch,
        concurrency,
        ..
    } = *settings;
    let parsed = url.parse::<axum::http::Uri>();
    let scheme_ok = parsed
        .as_ref()
        .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
    if !scheme_ok {
        return Err(err(
            &["sinks", index, "url"],
            format!(
                "{url:?} is not an http:// or https:// URL with a host, e.g. \"http://127.0.0.1:9090/api/v1/write\""
            ),
        ));
    }
    if let Some(label) = routing.invalid_label() {
        return Err(err(
            &["sinks", index, "routing"],
            format!(
                "{label:?} is not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with \"__\")"
            ),
        ));
    }
    if queue.segment_bytes < 64 * 1024 || queue.max_bytes < 4 * queue.segment_bytes {
        return Err(err(
            &["sinks", index, "queue", "max_bytes"],
            format!(
                "queue.max_bytes ({}) must be at least 4 × queue.segment_bytes ({}), and segments at least 65536 bytes",
                queue.max_bytes, queue.segment_bytes
            ),
        ));
    }
    if batch.max_samples == 0 {
        return Err(err(
            &["sinks", index, "batch", "max_samples"],
            "must be at least 1".into(),
        ));
    }
    if !(1..=64).contains(&concurrency) {
        return Err(err(
            &["sinks", index, "concurrency"],
            "must be between 1 and 64".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        let c: AggregatorConfig = picket_core::config::parse("a.toml", "").unwrap();
        assert_eq!(c, AggregatorConfig::default());
        assert_eq!(c.grpc.listen.port(), 7400);
        assert_eq!(c.http.listen.port(), 7401);
        assert!(c.grpc.listen.ip().is_loopback());
        assert!(!c.tls.insecure);
    }

    #[test]
    fn parses_a_full_config() {
        let text = r#"
[log]
level = "debug"
format = "json"
[grpc]
listen = "0.0.0.0:7500"
hello_timeout = "3s"
[tls]
cert = "/x/s.pem"
key = "/x/s-key.pem"
client_ca = "/x/ca.pem"
[http]
listen = "[::1]:7501"
[agents]
down_after_intervals = 5
[[sinks]]
type = "file"
path = "/tmp/journal.jsonl"
fsync = true
"#;
        let c: AggregatorConfig = picket_core::config::parse("a.toml", text).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.grpc.listen.port(), 7500);
        assert_eq!(c.grpc.hello_timeout, Duration::from_secs(3));
        assert_eq!(c.tls.client_ca.as_deref(), Some(Path::new("/x/ca.pem")));
        assert_eq!(c.agents.down_after_intervals, 5);
        assert_eq!(
            c.sinks,
            vec![SinkConfig::File {
                path: "/tmp/journal.jsonl".into(),
                fsync: true
            }]
        );
    }

    #[test]
    fn bad_values_point_at_their_line() {
        let text = "[grpc]\nlisten = \"localhost\"\n";
        let e = picket_core::config::parse::<AggregatorConfig>("a.toml", text).unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2));
        assert_eq!(e.key.as_deref(), Some("grpc.listen"));

        let text = "[[sinks]]\ntype = \"kafka\"\n";
        let e = picket_core::config::parse::<AggregatorConfig>("a.toml", text).unwrap_err();
        assert!(e.message.contains("unknown variant `kafka`"), "{e}");
    }

    /// `grpc.max_message_bytes` out of range names its line and the range.
    #[test]
    fn message_limits_outside_what_grpc_carries_are_refused() {
        for (value, says) in [("512", "at least 1024"), ("4294967296", "under 4 GiB")] {
            let text = format!("[tls]\ninsecure = true\n[grpc]\nmax_message_bytes = {value}\n");
            let c: AggregatorConfig = picket_core::config::parse("a.toml", &text).unwrap();
            let e = validate(&c, "a.toml", &text).unwrap_err();
            assert_eq!(e.position.map(|p| p.0), Some(4), "{e}");
            assert!(e.message.contains(says), "{e}");
        }
        let text = "[tls]\ninsecure = true\n[grpc]\nmax_message_bytes = 4294967295\n";
        let c: AggregatorConfig = picket_core::config::parse("a.toml", text).unwrap();
        assert!(validate(&c, "a.toml", text).is_ok());
    }

    #[test]
    fn missing_tls_files_say_how_to_fix() {
        let text = "[tls]\ncert = \"/nonexistent/s.pem\"\n";
        let c: AggregatorConfig = picket_core::config::parse("a.toml", text).unwrap();
        let e = validate(&c, "a.toml", text).unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2));
        assert!(e.message.contains("certs init"), "{e}");
    }

    #[test]
    fn connection_limits_have_defaults_and_are_checked() {
        let c = AggregatorConfig::default();
        assert_eq!(c.grpc.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.grpc.idle_connection_timeout, Duration::from_secs(30));
        assert_eq!(c.grpc.max_connections, 4096);
        assert_eq!(c.grpc.max_streams_per_connection, 16);
        assert_eq!(c.http.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.http.body_read_timeout, Duration::from_secs(60));
        assert_eq!(c.http.max_connections, 1024);

        let check = |text: &str| {
            let text = format!("[tls]\ninsecure = true\n{text}");
            let c: AggregatorConfig = picket_core::config::parse("a.toml", &text)?;
            validate(&c, "a.toml", &text)
        };
        check(
            "[grpc]\nhandshake_timeout = \"2s\"\nidle_connection_timeout = \"5s\"\nmax_connections = 10\n\
             max_streams_per_connection = 1\n[http]\nheader_read_timeout = \"1s\"\n\
             body_read_timeout = \"5m\"\nmax_connections = 5\n",
        )
        .unwrap();
        for (text, key, line) in [
            (
                "[grpc]\nhandshake_timeout = \"0s\"\n",
                "grpc.handshake_timeout",
                4,
            ),
            (
                "[grpc]\nidle_connection_timeout = \"10ms\"\n",
                "grpc.idle_connection_timeout",
                4,
            ),
            ("[grpc]\nmax_connections = 0\n", "grpc.max_connections", 4),
            (
                "[grpc]\nmax_streams_per_connection = 0\n",
                "grpc.max_streams_per_connection",
                4,
            ),
            (
                "[http]\nheader_read_timeout = \"0s\"\n",
                "http.header_read_timeout",
                4,
            ),
            (
                "[http]\nbody_read_timeout = \"500ms\"\n",
                "http.body_read_timeout",
                4,
            ),
            ("[http]\nmax_connections = 0\n", "http.max_connections", 4),
            (
                "[http]\nmax_connections = 2000000\n",
                "http.max_connections",
                4,
            ),
        ] {
            let e = check(text).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert_eq!(e.position.map(|p| p.0), Some(line), "{e}");
        }
        // Unknown keys are errors here as everywhere.
        let e = check("[http]\nheader_timeout = \"5s\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("http.header_timeout"), "{e}");
        let e = check("[grpc]\nmax_conections = 5\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("grpc.max_conections"), "{e}");
    }

    #[test]
    fn receiver_settings_are_checked_where_they_are_written() {
        let check = |text: &str| {
            let text = format!("[tls]\ninsecure = true\n{text}");
            let c: AggregatorConfig = picket_core::config::parse("a.toml", &text).unwrap();
            validate(&c, "a.toml", &text)
        };
        check("[receivers.pushgateway]\nenabled = true\n[receivers.influxdb]\nenabled = true\n")
            .unwrap();
        let e =
            check("[receivers.pushgateway]\nenabled = true\nmax_body_bytes = 10\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(5));
        assert!(e.message.contains("at least 1024"), "{e}");
        let e = check("[receivers.pushgateway]\ngroup_ttl = \"0s\"\n").unwrap_err();
        assert!(e.message.contains("at least 1s"), "{e}");
        let e = check("[receivers.influxdb]\nenabled = true\nusername = \"flink\"\n").unwrap_err();
        assert!(e.message.contains("password"), "{e}");
        let e = check(
            "[receivers.influxdb]\nenabled = true\nusername = \"u\"\npassword_file = \"/nonexistent/p\"\n",
        )
        .unwrap_err();
        assert!(e.message.contains("/nonexistent/p"), "{e}");
        let e = picket_core::config::parse::<AggregatorConfig>(
            "a.toml",
            "[receivers.pushgateway]\nenable = true\n",
        )
        .unwrap_err();
        assert_eq!(
            e.key.as_deref(),
            Some("receivers.pushgateway.enable"),
            "{e}"
        );
    }
}

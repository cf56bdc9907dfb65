//! The agent's configuration file (`agent.toml`) and its embedded defaults.
//!
//! With no file the agent collects host metrics every 10 s and streams them over TLS to
//! `https://127.0.0.1:7400`, trusting `/etc/picket/tls/ca.pem`. See `docs/configuration.md`.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use picket_core::config::ConfigError;
use picket_core::model::{Labels, is_valid_label_name};
use serde::Deserialize;

pub use picket_core::logging::{LogConfig, LogFormat};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The agent's identity: the `instance` label of every sample. Defaults to the host name.
    /// With mutual TLS the aggregator uses the certificate's name instead.
    pub instance: Option<String>,
    /// Static labels added to every sample, e.g. `site`, `rack`.
    pub labels: BTreeMap<String, String>,
    /// Time between collection rounds.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Each round starts up to this much later than its slot, at random, so a fleet restarted
    /// together does not collect and send in lockstep.
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    pub log: LogConfig,
    pub batch: BatchConfig,
    pub buffer: BufferConfig,
    pub spool: crate::shipper::spool::SpoolConfig,
    pub aggregator: AggregatorLink,
    pub sources: SourcesConfig,
    pub plugins: crate::plugins::PluginsConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            instance: None,
            labels: BTreeMap::new(),
            interval: Duration::from_secs(10),
            jitter: Duration::from_secs(1),
            log: LogConfig::default(),
            batch: BatchConfig::default(),
            buffer: BufferConfig::default(),
            spool: crate::shipper::spool::SpoolConfig::default(),
            aggregator: AggregatorLink::default(),
            sources: SourcesConfig::default(),
            plugins: crate::plugins::PluginsConfig::default(),
        }
    }
}

impl AgentConfig {
    /// The identity used for the `instance` label.
    pub fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "unknown".to_owned())
        })
    }

    /// `instance` plus the static labels.
    pub fn common_labels(&self) -> Labels {
        let mut labels =
            Labels::from_pairs(self.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        labels.insert("instance", self.instance());
        labels
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// A batch is sent once it holds this many samples...
    pub max_samples: NonZeroUsize,
    /// ...or once its oldest sample waited this long, whichever comes first. Only rounds
    /// closer together than this are merged: with `interval >= max_delay` a round is sent as
    /// soon as it is collected.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_samples: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            max_delay: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Memory for batches not yet acknowledged by an aggregator (encoded size). When full, the
    /// oldest batches are dropped and counted in `picket_agent_dropped_samples_total`.
    pub max_bytes: NonZeroUsize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: NonZeroUsize::new(16 * 1024 * 1024).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorLink {
    /// Aggregators to stream to, tried in order; on failure the agent fails over to the next.
    pub endpoints: Vec<String>,
    pub compression: Compression,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Reconnect delay: doubles from `backoff_initial` up to `backoff_max`, with jitter.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// HTTP/2 pings; an aggregator that does not answer in time is treated as gone, which is
    /// how half-open connections are noticed.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A batch not acknowledged within this time ends the connection (it is resent on the
    /// next one).
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Batches sent but not yet acknowledged, at most.
    pub max_in_flight: NonZeroUsize,
    /// On SIGTERM, how long to keep trying to deliver pending batches before exiting.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub tls: TlsLink,
}

impl Default for AggregatorLink {
    fn default() -> Self {
        AggregatorLink {
            endpoints: vec!["https://127.0.0.1:7400".into()],
            compression: Compression::Zstd,
            connect_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
            max_in_flight: NonZeroUsize::new(32).unwrap_or(NonZeroUsize::MIN),
            shutdown_timeout: Duration::from_secs(5),
            tls: TlsLink::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsLink {
    /// Plaintext (`http://` endpoints). Only for tests and trusted networks; logged as a warning.
    pub insecure: bool,
    /// CA that signed the aggregator's certificate.
    pub ca: PathBuf,
    /// Client certificate and key for mutual TLS (both or neither).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name to verify in the aggregator's certificate, when it differs from the endpoint host.
    pub server_name: Option<String>,
}

impl Default for TlsLink {
    fn default() -> Self {
        TlsLink {
            insecure: false,
            ca: PathBuf::from("/etc/picket/tls/ca.pem"),
            cert: None,
            key: None,
            server_name: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    /// Only read to explain that host metrics moved to the `host` plugin.
    #[serde(rename = "host")]
    pub retired_host: Option<serde_json::Value>,
    pub internal: InternalSourceConfig,
}

impl Default for SourcesConfig {
    fn default() -> Self {
        SourcesConfig {
            retired_host: None,
            internal: InternalSourceConfig { enabled: true },
        }
    }
}

/// The agent's own `picket_agent_*` metrics.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InternalSourceConfig {
    pub enabled: bool,
}

impl Default for InternalSourceConfig {
    fn default() -> Self {
        InternalSourceConfig { enabled: true }
    }
}

/// A config with its origin and text, for error messages.
pub type Loaded = picket_core::config::Loaded<AgentConfig>;

/// Loads `path`, or the embedded defaults when `None`, and validates it.
pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
    let loaded = picket_core::config::load::<AgentConfig>(path)?;
    validate(&loaded.config, &loaded.origin, &loaded.text)?;
    Ok(loaded)
}

/// Checks one key cannot express alone. `check_files` also reads the TLS files (for
/// `check-config`); at start-up they are read at each connection attempt instead, so an agent
/// can be installed before its certificates arrive.
pub fn validate(config: &AgentConfig, origin: &str, text: &str) -> Result<(), ConfigError> {
    let err = |path: &[&str], message: String| ConfigError::at_key(origin, text, path, message);
    if let Err(e) = config.log.validate() {
        return Err(err(&["log", "level"], e.to_string()));
    }
    if config.instance.as_deref() == Some("") {
        return Err(err(
            &["instance"],
            "must not be empty (leave it out to use the host name)".into(),
        ));
    }
    for name in config.labels.keys() {
        if !is_valid_label_name(name) || name.starts_with("__") {
            return Err(err(
                &["labels", name],
                format!(
                    "{name:?} is not a valid label name (use letters, digits and _, not starting with a digit or __)"
                ),
            ));
        }
        if name == "instance" {
            return Err(err(
                &["labels", name],
                "set the instance label with the top-level `instance` key".into(),
            ));
        }
    }
    if config.interval < Duration::from_millis(100) {
        return Err(err(
            &["interval"],
            "must be at least 100ms (e.g. \"10s\")".into(),
        ));
    }
    if config.jitter >= config.interval {
        return Err(err(
            &["jitter"],
            format!("must be shorter than interval ({:?})", config.interval),
        ));
    }
    let link = &config.aggregator;
    if link.endpoints.is_empty() {
        return Err(err(
            &["aggregator", "endpoints"],
            "list at least one aggregator, e.g. [\"https://aggregator.example:7400\"]".into(),
        ));
    }
    for (i, endpoint) in link.endpoints.iter().enumerate() {
        let index = i.to_string();
        let at = ["aggregator", "endpoints", index.as_str()];
        let scheme_ok = match endpoint.split_once("://") {
            Some(("https", rest)) => !rest.is_empty(),
            Some(("http", rest)) if link.tls.insecure => !rest.is_empty(),
            Some(("http", _)) => {
                return Err(err(
                    &at,
                    format!(
                        "{endpoint:?} is plaintext; use https:// or set aggregator.tls.insecure = true"
                    ),
                ));
            }
            _ => false,
        };
        let parsed = endpoint.parse::<tonic::transport::Uri>();
        if !scheme_ok || parsed.as_ref().map_or(true, |u| u.host().is_none()) {
            return Err(err(
                &at,
                format!("{endpoint:?} is not an endpoint URL; write it as \"https://HOST:PORT\""),
            ));
        }
        if link.tls.insecure && endpoint.starts_with("https://") {
            return Err(err(
                &at,
                "aggregator.tls.insecure = true needs http:// endpoints".into(),
            ));
        }
    }
    if link.tls.cert.is_some() != link.tls.key.is_some() {
        let missing = if link.tls.cert.is_some() {
            "key"
        } else {
            "cert"
        };
        return Err(err(
            &["aggregator", "tls"],
            format!("mutual TLS needs both cert and key; add aggregator.tls.{missing}"),
        ));
    }
    if config.spool.max_bytes.get() < 1024 * 1024 {
        return Err(err(
            &["spool", "max_bytes"],
            "must be at least 1048576 (1 MiB); the default is 67108864 (64 MiB)".into(),
        ));
    }
    if config.spool.flush_interval < Duration::from_millis(100) {
        return Err(err(
            &["spool", "flush_interval"],
            "must be at least 100ms (e.g. \"10s\")".into(),
        ));
    }
    if config.spool.directory.as_deref() == Some(Path::new("")) {
        return Err(err(
            &["spool", "directory"],
            "must not be empty (leave it out for /var/lib/picket/spool)".into(),
        ));
    }
    if config.sources.retired_host.is_some() {
        return Err(err(
            &["sources", "host"],
            "host metrics now come from the embedded `host` plugin, which runs by default; remove [sources.host] (to run only the plugin instances you list, set plugins.defaults = false)".into(),
        ));
    }
    validate_plugins(&config.plugins, &err)?;
    if link.backoff_initial > link.backoff_max {
        return Err(err(
            &["aggregator", "backoff_initial"],
            "must not exceed backoff_max".into(),
        ));
    }
    Ok(())
}

fn validate_plugins(
    plugins: &crate::plugins::PluginsConfig,
    err: &dyn Fn(&[&str], String) -> ConfigError,
) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    let max_stack = crate::plugins::runtime::MAX_STACK_BYTES;
    let stack_range = 64 * 1024..=max_stack;
    if !stack_range.contains(&plugins.max_stack_bytes) {
        return Err(err(
            &["plugins", "max_stack_bytes"],
            format!("must be between 65536 and {max_stack}"),
        ));
    }
    if plugins.watch_interval < Duration::from_millis(100) {
        return Err(err(
            &["plugins", "watch_interval"],
            "must be at least 100ms".into(),
        ));
    }
    for (i, instance) in plugins.instances.iter().enumerate() {
        let index = i.to_string();
        let at = |key: &'static str| {
            [
                String::from("plugins"),
                "instances".into(),
                index.clone(),
                key.into(),
            ]
        };
        let fail = |key: &'static str, message: String| {
            let path = at(key);
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            Err(err(&path, message))
        };
        if !names.insert(instance.name.as_str()) {
            return fail(
                "name",
                format!(
                    "{:?} is used by two instances; names must be unique",
                    instance.name
                ),
            );
        }
        if instance.plugin.is_empty()
            || instance.plugin.contains('/')
            || instance.plugin.starts_with('.')
        {
            return fail(
                "plugin",
                "the name of a .wasm file in plugins.directory, without the extension".into(),
            );
        }
        if !crate::plugins::catalog::is_first_party(&instance.plugin) && plugins.directory.is_none()
        {
            let first_party: Vec<_> = crate::plugins::catalog::first_party_names().collect();
            return fail(
                "plugin",
                format!(
                    "{:?} is not one of the embedded plugins ({}); for a custom plugin set plugins.directory to the directory holding {}.wasm",
                    instance.plugin,
                    first_party.join(", "),
                    instance.plugin
                ),
            );
        }
        if instance
            .max_stack_bytes
            .is_some_and(|s| !stack_range.contains(&s))
        {
            return fail(
                "max_stack_bytes",
                format!("must be between 65536 and {max_stack}"),
            );
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(600)).contains(&instance.timeout) {
            return fail("timeout", "must be between 10ms and 10m".into());
        }
        if instance.interval.is_some_and(|d| {
            !(Duration::from_millis(100)..=Duration::from_secs(86_400)).contains(&d)
        }) {
            return fail("interval", "must be between 100ms and 24h".into());
        }
        // Host calls run inside the call's deadline: a host timeout as long as the deadline
        // would end the whole call instead of reaching the plugin as a `timeout` error.
        let grants = &instance.grants;
        for (key, timeout, granted) in [
            (
                "http.timeout",
                grants.http_timeout(),
                !grants.http.allow.is_empty(),
            ),
            (
                "exec_timeout",
                grants.exec_timeout(),
                !grants.exec.is_empty(),
            ),
        ] {
            if granted && timeout >= instance.timeout {
                return fail(
                    "timeout",
                    format!(
                        "must be longer than grants.{key} ({timeout:?}), which is spent inside it; raise timeout or lower grants.{key}"
                    ),
                );
            }
        }
        if let Some(grant) = instance
            .grants
            .exec
            .iter()
            .find(|g| !g.program.starts_with('/'))
        {
            return fail(
                "grants",
                format!(
                    "exec program {:?} must be an absolute path (e.g. \"/usr/bin/{}\"), so PATH cannot change what runs",
                    grant.program, grant.program
                ),
            );
        }
        if instance.max_memory_mb == 0 || instance.max_series == 0 || instance.max_bytes == 0 {
            return fail("max_memory_mb", "limits must be above zero".into());
        }
    }
    Ok(())
}

/// Checks that every plugin instance's `.wasm` file is readable, for `check-config`.
pub fn check_plugin_files(
    config: &AgentConfig,
    origin: &str,
    text: &str,
) -> Result<(), ConfigError> {
    for (i, instance) in config.plugins.instances.iter().enumerate() {
        if let Err(e) =
            crate::plugins::catalog::load(&instance.plugin, config.plugins.directory.as_deref())
        {
            let index = i.to_string();
            return Err(ConfigError::at_key(
                origin,
                text,
                &["plugins", "instances", &index, "plugin"],
                e.to_string(),
            ));
        }
    }
    Ok(())
}

/// Reads the TLS files the config names, for `check-config`.
pub fn check_tls_files(config: &AgentConfig, origin: &str, text: &str) -> Result<(), ConfigError> {
    let tls = &config.aggregator.tls;
    if tls.insecure {
        return Ok(());
    }
    let err = |key: &str, e: picket_core::tls::TlsFileError| {
        ConfigError::at_key(origin, text, &["aggregator", "tls", key], e.to_string())
    };
    picket_core::tls::read_certificates(&tls.ca).map_err(|e| err("ca", e))?;
    if let Some(cert) = &tls.cert {
        picket_core::tls::read_certificates(cert).map_err(|e| err("cert", e))?;
    }
    if let Some(key) = &tls.key {
        picket_core::tls::read_private_key(key).map_err(|e| err("key", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = picket_core::config::parse("agent.toml", text)?;
        validate(&config, "agent.toml", text)?;
        Ok(config)
    }

    #[test]
    fn defaults_are_valid_and_sensible() {
        let c = check("").unwrap();
        assert_eq!(c.interval, Duration::from_secs(10));
        assert_eq!(c.aggregator.endpoints, vec!["https://127.0.0.1:7400"]);
        assert!(!c.aggregator.tls.insecure);
        let defaults: Vec<_> = c
            .plugins
            .effective_instances()
            .into_iter()
            .map(|i| i.plugin)
            .collect();
        assert!(defaults.contains(&"host".to_owned()), "{defaults:?}");
    }

    #[test]
    fn host_call_timeouts_must_fit_inside_the_call_deadline() {
        let text = "[[plugins.instances]]\nname = \"f\"\nplugin = \"flink\"\ntimeout = \"3s\"\ngrants = { http = { allow = [\"http://127.0.0.1:8081/\"] } }\n";
        let e = check(text).unwrap_err().to_string();
        assert!(e.contains("grants.http.timeout"), "{e}");
        check(&text.replace("3s", "6s")).unwrap();
    }

    #[test]
    fn the_retired_host_source_gets_a_pointer_to_the_plugin() {
        let e = check("[sources.host]\nenabled = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`host` plugin") && e.contains(":1"), "{e}");
    }

    #[test]
    fn custom_plugins_need_a_directory_and_first_party_ones_do_not() {
        let custom = "[[plugins.instances]]\nname = \"x\"\nplugin = \"mine\"\n";
        let e = check(custom).unwrap_err().to_string();
        assert!(e.contains("plugins.directory"), "{e}");
        let first_party = "[[plugins.instances]]\nname = \"f\"\nplugin = \"flink\"\n";
        check(first_party).unwrap();
    }

    #[test]
    fn an_instance_with_a_default_name_replaces_the_default() {
        let c = check(
            "[[plugins.instances]]\nname = \"host\"\nplugin = \"host\"\ninterval = \"30s\"\ngrants = { host_stats = true }\n",
        )
        .unwrap();
        let hosts: Vec<_> = c
            .plugins
            .effective_instances()
            .into_iter()
            .filter(|i| i.name == "host")
            .collect();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].interval, Some(Duration::from_secs(30)));
        let none = check("[plugins]\ndefaults = false\n").unwrap();
        assert!(none.plugins.effective_instances().is_empty());
    }

    #[test]
    fn full_config_parses() {
        let c = check(
            r#"
instance = "pi-07"
interval = "5s"
jitter = "500ms"
[labels]
site = "lab"
rack = "r1"
[batch]
max_samples = 500
max_delay = "200ms"
[aggregator]
endpoints = ["https://a.example:7400", "https://b.example:7400"]
compression = "gzip"
[aggregator.tls]
ca = "/x/ca.pem"
cert = "/x/pi.pem"
key = "/x/pi-key.pem"
"#,
        )
        .unwrap();
        assert_eq!(c.common_labels().get("instance"), Some("pi-07"));
        assert_eq!(c.common_labels().get("rack"), Some("r1"));
        assert_eq!(c.aggregator.endpoints.len(), 2);
        assert_eq!(c.aggregator.compression, Compression::Gzip);
    }

    #[test]
    fn errors_name_line_and_key() {
        let e = check("interval = \"10s\"\nintervall = \"5s\"\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2));
        assert!(e.message.contains("unknown field `intervall`"), "{e}");

        let e = check("[aggregator]\nendpoints = [\"http://x:7400\"]\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2));
        assert_eq!(e.key.as_deref(), Some("aggregator.endpoints.0"));
        assert!(e.message.contains("insecure"), "{e}");

        let e = check("[aggregator]\nendpoints = [\"127.0.0.1:7400\"]\n").unwrap_err();
        assert!(e.message.contains("https://HOST:PORT"), "{e}");

        let e = check("[labels]\n\"bad-label\" = \"x\"\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2));

        let e = check("[batch]\nmax_samples = 0\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("batch.max_samples"));

        let e = check("[aggregator.tls]\ncert = \"/x.pem\"\n").unwrap_err();
        assert!(e.message.contains("aggregator.tls.key"), "{e}");

        {
            let e = check(
                "[plugins]\ndirectory = \"/p\"\n[[plugins.instances]]\nname = \"a\"\nplugin = \"rpi\"\n\
                 grants = { exec = [{ program = \"vcgencmd\", args = [] }] }\n",
            )
            .unwrap_err();
            assert!(e.message.contains("/usr/bin/vcgencmd"), "{e}");
            let e = check(
                "[plugins]\ndirectory = \"/p\"\n[[plugins.instances]]\nname = \"a\"\nplugin = \"x\"\n\
                 [[plugins.instances]]\nname = \"a\"\nplugin = \"y\"\n",
            )
            .unwrap_err();
            assert_eq!(e.key.as_deref(), Some("plugins.instances.1.name"));
            assert_eq!(e.position.map(|p| p.0), Some(7));
        }
        let e = check("interval = \"soon\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("interval"));
    }
}

//! `[plugins]` in the agent config: the instances to run, with their settings, grants,
//! schedules and limits, plus the default instances the agent runs when the config says
//! nothing (host metrics everywhere, Raspberry Pi metrics on a Pi).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::convert;
use super::grants::{ExecGrant, Grants};
use super::runtime::InstanceLimits;

/// `[plugins]` in the agent config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Directory of operators' own `.wasm` plugins; `plugin = "NAME"` loads `NAME.wasm` here.
    /// A file added or replaced here reloads the instances that use it.
    pub directory: Option<PathBuf>,
    /// How often `directory` is checked for replaced files.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
    /// Where compiled plugins are kept between restarts (see `cache.rs`); unset: compile on
    /// every start.
    pub cache_directory: Option<PathBuf>,
    /// Run the default instances ([`default_instances`]) besides the listed ones. An instance
    /// listed with the same name replaces a default one.
    pub defaults: bool,
    /// Wasm stack cap for instances that do not set their own; deep recursion past it traps.
    pub max_stack_bytes: usize,
    pub instances: Vec<InstanceConfig>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            directory: None,
            watch_interval: Duration::from_secs(5),
            cache_directory: None,
            defaults: true,
            max_stack_bytes: 512 * 1024,
            instances: Vec::new(),
        }
    }
}

impl PluginsConfig {
    /// The instances to run: the listed ones, plus the defaults not replaced by name.
    pub fn effective_instances(&self) -> Vec<InstanceConfig> {
        let mut instances = self.instances.clone();
        if self.defaults {
            for default in default_instances(is_raspberry_pi()) {
                if !instances.iter().any(|i| i.name == default.name) {
                    instances.push(default);
                }
            }
        }
        instances
    }

    /// The stack cap of one instance.
    pub fn stack_bytes(&self, instance: &InstanceConfig) -> usize {
        instance.max_stack_bytes.unwrap_or(self.max_stack_bytes)
    }
}

/// What the agent runs with no `[[plugins.instances]]`: host metrics everywhere, and on a
/// Raspberry Pi the `rpi` plugin with exactly the `vcgencmd` calls and sysfs files it uses.
pub fn default_instances(raspberry_pi: bool) -> Vec<InstanceConfig> {
    let mut host = InstanceConfig::new("host", "host");
    host.grants.host_stats = true;
    let mut instances = vec![host];
    if raspberry_pi {
        let mut rpi = InstanceConfig::new("rpi", "rpi");
        // The class entries are symlinks into /sys/devices; reads are checked on both sides.
        rpi.grants = rpi_grants(
            "/usr/bin/vcgencmd",
            &["/sys/class/thermal", "/sys/devices/virtual/thermal"],
        );
        instances.push(rpi);
    }
    instances
}

/// Exactly what the `rpi` plugin uses: its four `vcgencmd` calls, and the thermal zones'
/// `temp` and `type` files under each of `thermal_dirs`.
pub fn rpi_grants(vcgencmd: &str, thermal_dirs: &[&str]) -> Grants {
    let exec = [
        &["measure_temp"][..],
        &["get_throttled"],
        &["measure_clock", "arm"],
        &["measure_volts", "core"],
    ]
    .iter()
    .map(|args| ExecGrant {
        program: vcgencmd.to_owned(),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
    })
    .collect();
    let read_file = thermal_dirs
        .iter()
        .flat_map(|dir| ["temp", "type"].map(|file| format!("{dir}/thermal_zone*/{file}")))
        .collect();
    Grants {
        exec,
        read_file,
        ..Grants::default()
    }
}

/// Whether this machine is a Raspberry Pi, from the device tree's model string; read once,
/// since the effective instances are worked out on every reload and file check.
fn is_raspberry_pi() -> bool {
    static RASPBERRY_PI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *RASPBERRY_PI.get_or_init(|| {
        std::fs::read("/proc/device-tree/model")
            .map(|model| String::from_utf8_lossy(&model).contains("Raspberry Pi"))
            .unwrap_or(false)
    })
}

/// One `[[plugins.instances]]`: a plugin with its own settings, grants, schedule and limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// Unique name of this instance, e.g. `flink-prod`; the `plugin_instance` of its health
    /// metrics.
    pub name: String,
    /// Which plugin: the stem of a `.wasm` file in `plugins.directory`.
    pub plugin: String,
    /// Collection interval; defaults to the agent's `interval`.
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// Deadline for each call into the plugin.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_memory_mb")]
    pub max_memory_mb: usize,
    #[serde(default = "default_max_series")]
    pub max_series: usize,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    #[serde(default = "default_max_label_value_bytes")]
    pub max_label_value_bytes: usize,
    /// Handed to the plugin's `init` as a JSON object.
    #[serde(default)]
    pub settings: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub grants: Grants,
    /// Wasm stack cap of this instance; defaults to `plugins.max_stack_bytes`.
    #[serde(default)]
    pub max_stack_bytes: Option<usize>,
}

/// Longer than the host calls' own default timeout (5 s), so a slow endpoint reaches the
/// plugin as a `timeout` host error it can report, rather than ending the whole call.
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
/// Plenty for the first-party plugins on typical input (the host plugin uses about 2 MiB);
/// a scrape of tens of megabytes needs more.
fn default_memory_mb() -> usize {
    32
}
fn default_max_series() -> usize {
    100_000
}
fn default_max_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_max_label_value_bytes() -> usize {
    4096
}

impl InstanceConfig {
    /// An instance with every default and no grants but `log`.
    pub fn new(name: &str, plugin: &str) -> Self {
        InstanceConfig {
            name: name.to_owned(),
            plugin: plugin.to_owned(),
            interval: None,
            timeout: default_timeout(),
            max_memory_mb: default_memory_mb(),
            max_series: default_max_series(),
            max_bytes: default_max_bytes(),
            max_label_value_bytes: default_max_label_value_bytes(),
            settings: serde_json::Map::new(),
            grants: Grants::default(),
            max_stack_bytes: None,
        }
    }

    pub fn limits(&self) -> InstanceLimits {
        InstanceLimits {
            call_timeout: self.timeout,
            max_memory_bytes: self.max_memory_mb.saturating_mul(1024 * 1024),
            output: convert::OutputLimits {
                max_series: self.max_series,
                max_bytes: self.max_bytes,
                max_label_value_bytes: self.max_label_value_bytes,
            },
        }
    }
}

//! Sandboxed WebAssembly collector plugins (wasmtime, component model).
//!
//! The contract is `plugins/wit/plugin.wit` (`picket:plugin@0.1.0`). Each configured instance
//! gets its own store and its own supervisor task ([`run_instance`]): it instantiates the
//! plugin, passes it its settings, collects on the instance's interval, and sends the rounds
//! to the shipper like any other source. A plugin that traps, runs past its deadline, grows
//! past its memory cap or returns more than its output caps is torn down and started again
//! with backoff; the agent and the other plugins carry on. Health per instance is reported
//! as `picket_plugin_*` metrics by the `internal` source.
//!
//! Module map: [`grants`] (what an instance may touch), [`host`] (the host functions and the
//! sandboxed store state), [`runtime`] (engine, limits, calls), [`convert`] (output checks),
//! `crate::plugin_stats` (per-instance health).

pub mod convert;
pub mod grants;
pub mod host;
mod http_client;
pub mod runtime;
mod stats_snapshot;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use picket_core::model::{Family, now_ms};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::plugin_stats::PluginStats;
use crate::sources::StalenessTracker;
use grants::Grants;
use runtime::{Instance, InstanceLimits, Runtime};

/// Host bindings generated from the WIT world.
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../plugins/wit",
        imports: { default: async },
        exports: { default: async },
    });
}

/// `[plugins]` in the agent config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Directory of operators' own `.wasm` plugins; `plugin = "NAME"` loads `NAME.wasm` here.
    pub directory: Option<PathBuf>,
    /// Wasm stack cap for every plugin; deep recursion past it traps.
    pub max_stack_bytes: usize,
    pub instances: Vec<InstanceConfig>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            directory: None,
            max_stack_bytes: 512 * 1024,
            instances: Vec::new(),
        }
    }
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
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_memory_mb() -> usize {
    64
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

/// Restart delays after a failure: doubling from the first to the last.
const RESTART_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(300));

/// Everything one instance's supervisor needs.
pub struct InstanceTask {
    pub runtime: Arc<Runtime>,
    pub wasm: Arc<Vec<u8>>,
    pub config: InstanceConfig,
    pub interval: Duration,
    pub stats: Arc<PluginStats>,
}

/// Supervises one plugin instance until `stop`: (re)starts it, collects on schedule, sends
/// the rounds to `out`.
pub async fn run_instance(
    task: InstanceTask,
    out: mpsc::Sender<Vec<Family>>,
    mut stop: watch::Receiver<bool>,
) {
    let InstanceTask {
        runtime,
        wasm,
        config,
        interval,
        stats,
    } = task;
    let name = format!("{}/{}", config.plugin, config.name);
    let runtime_for_compile = runtime.clone();
    let compiled = tokio::task::spawn_blocking(move || runtime_for_compile.compile(&wasm)).await;
    let component = match compiled {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            stats.count_error(e.kind());
            tracing::error!(plugin = %name, error = %e, "plugin disabled: it does not compile");
            return;
        }
        Err(e) => {
            tracing::error!(plugin = %name, error = %e, "plugin compilation panicked");
            return;
        }
    };
    let settings = serde_json::Value::Object(config.settings.clone()).to_string();
    let grants = Arc::new(config.grants.clone());
    let mut delay = RESTART_BACKOFF.0;
    let mut staleness = StalenessTracker::default();
    loop {
        let started = Instance::start(
            &runtime,
            &component,
            name.clone(),
            grants.clone(),
            &settings,
            config.limits(),
            stats.clone(),
        )
        .await;
        let mut instance = match started {
            Ok(i) => i,
            Err(e) => {
                PluginStats::set(&stats.up, 0);
                stats.count_error(e.kind());
                tracing::error!(plugin = %name, error = %e, retry_in = ?delay, "plugin failed to start");
                if sleep_or_stop(delay, &mut stop).await {
                    return;
                }
                delay = (delay * 2).min(RESTART_BACKOFF.1);
                continue;
            }
        };
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            // Skip slots missed while a slow call ran, rather than collecting back to back.
            next = (next + interval).max(tokio::time::Instant::now());
            let ts = now_ms();
            match instance.collect(ts).await {
                Ok(mut families) => {
                    PluginStats::set(&stats.up, 1);
                    delay = RESTART_BACKOFF.0;
                    staleness.mark(&mut families, ts);
                    if out.send(families).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    PluginStats::set(&stats.up, 0);
                    stats.count_error(e.kind());
                    if e.needs_restart() {
                        tracing::error!(plugin = %name, error = %e, retry_in = ?delay, "plugin torn down; restarting it");
                        break;
                    }
                    tracing::warn!(plugin = %name, error = %e, "plugin collection failed");
                }
            }
        }
        // Drop the broken instance (its store and memory) before waiting.
        drop(instance);
        PluginStats::add_restart(&stats);
        if sleep_or_stop(delay, &mut stop).await {
            return;
        }
        delay = (delay * 2).min(RESTART_BACKOFF.1);
    }
}

/// Sleeps `delay`; true when `stop` turned on meanwhile.
async fn sleep_or_stop(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

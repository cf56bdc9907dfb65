//! `picket-agent`: collects metrics on a node and streams them to a `picket-aggregator`.
//!
//! Module map: [`config`] reads `agent.toml`; [`collector`] runs the sources in [`sources`] on
//! schedule; [`shipper`] batches, sends and resends until acknowledged; [`stats`] holds the
//! agent's own counters. [`run`] wires them together with signal handling.

pub mod collector;
pub mod config;
pub mod plugin_stats;
#[cfg(feature = "plugins")]
pub mod plugins;
pub mod shipper;
pub mod sources;
pub mod stats;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use picket_core::logging::LogHandle;
use picket_core::model::Family;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use collector::Collector;
use config::AgentConfig;
use shipper::Shipper;
use stats::AgentStats;

/// Collection rounds buffered between the collector and the shipper. The shipper drains this
/// continuously, so it only absorbs short stalls.
const ROUND_QUEUE: usize = 16;

/// Runs the agent until SIGTERM or SIGINT; SIGHUP re-reads the config.
pub async fn run(
    config: AgentConfig,
    config_path: Option<PathBuf>,
    log: LogHandle,
) -> anyhow::Result<()> {
    if config.aggregator.tls.insecure {
        tracing::warn!(
            "aggregator.tls.insecure = true: metrics travel in plaintext and the aggregator is not authenticated"
        );
    }
    let stats = Arc::new(AgentStats::default());
    let config = Arc::new(config);
    let (config_tx, config_rx) = watch::channel(config.clone());
    let (rounds_tx, rounds_rx) = mpsc::channel(ROUND_QUEUE);
    let (stop_tx, stop_rx) = watch::channel(false);
    #[cfg(feature = "plugins")]
    let plugin_tasks = start_plugins(&config, &stats, &rounds_tx, &stop_rx)?;
    let collector =
        tokio::spawn(Collector::new(stats.clone()).run(config_rx.clone(), rounds_tx, stop_rx));
    let shipper = tokio::spawn(Shipper::new(config.clone(), stats).run(rounds_rx, config_rx));
    tracing::info!(instance = %config.instance(), endpoints = ?config.aggregator.endpoints,
        interval = ?config.interval, "picket-agent running");

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => match config::load(config_path.as_deref()) {
                Ok(loaded) => {
                    if let Err(e) = log.set_level(&loaded.config.log.level) {
                        tracing::error!("SIGHUP: {e}");
                    }
                    #[cfg(feature = "plugins")]
                    if loaded.config.plugins != config_tx.borrow().plugins {
                        tracing::warn!("SIGHUP: [plugins] changed; plugin instances keep their old settings until the agent restarts");
                    }
                    let _ = config_tx.send(Arc::new(loaded.config));
                    tracing::info!(config = %loaded.origin, "SIGHUP: configuration reloaded");
                }
                Err(e) => tracing::error!("SIGHUP: keeping the running config; the new one is invalid:\n{e}"),
            },
        }
    }
    tracing::info!("shutting down: delivering pending batches");
    let _ = stop_tx.send(true);
    // The collector exits and closes the round channel; the shipper then seals its open
    // batch and drains for at most aggregator.shutdown_timeout.
    let _ = collector.await;
    #[cfg(feature = "plugins")]
    for task in plugin_tasks {
        let _ = task.await;
    }
    let _ = shipper.await;
    Ok(())
}

/// Starts one supervisor task per configured plugin instance. Their rounds go to the shipper
/// like the built-in sources'. A plugin file that cannot be read disables that instance (and
/// says why) rather than the agent.
#[cfg(feature = "plugins")]
fn start_plugins(
    config: &AgentConfig,
    stats: &Arc<AgentStats>,
    rounds: &mpsc::Sender<Vec<Family>>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let plugins = &config.plugins;
    if plugins.instances.is_empty() {
        return Ok(Vec::new());
    }
    let runtime = plugins::runtime::Runtime::new(plugins.max_stack_bytes)
        .context("starting the plugin runtime")?;
    let directory = plugins.directory.clone().unwrap_or_default();
    let mut tasks = Vec::new();
    for instance in &plugins.instances {
        let instance_stats = stats.register_plugin(&instance.plugin, &instance.name);
        let path = directory.join(format!("{}.wasm", instance.plugin));
        let wasm = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                instance_stats.count_error("compile");
                tracing::error!(plugin = %instance.plugin, instance = %instance.name, path = %path.display(), error = %e,
                    "plugin instance disabled: cannot read its .wasm file");
                continue;
            }
        };
        let task = plugins::InstanceTask {
            runtime: runtime.clone(),
            wasm: Arc::new(wasm),
            interval: instance.interval.unwrap_or(config.interval),
            config: instance.clone(),
            stats: instance_stats,
        };
        tasks.push(tokio::spawn(plugins::run_instance(
            task,
            rounds.clone(),
            stop.clone(),
        )));
    }
    tracing::info!(instances = tasks.len(), "plugins started");
    Ok(tasks)
}

/// `picket-agent once`: one round from every enabled source and plugin instance, with the
/// agent's labels applied, as it would be sent. Plugin failures are printed to stderr and do
/// not stop the others.
pub async fn collect_once(config: &AgentConfig) -> Vec<Family> {
    let mut collector = Collector::new(Arc::new(AgentStats::default()));
    let mut families = collector.collect(config).await;
    if config.sources.host.enabled {
        // CPU usage is measured between two refreshes; take the second round.
        tokio::time::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL).await;
        families = collector.collect(config).await;
    }
    #[cfg(feature = "plugins")]
    families.extend(collect_plugins_once(config).await);
    let common = config.common_labels();
    for family in &mut families {
        family
            .points
            .retain(|p| p.value != picket_core::model::Value::Stale);
        for point in &mut family.points {
            for (name, value) in common.iter() {
                point.labels.insert(name, value);
            }
        }
    }
    families
}

/// One collection from every configured plugin instance, for `once`.
#[cfg(feature = "plugins")]
async fn collect_plugins_once(config: &AgentConfig) -> Vec<Family> {
    let plugins = &config.plugins;
    if plugins.instances.is_empty() {
        return Vec::new();
    }
    let runtime = match plugins::runtime::Runtime::new(plugins.max_stack_bytes) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("plugins: {e}");
            return Vec::new();
        }
    };
    let directory = plugins.directory.clone().unwrap_or_default();
    let mut out = Vec::new();
    for instance in &plugins.instances {
        let name = format!("{}/{}", instance.plugin, instance.name);
        let path = directory.join(format!("{}.wasm", instance.plugin));
        let result = async {
            let wasm =
                std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let rt = runtime.clone();
            let component = tokio::task::spawn_blocking(move || rt.compile(&wasm))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let settings = serde_json::Value::Object(instance.settings.clone()).to_string();
            let mut running = plugins::runtime::Instance::start(
                &runtime,
                &component,
                name.clone(),
                Arc::new(instance.grants.clone()),
                &settings,
                instance.limits(),
                Arc::new(plugin_stats::PluginStats::default()),
            )
            .await
            .map_err(|e| e.to_string())?;
            running
                .collect(picket_core::model::now_ms())
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(families) => out.extend(families),
            Err(e) => eprintln!("plugin {name}: {e}"),
        }
    }
    out
}

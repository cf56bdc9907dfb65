//! `picket-agent`: collects metrics on a node and streams them to a `picket-aggregator`.
//!
//! Module map: [`config`] reads `agent.toml`; [`plugins`] runs the sandboxed collectors (all
//! collection but the agent's own metrics); [`collector`] reports those (`sources::internal`)
//! on schedule; [`shipper`] batches, sends and resends until acknowledged; [`stats`] holds the
//! agent's own counters. [`run`] wires them together with signal handling;
//! [`image_pages`] gives back the pages of the binary that start-up read and the steady state
//! does not use.

pub mod collector;
pub mod config;
pub mod describe;
pub mod image_pages;
pub mod plugin_stats;
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

/// Runs the agent until SIGTERM or SIGINT; SIGHUP re-reads the config. Plugins are compiled
/// where `compiler` says (the `picket-agent` binary: in child processes of itself).
pub async fn run(
    config: AgentConfig,
    config_path: Option<PathBuf>,
    log: LogHandle,
    compiler: plugins::compiler::Compiler,
) -> anyhow::Result<()> {
    if config.aggregator.tls.insecure {
        tracing::warn!(
            "aggregator.tls.insecure = true: metrics travel in plaintext and the aggregator is not authenticated"
        );
    }
    let stats = Arc::new(AgentStats::default());
    let config = Arc::new(config);
    // Before any task starts: a spool directory that cannot be used may stop the agent.
    let shipper = Shipper::open(config.clone(), stats.clone())?;
    let (config_tx, config_rx) = watch::channel(config.clone());
    let (rounds_tx, rounds_rx) = mpsc::channel(ROUND_QUEUE);
    let (stop_tx, stop_rx) = watch::channel(false);
    let manager = plugins::manager::PluginManager::new(
        plugins::manager::runtime_for(&config.plugins, compiler),
        stats.clone(),
        rounds_tx.clone(),
    );
    let plugin_manager = tokio::spawn(manager.run(config_rx.clone(), stop_rx.clone()));
    let collector =
        tokio::spawn(Collector::new(stats.clone()).run(config_rx.clone(), rounds_tx, stop_rx));
    let shipper = tokio::spawn(shipper.run(rounds_rx, config_rx));
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
    let _ = plugin_manager.await;
    let _ = shipper.await;
    let get = AgentStats::get;
    tracing::info!(
        rounds = get(&stats.collections),
        collected_samples = get(&stats.collected_samples),
        acked_samples = get(&stats.samples_acked),
        dropped_buffer_full = get(&stats.dropped_samples_buffer_full),
        dropped_shutdown = get(&stats.dropped_samples_shutdown),
        spool_dropped = get(&stats.spool_dropped_samples_full),
        "picket-agent stopped"
    );
    Ok(())
}

/// `picket-agent once`: one round from every enabled source and plugin instance, with the
/// agent's labels applied, as it would be sent. Plugin failures are printed to stderr and do
/// not stop the others.
pub async fn collect_once(config: &AgentConfig) -> Vec<Family> {
    let mut collector = Collector::new(Arc::new(AgentStats::default()));
    let mut families = collector.collect(config).await;
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

/// One collection from every plugin instance the agent would run, for `once`.
async fn collect_plugins_once(config: &AgentConfig) -> Vec<Family> {
    let plugins = &config.plugins;
    // No compile cache here: a one-off command (often run as root) must not create or own
    // the cache the service uses.
    let runtime = plugins::runtime::Runtime::new();
    let mut out = Vec::new();
    for instance in plugins.effective_instances() {
        let name = format!("{}/{}", instance.plugin, instance.name);
        let result = async {
            let code = plugins::catalog::load(&instance.plugin, plugins.directory.as_deref())
                .map_err(|e| e.to_string())?;
            let compiled = runtime
                .compile_async(code.wasm, plugins.stack_bytes(&instance))
                .await
                .map_err(|e| e.to_string())?;
            let settings = serde_json::Value::Object(instance.settings.clone()).to_string();
            let mut running = plugins::runtime::Instance::start(
                &compiled,
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

//! `picket-agent`: collects metrics on a node and streams them to a `picket-aggregator`.
//!
//! Module map: [`config`] reads `agent.toml`; [`collector`] runs the sources in [`sources`] on
//! schedule; [`shipper`] batches, sends and resends until acknowledged; [`stats`] holds the
//! agent's own counters. [`run`] wires them together with signal handling.

pub mod collector;
pub mod config;
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
    let _ = shipper.await;
    Ok(())
}

/// `picket-agent once`: one round from every enabled source, with the agent's labels applied,
/// as it would be sent.
pub async fn collect_once(config: &AgentConfig) -> Vec<Family> {
    let mut collector = Collector::new(Arc::new(AgentStats::default()));
    let mut families = collector.collect(config).await;
    if config.sources.host.enabled {
        // CPU usage is measured between two refreshes; take the second round.
        tokio::time::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL).await;
        families = collector.collect(config).await;
    }
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

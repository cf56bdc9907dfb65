//! One plugin instance's supervisor: instantiates it, passes it its settings, collects on the
//! instance's interval and sends the rounds on; a failed instance is torn down and started
//! again with backoff, while the agent and the other instances carry on.

use std::sync::Arc;
use std::time::Duration;

use super::config::InstanceConfig;
use super::runtime::{Compiled, Instance};
use crate::plugin_stats::PluginStats;
use crate::sources::StalenessTracker;
use crate::stats::AgentStats;
use picket_core::model::{Family, now_ms};
use tokio::sync::{mpsc, watch};

/// Restart delays after a failure: doubling from the first to the last.
const RESTART_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(300));

/// Everything one instance's supervisor needs.
pub struct InstanceTask {
    pub compiled: Compiled,
    pub config: InstanceConfig,
    pub interval: Duration,
    pub stats: Arc<PluginStats>,
    pub agent_stats: Arc<AgentStats>,
    /// The series the previous run of this instance reported last (handed over on a reload,
    /// so series the new code no longer reports go stale).
    pub staleness: StalenessTracker,
}

/// Supervises one plugin instance until `stop`: (re)starts it, collects on schedule, sends
/// the rounds to `out`. Returns the series it reported last.
pub async fn run_instance(
    task: InstanceTask,
    out: mpsc::Sender<Vec<Family>>,
    mut stop: watch::Receiver<bool>,
) -> StalenessTracker {
    let InstanceTask {
        compiled,
        config,
        interval,
        stats,
        agent_stats,
        mut staleness,
    } = task;
    let name = format!("{}/{}", config.plugin, config.name);
    let settings = serde_json::Value::Object(config.settings.clone()).to_string();
    let grants = Arc::new(config.grants.clone());
    let mut delay = RESTART_BACKOFF.0;
    let mut described = false;
    loop {
        let started = Instance::start(
            &compiled,
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
                    return staleness;
                }
                delay = (delay * 2).min(RESTART_BACKOFF.1);
                continue;
            }
        };
        if !described {
            described = true;
            warn_about_missing_grants(&mut instance, &config, &name).await;
        }
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.wait_for(|s| *s) => return staleness,
            }
            // Skip slots missed while a slow call ran, rather than collecting back to back.
            next = (next + interval).max(tokio::time::Instant::now());
            let ts = now_ms();
            match instance.collect(ts).await {
                Ok(mut families) => {
                    PluginStats::set(&stats.up, 1);
                    delay = RESTART_BACKOFF.0;
                    staleness.mark(&mut families, ts);
                    let samples: usize = families.iter().map(Family::sample_count).sum();
                    AgentStats::add(&agent_stats.collected_samples, samples as u64);
                    if out.send(families).await.is_err() {
                        return staleness;
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
            return staleness;
        }
        delay = (delay * 2).min(RESTART_BACKOFF.1);
    }
}

/// Tells the operator, once per start, which capabilities the plugin says it needs but the
/// instance was not granted (its calls would fail with `denied`).
async fn warn_about_missing_grants(instance: &mut Instance, config: &InstanceConfig, name: &str) {
    match instance.describe().await {
        Ok(description) => {
            for (capability, grant) in config.grants.missing(&description.capabilities) {
                tracing::warn!(plugin = %name, capability,
                    "the plugin wants the `{capability}` capability, which this instance is not granted; its calls will be denied. To allow it add {grant} to the instance's grants");
            }
        }
        Err(e) => tracing::warn!(plugin = %name, error = %e, "the plugin's describe() failed"),
    }
}

/// Sleeps `delay`; true when `stop` turned on meanwhile.
async fn sleep_or_stop(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

//! The agent's own collection loop: every `interval` (plus random jitter) it reports the
//! agent's `picket_agent_*` metrics and hands the round to the shipper. Everything else is
//! collected by plugins, each on its own schedule (see `plugins::manager`).
//!
//! Collection never waits for the network: the shipper drains the channel even while it is
//! disconnected, and applies the buffer bound there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use picket_core::model::{Family, now_ms};
use tokio::sync::{mpsc, watch};

use crate::config::AgentConfig;
use crate::sources::{StalenessTracker, internal};
use crate::stats::AgentStats;

pub struct Collector {
    stats: Arc<AgentStats>,
    /// A removed plugin instance's health series go stale rather than linger.
    staleness: StalenessTracker,
}

impl Collector {
    pub fn new(stats: Arc<AgentStats>) -> Self {
        Collector {
            stats,
            staleness: StalenessTracker::default(),
        }
    }

    /// Runs one round of every enabled source.
    pub async fn collect(&mut self, config: &AgentConfig) -> Vec<Family> {
        let started = Instant::now();
        let ts = now_ms();
        let mut families = Vec::new();
        if config.sources.internal.enabled {
            families.extend(internal::collect(&self.stats, ts));
        }
        self.staleness.mark(&mut families, ts);
        let samples: usize = families.iter().map(Family::sample_count).sum();
        AgentStats::add(&self.stats.collections, 1);
        AgentStats::add(&self.stats.collected_samples, samples as u64);
        AgentStats::set(
            &self.stats.last_collect_micros,
            started.elapsed().as_micros() as u64,
        );
        families
    }

    /// Collects on schedule until `stop` turns true, sending each round to `out`.
    pub async fn run(
        mut self,
        mut config: watch::Receiver<Arc<AgentConfig>>,
        out: mpsc::Sender<Vec<Family>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut slot = tokio::time::Instant::now();
        loop {
            let current = config.borrow_and_update().clone();
            let jitter = random_up_to(current.jitter);
            tokio::select! {
                _ = tokio::time::sleep_until(slot + jitter) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let families = self.collect(&current).await;
            if out.send(families).await.is_err() {
                return;
            }
            slot += current.interval;
            let now = tokio::time::Instant::now();
            if slot < now {
                // A round overran (or the machine was suspended): skip the missed slots
                // instead of collecting in a burst.
                slot = now + current.interval;
            }
        }
    }
}

fn random_up_to(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_nanos(fastrand::u64(0..max.as_nanos() as u64))
}

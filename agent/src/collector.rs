//! The collection loop: every `interval` (plus random jitter) it runs each enabled source,
//! adds stale markers for series that vanished, and hands the round to the shipper.
//!
//! Collection never waits for the network: the shipper drains the channel even while it is
//! disconnected, and applies the buffer bound there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use picket_core::model::{Family, now_ms};
use tokio::sync::{mpsc, watch};

use crate::config::AgentConfig;
use crate::sources::{StalenessTracker, host::HostSource, internal};
use crate::stats::AgentStats;

pub struct Collector {
    host: Option<HostSource>,
    host_staleness: StalenessTracker,
    stats: Arc<AgentStats>,
}

impl Collector {
    pub fn new(stats: Arc<AgentStats>) -> Self {
        Collector {
            host: None,
            host_staleness: StalenessTracker::default(),
            stats,
        }
    }

    /// Runs one round of every enabled source.
    pub async fn collect(&mut self, config: &AgentConfig) -> Vec<Family> {
        let started = Instant::now();
        let ts = now_ms();
        let mut families = Vec::new();
        let mut host_families = Vec::new();
        if config.sources.host.enabled {
            let mut host = self.host.take().unwrap_or_default();
            // sysinfo reads /proc and /sys synchronously.
            match tokio::task::spawn_blocking(move || {
                let f = host.collect(ts);
                (host, f)
            })
            .await
            {
                Ok((host, f)) => {
                    self.host = Some(host);
                    host_families = f;
                }
                Err(e) => tracing::error!("host source failed: {e}"),
            }
        } else {
            self.host = None;
        }
        // Also runs when the source was just disabled, so its series go stale at once.
        self.host_staleness.mark(&mut host_families, ts);
        families.extend(host_families);
        if config.sources.internal.enabled {
            families.extend(internal::collect(&self.stats, ts));
        }
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

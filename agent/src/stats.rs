//! Counters the agent keeps about itself, reported by the `internal` source as
//! `picket_agent_*` metrics so the fleet can see what each agent sent, buffered and dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::plugin_stats::PluginStats;

#[derive(Default)]
pub struct AgentStats {
    pub collections: AtomicU64,
    pub collected_samples: AtomicU64,
    pub batches_sent: AtomicU64,
    pub batches_acked: AtomicU64,
    pub samples_acked: AtomicU64,
    /// Dropped because the pending buffer was full.
    pub dropped_samples_buffer_full: AtomicU64,
    /// Dropped because the aggregator rejected the batch as malformed.
    pub dropped_samples_rejected: AtomicU64,
    /// Still pending when the agent exited.
    pub dropped_samples_shutdown: AtomicU64,
    pub pending_batches: AtomicU64,
    pub pending_bytes: AtomicU64,
    pub pending_samples: AtomicU64,
    /// Bytes in the disk spool's segment files.
    pub spool_bytes: AtomicU64,
    pub spool_writes: AtomicU64,
    pub spool_write_errors: AtomicU64,
    /// Dropped from the spool to stay within `spool.max_bytes`.
    pub spool_dropped_samples_full: AtomicU64,
    /// Spooled batches that could not be read back.
    pub spool_dropped_samples_unreadable: AtomicU64,
    /// Bytes of spool records skipped at start-up (torn writes, damage).
    pub spool_damaged_bytes: AtomicU64,
    pub connected: AtomicU64,
    pub connects: AtomicU64,
    pub connection_failures: AtomicU64,
    /// Bytes of mapped read-only pages of the agent's binary and libraries, and of plugins'
    /// file-mapped compiled code, dropped once started plugins had collected (`image_pages`).
    pub released_image_bytes: AtomicU64,
    /// Microseconds spent in the last collection round.
    pub last_collect_micros: AtomicU64,
    /// Health of every plugin instance: (plugin, instance, stats).
    pub plugins: Mutex<Vec<(String, String, Arc<PluginStats>)>>,
}

impl AgentStats {
    /// The health record of a plugin instance, registered on first use so the internal
    /// source reports it. A restarted or reloaded instance keeps its counters.
    pub fn register_plugin(&self, plugin: &str, instance: &str) -> Arc<PluginStats> {
        let mut plugins = self.plugins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, stats)) = plugins
            .iter()
            .find(|(p, i, _)| p == plugin && i == instance)
        {
            return stats.clone();
        }
        let stats = Arc::new(PluginStats::default());
        plugins.push((plugin.to_owned(), instance.to_owned(), stats.clone()));
        stats
    }

    /// Forgets an instance by name, whatever its plugin.
    pub fn unregister_instance(&self, instance: &str) {
        self.plugins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(_, i, _)| i != instance);
    }

    /// Forgets a plugin instance that was removed from the config, so its health series end.
    pub fn unregister_plugin(&self, plugin: &str, instance: &str) {
        self.plugins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(p, i, _)| !(p == plugin && i == instance));
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Ordering::Relaxed);
    }

    pub fn get(value: &AtomicU64) -> u64 {
        value.load(Ordering::Relaxed)
    }
}

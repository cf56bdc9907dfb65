//! Per-instance plugin health, reported as `picket_plugin_*` metrics.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct PluginStats {
    /// 1 while the instance is instantiated and its last collection succeeded.
    pub up: AtomicU64,
    /// Microseconds the last collect call took.
    pub last_collect_micros: AtomicU64,
    /// Linear memory in use by the instance, bytes.
    pub memory_bytes: AtomicU64,
    pub restarts: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl PluginStats {
    /// Counts an error of `kind`: trap, timeout, memory, limit, denied, host_timeout,
    /// collect, init, instantiate.
    pub fn count_error(&self, kind: &'static str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_insert(0) += 1;
    }

    pub fn errors(&self) -> BTreeMap<&'static str, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn add_restart(stats: &PluginStats) {
        stats.restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set(value: &AtomicU64, v: u64) {
        value.store(v, Ordering::Relaxed);
    }

    pub fn get(value: &AtomicU64) -> u64 {
        value.load(Ordering::Relaxed)
    }
}

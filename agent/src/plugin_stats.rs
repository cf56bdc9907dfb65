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

/// Every `kind` an error is counted under. All are reported from zero, so that
/// `increase()` and `rate()` see the first error of a kind instead of a series that starts
/// at 1.
pub const ERROR_KINDS: [&str; 11] = [
    "collect",
    "compile",
    "denied",
    "host_timeout",
    "init",
    "instantiate",
    "limit",
    "log_dropped",
    "memory",
    "timeout",
    "trap",
];

impl PluginStats {
    /// Counts an error of `kind`, one of [`ERROR_KINDS`].
    pub fn count_error(&self, kind: &'static str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_insert(0) += 1;
    }

    /// The count of every kind in [`ERROR_KINDS`] (zero when none happened), plus any other
    /// kind counted.
    pub fn errors(&self) -> BTreeMap<&'static str, u64> {
        let mut all: BTreeMap<&'static str, u64> = ERROR_KINDS.iter().map(|k| (*k, 0)).collect();
        for (kind, n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            all.insert(kind, *n);
        }
        all
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_is_reported_from_zero() {
        let stats = PluginStats::default();
        stats.count_error("trap");
        stats.count_error("trap");
        let errors = stats.errors();
        assert_eq!(errors.len(), ERROR_KINDS.len());
        assert_eq!(errors["trap"], 2);
        assert!(
            errors
                .iter()
                .filter(|(k, _)| **k != "trap")
                .all(|(_, n)| *n == 0)
        );
    }
}

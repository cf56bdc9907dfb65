//! Where accepted batches go. A batch is acknowledged to its agent only after every sink here
//! has taken it.
//!
//! Today: the latest-sample store behind `/metrics` (always on) and `file` journals. The
//! Prometheus remote-write and InfluxDB sinks arrive with their own modules here.

pub mod file;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use picket_core::model::Family;

use crate::config::SinkConfig;
use crate::store::LatestStore;
use file::{FileSink, FileSinkError};

pub struct Sinks {
    pub latest: LatestStore,
    files: Vec<Mutex<FileSink>>,
    /// False while the last delivery failed; `/readyz` reports it.
    healthy: AtomicBool,
}

impl Sinks {
    pub fn open(configs: &[SinkConfig], latest: LatestStore) -> Result<Self, FileSinkError> {
        let mut files = Vec::new();
        for config in configs {
            match config {
                SinkConfig::File { path, fsync } => {
                    files.push(Mutex::new(FileSink::open(path, *fsync)?));
                }
            }
        }
        Ok(Sinks {
            latest,
            files,
            healthy: AtomicBool::new(true),
        })
    }

    /// True when this batch is already in every durable sink (it was written before an
    /// aggregator restart, and the agent resends it because the ack never reached it). Takes
    /// the sinks' locks, which a slow disk can hold: call it from a blocking context.
    pub fn already_delivered(&self, agent: &str, session: u64, sequence: u64) -> bool {
        !self.files.is_empty()
            && self
                .files
                .iter()
                .all(|f| lock(f).has(agent, session, sequence))
    }

    /// Hands a batch to every sink; `Ok` means all of them have it. Blocking (file I/O): call
    /// it from a blocking context.
    pub fn deliver(
        &self,
        agent: &str,
        session: u64,
        sequence: u64,
        families: &[Family],
    ) -> Result<(), FileSinkError> {
        for file in &self.files {
            if let Err(e) = lock(file).write_batch(agent, session, sequence, families) {
                self.healthy.store(false, Ordering::Relaxed);
                return Err(e);
            }
        }
        self.healthy.store(true, Ordering::Relaxed);
        self.latest.apply(families);
        Ok(())
    }
}

impl Sinks {
    /// Whether every sink took the last batch it was given.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use picket_core::model::{Labels, MetricType};
    use std::time::Duration;

    #[test]
    fn a_failing_sink_is_reported_and_leaves_no_partial_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let config = [SinkConfig::File {
            path: path.clone(),
            fsync: false,
        }];
        let sinks = Sinks::open(&config, LatestStore::new(Duration::from_secs(60))).unwrap();
        let mut family = Family::new("m", MetricType::Gauge, "");
        family.push(Labels::from_pairs([("instance", "pi")]), 1000, 1.0);
        sinks
            .deliver("pi", 1, 1, std::slice::from_ref(&family))
            .unwrap();
        assert!(sinks.healthy());
        let len = std::fs::metadata(&path).unwrap().len();

        lock(&sinks.files[0]).fail_writes_for_test();
        assert!(
            sinks
                .deliver("pi", 1, 2, std::slice::from_ref(&family))
                .is_err()
        );
        assert!(!sinks.healthy());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert!(
            !sinks.already_delivered("pi", 1, 2),
            "a failed batch must be accepted again"
        );
    }
}

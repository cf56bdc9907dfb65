//! Where accepted batches go. A batch is acknowledged to its agent only after every sink here
//! has taken it.
//!
//! Today: the latest-sample store behind `/metrics` (always on) and `file` journals. The
//! Prometheus remote-write and InfluxDB sinks arrive with their own modules here.

pub mod file;

use std::sync::Mutex;

use picket_core::model::Family;

use crate::config::SinkConfig;
use crate::store::LatestStore;
use file::{FileSink, FileSinkError};

pub struct Sinks {
    pub latest: LatestStore,
    files: Vec<Mutex<FileSink>>,
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
        Ok(Sinks { latest, files })
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
            lock(file).write_batch(agent, session, sequence, families)?;
        }
        self.latest.apply(families);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

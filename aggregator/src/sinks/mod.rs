//! Where accepted batches go. A batch is acknowledged to its agent only after every sink here
//! has taken it: the latest-sample store behind `/metrics` (always on), `file` journals, and
//! the durable queue of every network sink (`prometheus_remote_write`, `influxdb`).
//!
//! A network sink is three parts: its routing rules (applied before queueing), its disk
//! queue ([`queue`]), and a [`driver`] task that drains the queue into the database. Taking a
//! batch means appending it to the queue, so a database that is down never delays the
//! agents' acks, and a restart of the aggregator loses nothing that was acked.

pub mod driver;
pub mod file;
pub mod http_client;
pub mod influxdb;
pub mod metrics;
#[cfg(test)]
mod mock;
pub mod prometheus_remote_write;
pub mod queue;
pub mod routing;

use std::borrow::Cow;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use picket_core::codec::BatchEncoder;
use picket_core::model::{Family, Labels, now_ms};
use picket_proto::v1;
use prost::Message;

use crate::config::{NetworkSettings, SinkConfig};
use crate::store::LatestStore;
use driver::{Destination, Driver};
use file::{FileSink, FileSinkError};
use metrics::{SinkMetrics, outcome};
use queue::{Queue, QueueError};
use routing::RoutingConfig;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    File(#[from] FileSinkError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("sink {name}: {source}")]
    Client {
        name: String,
        source: http_client::ClientError,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

/// A network sink as the ingest path sees it: routing in front of a queue.
struct NetworkSink {
    name: String,
    routing: RoutingConfig,
    queue: Arc<Queue>,
    metrics: Arc<SinkMetrics>,
}

pub struct Sinks {
    pub latest: LatestStore,
    files: Vec<Mutex<FileSink>>,
    network: Vec<NetworkSink>,
    /// False while the last delivery failed; `/readyz` reports it.
    healthy: AtomicBool,
}

impl Sinks {
    /// Opens every sink and starts the network sinks' drivers (call inside the runtime).
    pub fn open(
        configs: &[SinkConfig],
        latest: LatestStore,
        queue_directory: &Path,
    ) -> Result<Self, SinkError> {
        let mut files = Vec::new();
        let mut network = Vec::new();
        for config in configs {
            match config {
                SinkConfig::File { path, fsync } => {
                    files.push(Mutex::new(FileSink::open(path, *fsync)?));
                }
                SinkConfig::PrometheusRemoteWrite(c) => network.push(open_network(
                    queue_directory,
                    "prometheus_remote_write",
                    config,
                    |metrics| prometheus_remote_write::RemoteWrite::new(c, metrics),
                )?),
                SinkConfig::Influxdb(c) => network.push(open_network(
                    queue_directory,
                    "influxdb",
                    config,
                    |metrics| influxdb::Influx::new(c, metrics),
                )?),
            }
        }
        Ok(Sinks {
            latest,
            files,
            network,
            healthy: AtomicBool::new(true),
        })
    }

    /// True when this batch is already in every durable sink (it was written before an
    /// aggregator restart, and the agent resends it because the ack never reached it). Takes
    /// the sinks' locks, which a slow disk can hold: call it from a blocking context.
    ///
    /// Network sinks do not remember batches: a resend is queued again and overwrites the
    /// same points in the database (same timestamps), so only file journals answer here.
    pub fn already_delivered(&self, agent: &str, session: u64, sequence: u64) -> bool {
        !self.files.is_empty()
            && self.network.is_empty()
            && self
                .files
                .iter()
                .all(|f| lock(f).has(agent, session, sequence))
    }

    /// Hands a batch to every sink; `Ok` means all of them have it. Blocking (file I/O): call
    /// it from a blocking context.
    ///
    /// `wire` is the batch as the agent sent it, when `families` is exactly its decoding: a
    /// sink without routing rules then queues those bytes as they are instead of encoding
    /// the families again (the queue holds `picket.v1.Batch` records either way).
    pub fn deliver(
        &self,
        agent: &str,
        session: u64,
        sequence: u64,
        families: &[Family],
        wire: Option<&v1::Batch>,
    ) -> Result<(), SinkError> {
        // Routing and encoding first, so a full `block` queue refuses the batch before any
        // other sink took it.
        let mut encoded = Vec::with_capacity(self.network.len());
        // Encoded at most once, for every sink that passes the batch through unchanged.
        let mut as_sent: Option<Rc<Vec<u8>>> = None;
        for sink in &self.network {
            let (routed, filtered) = sink.routing.apply(families);
            sink.metrics.samples(outcome::FILTERED, filtered as u64);
            let (payload, samples) = match (&routed, wire) {
                (Cow::Borrowed(_), Some(wire)) => {
                    let samples: usize = families.iter().map(Family::sample_count).sum();
                    let payload = (samples > 0).then(|| {
                        as_sent
                            .get_or_insert_with(|| Rc::new(wire.encode_to_vec()))
                            .clone()
                    });
                    (payload, samples)
                }
                _ => {
                    let mut encoder = BatchEncoder::new(&Labels::new());
                    for family in routed.iter() {
                        encoder.push(family);
                    }
                    let samples = encoder.sample_count();
                    let payload =
                        (!encoder.is_empty()).then(|| Rc::new(encoder.finish(0).encode_to_vec()));
                    (payload, samples)
                }
            };
            if let Some(p) = &payload
                && sink.queue.would_block(p.len())
            {
                self.healthy.store(false, Ordering::Relaxed);
                return Err(sink.queue.full_error().into());
            }
            encoded.push((payload, samples));
        }
        for file in &self.files {
            if let Err(e) = lock(file).write_batch(agent, session, sequence, families) {
                self.healthy.store(false, Ordering::Relaxed);
                return Err(e.into());
            }
        }
        let shard_key = shard_key(agent);
        for (sink, (payload, samples)) in self.network.iter().zip(encoded) {
            let Some(payload) = payload else { continue };
            let samples = u32::try_from(samples).unwrap_or(u32::MAX);
            match sink.queue.append(&payload, samples, shard_key) {
                Ok(appended) => {
                    sink.metrics.samples(outcome::QUEUED, u64::from(samples));
                    sink.metrics
                        .samples(outcome::DROPPED_QUEUE_FULL, appended.dropped_samples);
                }
                Err(e) => {
                    tracing::error!(sink = %sink.name, error = %e, "cannot queue a batch");
                    self.healthy.store(false, Ordering::Relaxed);
                    return Err(e.into());
                }
            }
        }
        self.healthy.store(true, Ordering::Relaxed);
        self.latest.apply(families);
        Ok(())
    }

    /// The network sinks' own metrics.
    pub fn families(&self) -> Vec<Family> {
        let ts = now_ms();
        let mut out: Vec<Family> = Vec::new();
        for sink in &self.network {
            for family in sink.metrics.families(sink.queue.depth(), ts) {
                match out.iter_mut().find(|f| f.name == family.name) {
                    Some(existing) => existing.points.extend(family.points),
                    None => out.push(family),
                }
            }
        }
        out
    }
}

/// Opens a network sink's queue, builds its destination and starts its driver.
fn open_network<D: Destination>(
    queue_directory: &Path,
    kind: &'static str,
    config: &SinkConfig,
    destination: impl FnOnce(Arc<SinkMetrics>) -> Result<D, http_client::ClientError>,
) -> Result<NetworkSink, SinkError> {
    let Some(NetworkSettings {
        name,
        queue,
        routing,
        batch,
        retry,
        concurrency,
        ..
    }) = config.network()
    else {
        return Err(SinkError::Internal(format!("{kind}: not a network sink")));
    };
    let metrics = Arc::new(SinkMetrics::new(name, kind));
    let destination = destination(metrics.clone()).map_err(|source| SinkError::Client {
        name: name.to_owned(),
        source,
    })?;
    let queue = Arc::new(Queue::open(&queue_directory.join(name), queue.clone())?);
    start_driver(
        name,
        &queue,
        &metrics,
        destination,
        batch.clone(),
        retry.clone(),
        concurrency,
    );
    Ok(NetworkSink {
        name: name.to_owned(),
        routing: routing.clone(),
        queue,
        metrics,
    })
}

fn start_driver<D: Destination>(
    name: &str,
    queue: &Arc<Queue>,
    metrics: &Arc<SinkMetrics>,
    destination: D,
    batch: driver::BatchConfig,
    retry: driver::RetryConfig,
    concurrency: usize,
) {
    let driver = Driver {
        name: name.to_owned(),
        queue: queue.clone(),
        metrics: metrics.clone(),
        destination: Arc::new(destination),
        batch,
        retry,
        concurrency,
    };
    tokio::spawn(driver.run());
}

/// Spreads agents over a sink's concurrent workers; stable across restarts (FNV-1a), so an
/// agent's queued batches keep their order after one.
fn shard_key(agent: &str) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for b in agent.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
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
        let sinks = Sinks::open(
            &config,
            LatestStore::new(Duration::from_secs(60)),
            dir.path(),
        )
        .unwrap();
        let mut family = Family::new("m", MetricType::Gauge, "");
        family.push(Labels::from_pairs([("instance", "pi")]), 1000, 1.0);
        sinks
            .deliver("pi", 1, 1, std::slice::from_ref(&family), None)
            .unwrap();
        assert!(sinks.healthy());
        let len = std::fs::metadata(&path).unwrap().len();

        lock(&sinks.files[0]).fail_writes_for_test();
        assert!(
            sinks
                .deliver("pi", 1, 2, std::slice::from_ref(&family), None)
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

//! Where accepted batches go. A batch is acknowledged to its agent only after every sink here
//! has taken it: the latest-sample store behind `/metrics` (unless `exposition.enabled =
//! false`), `file` journals, and the durable queue of every network sink
//! (`prometheus_remote_write`, `influxdb`).
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use picket_core::codec::BatchEncoder;
use picket_core::model::{Family, Labels, now_ms};
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
    /// A file sink fsyncs every batch, so delivering waits for the disk.
    syncs_each_batch: bool,
    write_pace: WritePace,
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
        let syncs_each_batch = configs
            .iter()
            .any(|c| matches!(c, SinkConfig::File { fsync: true, .. }));
        Ok(Sinks {
            latest,
            files,
            syncs_each_batch,
            write_pace: WritePace::new(),
            network,
            healthy: AtomicBool::new(true),
        })
    }

    /// True when this batch is already in every durable sink (it was written before an
    /// aggregator restart, and the agent resends it because the ack never reached it). Takes
    /// the sinks' locks, which a slow disk can hold: with [`Sinks::syncs_each_batch`], call
    /// it from a blocking context.
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

    /// Whether delivering a batch waits for the disk: a `file` sink has `fsync = true`.
    pub fn syncs_each_batch(&self) -> bool {
        self.syncs_each_batch
    }

    /// Whether delivering a batch may wait for the disk now, so the caller should move it
    /// off its async worker: a `file` sink fsyncs each batch, or a recent delivery's writes
    /// were slow (the kernel throttles writers when the disk falls behind). Otherwise the
    /// writes only reach the page cache, too quick to be worth moving.
    pub fn delivery_may_block(&self) -> bool {
        self.syncs_each_batch || self.write_pace.slow_at(Instant::now())
    }

    /// Whether delivering needs a batch's decoded families: for a file sink or a sink's
    /// routing rules. When nothing does, ingest only validates a batch (in place, or only its
    /// points when its skeleton is the stream's known one), hands its bytes to
    /// [`Sinks::deliver_wire`] and applies it to the latest store itself.
    pub fn needs_families(&self) -> bool {
        !self.files.is_empty() || self.network.iter().any(|s| !s.routing.is_identity())
    }

    /// Hands a batch to every sink; `Ok` means all of them have it. Writes files: with
    /// [`Sinks::syncs_each_batch`] it waits for the disk, so call it from a blocking context.
    ///
    /// `wire` is the encoded `picket.v1.Batch` as the agent sent it, when `families` is
    /// exactly its decoding: a sink without routing rules then queues those bytes as they
    /// are instead of encoding the families again (the queue holds `picket.v1.Batch`
    /// records either way).
    pub fn deliver(
        &self,
        agent: &str,
        session: u64,
        sequence: u64,
        families: &[Family],
        wire: Option<&[u8]>,
    ) -> Result<(), SinkError> {
        self.deliver_content(
            agent,
            session,
            sequence,
            Content::Decoded { families, wire },
        )
    }

    /// Like [`Sinks::deliver`] for a batch that was only validated: `wire` is the encoded
    /// `picket.v1.Batch` as received, which passed ingest's validation, and
    /// `samples` its sample count. Network sinks queue the bytes as they are; the caller
    /// applies the batch to the latest store (`LatestStore::apply_flat` or `apply_points`),
    /// once this returned `Ok`. Only for when [`Sinks::needs_families`] is false.
    pub fn deliver_wire(
        &self,
        agent: &str,
        session: u64,
        sequence: u64,
        wire: &[u8],
        samples: usize,
    ) -> Result<(), SinkError> {
        if !self.files.is_empty() || self.network.iter().any(|s| !s.routing.is_identity()) {
            return Err(SinkError::Internal(
                "a batch reached the sinks undecoded although a file sink or routing rules need its samples".to_owned(),
            ));
        }
        self.deliver_content(agent, session, sequence, Content::Wire { wire, samples })
    }

    fn deliver_content(
        &self,
        agent: &str,
        session: u64,
        sequence: u64,
        content: Content<'_>,
    ) -> Result<(), SinkError> {
        let mut encoded: Vec<(Option<Cow<'_, [u8]>>, usize)> =
            Vec::with_capacity(self.network.len());
        let queue_as_sent =
            |wire, samples: usize| ((samples > 0).then_some(Cow::Borrowed(wire)), samples);
        for sink in &self.network {
            let (payload, samples) = match content {
                Content::Wire { wire, samples, .. } => queue_as_sent(wire, samples),
                Content::Decoded { families, wire } => {
                    let (routed, filtered) = sink.routing.apply(families);
                    sink.metrics.samples(outcome::FILTERED, filtered as u64);
                    match (&routed, wire) {
                        (Cow::Borrowed(_), Some(wire)) => {
                            queue_as_sent(wire, families.iter().map(Family::sample_count).sum())
                        }
                        _ => {
                            let mut encoder = BatchEncoder::new(&Labels::new());
                            for family in routed.iter() {
                                encoder.push(family);
                            }
                            let samples = encoder.sample_count();
                            let payload = (!encoder.is_empty())
                                .then(|| Cow::Owned(encoder.finish(0).encode_to_vec()));
                            (payload, samples)
                        }
                    }
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
        let writes_started = Instant::now();
        let written = self.write(agent, session, sequence, content, encoded);
        self.write_pace
            .record_at(writes_started.elapsed(), Instant::now());
        written?;
        self.healthy.store(true, Ordering::Relaxed);
        match content {
            Content::Decoded { families, .. } => self.latest.apply(families),
            // Ingest applies these itself, by the stream's route (`LatestStore::apply_points`).
            Content::Wire { .. } => {}
        }
        Ok(())
    }

    /// The disk part of [`Sinks::deliver_content`]: journals, then queues.
    fn write(
        &self,
        agent: &str,
        session: u64,
        sequence: u64,
        content: Content<'_>,
        encoded: Vec<(Option<Cow<'_, [u8]>>, usize)>,
    ) -> Result<(), SinkError> {
        if let Content::Decoded { families, .. } = content {
            for file in &self.files {
                if let Err(e) = lock(file).write_batch(agent, session, sequence, families) {
                    self.healthy.store(false, Ordering::Relaxed);
                    return Err(e.into());
                }
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
        Ok(())
    }

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

/// Writes slower than this mean the disk is falling behind: the kernel has started to
/// throttle writers, or a lock is held across disk I/O. Wall-clock time also counts waiting
/// for a CPU, so the bound sits well above what a busy 2-core machine's scheduler adds: at
/// 10 ms the relay benchmark, run beside a build, kept falling back and used 3x the memory.
const SLOW_WRITES: Duration = Duration::from_millis(100);
/// How long after slow writes deliveries stay off the async workers.
const SLOW_WRITES_HOLD: Duration = Duration::from_secs(10);

/// Remembers when the sinks' writes were last slow.
struct WritePace {
    since: Instant,
    /// Milliseconds after `since` until which writes count as slow.
    slow_until_ms: AtomicU64,
}

impl WritePace {
    fn new() -> Self {
        WritePace {
            since: Instant::now(),
            slow_until_ms: AtomicU64::new(0),
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.since).as_millis()).unwrap_or(u64::MAX)
    }

    fn record_at(&self, took: Duration, now: Instant) {
        if took > SLOW_WRITES {
            let until = self.millis(now + SLOW_WRITES_HOLD);
            self.slow_until_ms.fetch_max(until, Ordering::Relaxed);
        }
    }

    fn slow_at(&self, now: Instant) -> bool {
        self.millis(now) < self.slow_until_ms.load(Ordering::Relaxed)
    }
}

/// A batch as ingest hands it to [`Sinks`].
#[derive(Clone, Copy)]
enum Content<'a> {
    Decoded {
        families: &'a [Family],
        /// The encoded batch as received, when `families` is exactly its decoding.
        wire: Option<&'a [u8]>,
    },
    /// An encoded batch as received, validated but not decoded.
    Wire { wire: &'a [u8], samples: usize },
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
        read_ahead: driver::ReadAhead::default(),
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

    #[test]
    fn slow_writes_move_deliveries_off_the_workers_for_a_while() {
        let pace = WritePace::new();
        let start = Instant::now();
        pace.record_at(Duration::from_millis(20), start);
        assert!(!pace.slow_at(start), "fast writes stay on the worker");
        pace.record_at(Duration::from_millis(150), start);
        assert!(pace.slow_at(start + Duration::from_secs(9)));
        // A fast write does not end the hold early; the hold ends by itself.
        pace.record_at(Duration::from_millis(1), start + Duration::from_secs(5));
        assert!(pace.slow_at(start + Duration::from_secs(9)));
        assert!(!pace.slow_at(start + SLOW_WRITES_HOLD + Duration::from_secs(1)));
    }

    #[test]
    fn only_a_file_sink_that_fsyncs_makes_delivery_wait_for_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, fsync: bool| SinkConfig::File {
            path: dir.path().join(name),
            fsync,
        };
        let open = |configs: &[SinkConfig]| {
            Sinks::open(
                configs,
                LatestStore::new(Duration::from_secs(60)),
                dir.path(),
            )
            .unwrap()
            .syncs_each_batch()
        };
        assert!(!open(&[]));
        assert!(!open(&[file("a", false)]));
        assert!(open(&[file("a", false), file("b", true)]));
    }

    #[tokio::test]
    async fn only_routing_rules_or_files_need_decoded_batches() {
        let dir = tempfile::tempdir().unwrap();
        let remote_write = |extra: &str| {
            let text = format!(
                "type = \"prometheus_remote_write\"\nname = \"rw\"\nurl = \"http://127.0.0.1:9/w\"\n{extra}"
            );
            picket_core::config::parse::<SinkConfig>("s.toml", &text).unwrap()
        };
        let open = |configs: &[SinkConfig], store: bool, name: &str| {
            let latest = LatestStore::new(Duration::from_secs(60));
            latest.set_enabled(store);
            Sinks::open(configs, latest, &dir.path().join(name)).unwrap()
        };
        let relay = open(&[remote_write("")], false, "relay");
        assert!(!relay.needs_families());
        let stored = open(&[remote_write("")], true, "store");
        assert!(!stored.needs_families());
        let routed = open(
            &[remote_write("[routing]\ndrop_metrics = [\"m\"]\n")],
            false,
            "routed",
        );
        assert!(routed.needs_families());

        let mut family = Family::new("m", MetricType::Gauge, "");
        family.push(Labels::from_pairs([("instance", "pi")]), 1000, 1.0);
        let mut encoder = BatchEncoder::new(&Labels::new());
        encoder.push(&family);
        let wire = encoder.finish(1).encode_to_vec();
        let batch = picket_proto::v1::read_received_batch(&wire).unwrap();
        relay.deliver_wire("pi", 1, 1, &wire, 1).unwrap();
        assert_eq!(relay.network[0].queue.depth().samples, 1);
        stored.deliver_wire("pi", 1, 1, &wire, 1).unwrap();
        assert_eq!(stored.network[0].queue.depth().samples, 1);
        // Ingest applies it to the store, read in place: same series as from its decoding.
        let mut route = crate::store::StoreRoute::default();
        relay.latest.apply_flat(&batch, &mut route);
        assert_eq!(relay.latest.series_count(), 0);
        stored.latest.apply_flat(&batch, &mut route);
        assert_eq!(stored.latest.snapshot(), vec![family.clone()]);
        // A sink that must see the samples refuses an undecoded batch instead of skipping
        // its rules.
        assert!(matches!(
            routed.deliver_wire("pi", 1, 1, &wire, 1),
            Err(SinkError::Internal(_))
        ));
        assert_eq!(routed.network[0].queue.depth().samples, 0);
    }
}

//! Moves one network sink's queue into its database: reads records in order, batches them
//! into requests, sends up to `concurrency` requests at once, retries what the database
//! could not take yet, and commits the queue's cursor as records finish in order.
//!
//! Order matters to Prometheus (samples of a series must arrive in time order), so records
//! are spread over the concurrent workers by their shard key, the agent's name: one agent's
//! batches always go through the same worker, one request at a time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use picket_core::codec::DecodeError;
use picket_proto::v1;
use prost::Message;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::metrics::{SinkMetrics, outcome};
use super::queue::{Position, Queue, Record};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most samples in one request.
    pub max_samples: usize,
    /// How long to wait for more data before sending a request that is not full. Zero
    /// sends whatever is queued at once (under load, requests fill up by themselves while
    /// the previous one is in flight).
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_samples: 10_000,
            max_delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First wait after a failed request; doubled on each further failure.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured; a server asking for more is retried after this.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

/// What a request achieved, when the database answered in a way that ends it.
#[derive(Debug, Default, PartialEq)]
pub struct Delivered {
    pub sent: u64,
    /// Samples the database refused or the encoding could not carry, by outcome.
    pub dropped: Vec<(&'static str, u64)>,
}

impl Delivered {
    pub fn add(&mut self, other: Delivered) {
        self.sent += other.sent;
        self.dropped.extend(other.dropped);
    }
}

/// The database could not take the request now; send it again later.
#[derive(Debug)]
pub struct Retry {
    /// For `picket_sink_retries_total{reason}`: the HTTP status, `transport` or `timeout`.
    pub reason: String,
    pub detail: String,
    pub after: Option<Duration>,
}

/// A database a sink writes to.
pub trait Destination: Send + Sync + 'static {
    /// One queue record in the form this destination encodes from: decoded families for
    /// InfluxDB, the wire batch itself for remote write (which transcodes it directly).
    type Record: Send + Sync + 'static;

    /// Turns a batch read back from the queue into a record; an error drops the record
    /// (logged and counted as corrupt).
    fn read(&self, batch: v1::Batch) -> Result<Self::Record, DecodeError>;

    /// Sends several queue records as one request (or more, when the destination has to
    /// split it).
    fn send(
        &self,
        records: &[Self::Record],
    ) -> impl Future<Output = Result<Delivered, Retry>> + Send;
}

pub struct Driver<D> {
    pub name: String,
    pub queue: Arc<Queue>,
    pub metrics: Arc<SinkMetrics>,
    pub destination: Arc<D>,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    pub concurrency: usize,
}

/// Bytes of records read ahead of delivery, per worker.
const READ_AHEAD_BYTES: usize = 32 * 1024 * 1024;

impl<D: Destination> Driver<D> {
    /// Runs until the process ends. Nothing needs flushing on shutdown: the queue holds
    /// everything not yet committed.
    pub async fn run(self) {
        let concurrency = self.concurrency.max(1);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Vec<u64>>();
        let mut workers = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            let (tx, rx) = mpsc::unbounded_channel::<(u64, Record)>();
            workers.push(tx);
            let worker = Worker {
                name: self.name.clone(),
                metrics: self.metrics.clone(),
                destination: self.destination.clone(),
                batch: self.batch.clone(),
                retry: self.retry.clone(),
                done: done_tx.clone(),
            };
            tokio::spawn(worker.run(rx));
        }
        let sync_queue = self.queue.clone();
        let syncer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(sync_queue.fsync_interval());
            loop {
                tick.tick().await;
                let queue = sync_queue.clone();
                let _ = tokio::task::spawn_blocking(move || queue.sync()).await;
            }
        });

        // Records handed to workers, oldest first: (id, end, samples, bytes, done).
        let mut in_flight: VecDeque<(u64, Position, u32, usize, bool)> = VecDeque::new();
        let mut in_flight_bytes = 0usize;
        let mut next_id = 0u64;
        let read_ahead = READ_AHEAD_BYTES * concurrency;
        let queue = self.queue.clone();
        let mut reader = queue.reader();
        loop {
            tokio::select! {
                // The read itself is synchronous file I/O. Records are read moments after
                // they were appended, so they come from the page cache; a read that does
                // reach a slow disk holds up this sink's dispatcher alone.
                record = reader.next(), if in_flight_bytes < read_ahead => {
                    let record = match record {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(sink = %self.name, error = %e, "cannot read the sink queue; retrying in 1s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    let id = next_id;
                    next_id += 1;
                    let bytes = record.payload.len();
                    in_flight_bytes += bytes;
                    in_flight.push_back((id, record.end, record.samples, bytes, false));
                    let worker = (record.shard_key % concurrency as u64) as usize;
                    if workers[worker].send((id, record)).is_err() {
                        tracing::error!(sink = %self.name, "a sink worker stopped; the sink stops");
                        break;
                    }
                }
                done = done_rx.recv() => {
                    let Some(done) = done else { break };
                    for id in done {
                        if let Some(first) = in_flight.front().map(|r| r.0) {
                            let index = id.wrapping_sub(first) as usize;
                            if let Some(entry) = in_flight.get_mut(index) {
                                entry.4 = true;
                            }
                        }
                    }
                    let mut committed = Vec::new();
                    while in_flight.front().is_some_and(|r| r.4) {
                        if let Some((_, end, samples, bytes, _)) = in_flight.pop_front() {
                            in_flight_bytes -= bytes;
                            committed.push((end, samples));
                        }
                    }
                    if !committed.is_empty() {
                        let queue = queue.clone();
                        let name = self.name.clone();
                        let result = tokio::task::spawn_blocking(move || queue.commit(&committed)).await;
                        if let Ok(Err(e)) = result {
                            // Delivery went through; only the restart point is stale, which
                            // means a resend (absorbed by the database) after a restart.
                            tracing::warn!(sink = %name, error = %e, "cannot save the sink queue's cursor");
                        }
                    }
                }
            }
        }
        syncer.abort();
    }
}

struct Worker<D> {
    name: String,
    metrics: Arc<SinkMetrics>,
    destination: Arc<D>,
    batch: BatchConfig,
    retry: RetryConfig,
    done: mpsc::UnboundedSender<Vec<u64>>,
}

impl<D: Destination> Worker<D> {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<(u64, Record)>) {
        while let Some(first) = rx.recv().await {
            let mut ids = vec![first.0];
            let mut samples = first.1.samples as usize;
            let mut records = vec![first.1];
            let deadline = tokio::time::Instant::now() + self.batch.max_delay;
            while samples < self.batch.max_samples {
                let next = match rx.try_recv() {
                    Ok(next) => next,
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if self.batch.max_delay.is_zero() {
                            break;
                        }
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(next)) => next,
                            _ => break,
                        }
                    }
                };
                ids.push(next.0);
                samples += next.1.samples as usize;
                records.push(next.1);
            }
            let families = self.decode(records);
            self.deliver(&families).await;
            if self.done.send(ids).is_err() {
                return;
            }
        }
    }

    fn decode(&self, records: Vec<Record>) -> Vec<D::Record> {
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            let decoded = v1::Batch::decode(record.payload.as_slice())
                .map_err(|e| e.to_string())
                .and_then(|b| self.destination.read(b).map_err(|e| e.to_string()));
            match decoded {
                Ok(decoded) => out.push(decoded),
                Err(e) => {
                    // The checksum passed, so this is a bug or a disk that lies; losing the
                    // record is counted rather than blocking the queue forever.
                    tracing::error!(sink = %self.name, error = %e, "undecodable record in the sink queue; skipped");
                    self.metrics
                        .samples(outcome::DROPPED_CORRUPT, u64::from(record.samples));
                }
            }
        }
        out
    }

    /// Sends until the database has answered for every sample; only the process ending
    /// stops it (the data stays queued on disk meanwhile).
    async fn deliver(&self, records: &[D::Record]) {
        let mut backoff = self.retry.initial_backoff;
        let mut failing_since: Option<Instant> = None;
        loop {
            match self.destination.send(records).await {
                Ok(delivered) => {
                    self.metrics.samples(outcome::SENT, delivered.sent);
                    for (why, n) in delivered.dropped {
                        self.metrics.samples(why, n);
                    }
                    if let Some(since) = failing_since {
                        tracing::info!(sink = %self.name, after = ?since.elapsed(), "sink recovered");
                    }
                    return;
                }
                Err(retry) => {
                    self.metrics.retry(&retry.reason);
                    let wait = match retry.after {
                        Some(after) => after.min(self.retry.max_retry_after),
                        None => jittered(backoff),
                    };
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(sink = %self.name, reason = %retry.reason, detail = %retry.detail,
                            "sink write failed; the data stays queued and is retried");
                    } else {
                        tracing::debug!(sink = %self.name, reason = %retry.reason, detail = %retry.detail, ?wait, "retrying");
                    }
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
            }
        }
    }
}

/// Up to a quarter less than `d`, so sinks that failed together do not retry in lockstep.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(1.0 - fastrand::f64() * 0.25)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::queue::QueueConfig;
    use picket_core::codec::{BatchEncoder, decode_batch};
    use picket_core::model::{Family, Labels, MetricType};
    use std::sync::Mutex;

    /// Fails the first `failures` sends with a `Retry-After`, then records what it gets.
    struct Flaky {
        failures: Mutex<u32>,
        got: Mutex<Vec<i64>>,
    }

    impl Destination for Flaky {
        type Record = Vec<Family>;

        fn read(&self, batch: v1::Batch) -> Result<Vec<Family>, DecodeError> {
            Ok(decode_batch(&batch)?.families)
        }

        async fn send(&self, records: &[Vec<Family>]) -> Result<Delivered, Retry> {
            {
                let mut failures = self.failures.lock().unwrap();
                if *failures > 0 {
                    *failures -= 1;
                    return Err(Retry {
                        reason: "503".into(),
                        detail: String::new(),
                        after: Some(Duration::from_millis(50)),
                    });
                }
            }
            let mut got = self.got.lock().unwrap();
            let mut sent = 0;
            for family in records.iter().flatten() {
                for p in &family.points {
                    got.push(p.timestamp_ms);
                    sent += 1;
                }
            }
            Ok(Delivered {
                sent,
                dropped: Vec::new(),
            })
        }
    }

    /// Runs a driver over `queue` into a [`Flaky`] destination that fails `failures` times,
    /// until the queue is empty (at most 20 s).
    async fn drain(
        queue: &Arc<Queue>,
        failures: u32,
        batch: BatchConfig,
        concurrency: usize,
    ) -> (Arc<SinkMetrics>, Arc<Flaky>) {
        let metrics = Arc::new(SinkMetrics::new("t", "test"));
        let destination = Arc::new(Flaky {
            failures: Mutex::new(failures),
            got: Mutex::new(Vec::new()),
        });
        let driver = Driver {
            name: "t".into(),
            queue: queue.clone(),
            metrics: metrics.clone(),
            destination: destination.clone(),
            batch,
            retry: RetryConfig::default(),
            concurrency,
        };
        let task = tokio::spawn(driver.run());
        let drained = tokio::time::timeout(Duration::from_secs(20), async {
            while queue.depth().samples > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        task.abort();
        assert!(drained.is_ok(), "queue never drained: {:?}", queue.depth());
        (metrics, destination)
    }

    fn payload(agent: &str, ts: i64) -> Vec<u8> {
        let mut f = Family::new("m", MetricType::Gauge, "");
        f.push(Labels::from_pairs([("instance", agent)]), ts, 1.0);
        let mut e = BatchEncoder::new(&Labels::new());
        e.push(&f);
        e.finish(0).encode_to_vec()
    }

    #[tokio::test]
    async fn retries_until_delivered_then_commits_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(Queue::open(dir.path(), QueueConfig::default()).unwrap());
        for ts in 1..=20 {
            let agent = if ts % 2 == 0 { "even" } else { "odd" };
            queue.append(&payload(agent, ts), 1, ts as u64 % 2).unwrap();
        }
        let batch = BatchConfig {
            max_samples: 3,
            max_delay: Duration::ZERO,
        };
        let (metrics, destination) = drain(&queue, 3, batch, 2).await;
        let got = destination.got.lock().unwrap().clone();
        assert_eq!(got.len(), 20, "every sample once: {got:?}");
        // Per agent (shard), time order is kept.
        for parity in [0, 1] {
            let series: Vec<_> = got.iter().filter(|t| *t % 2 == parity).collect();
            assert!(series.windows(2).all(|w| w[0] < w[1]), "{series:?}");
        }
        assert_eq!(metrics.sample_count(outcome::SENT), 20);
        // Nothing is resent after a restart: the cursor is committed.
        let reopened = Queue::open(dir.path(), QueueConfig::default()).unwrap();
        assert_eq!(reopened.depth().samples, 0);
    }

    #[tokio::test]
    async fn records_the_destination_cannot_read_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(Queue::open(dir.path(), QueueConfig::default()).unwrap());
        queue.append(&payload("a", 1), 1, 0).unwrap();
        // Not protobuf at all, then a well-formed message the destination refuses.
        queue.append(&[0xff, 0xff, 0xff], 3, 0).unwrap();
        let mut bad = v1::Batch::decode(payload("a", 2).as_slice()).unwrap();
        bad.families[0].name = 999;
        queue.append(&bad.encode_to_vec(), 5, 0).unwrap();
        queue.append(&payload("a", 3), 1, 0).unwrap();
        let (metrics, destination) = drain(&queue, 0, BatchConfig::default(), 1).await;
        assert_eq!(*destination.got.lock().unwrap(), vec![1, 3]);
        assert_eq!(metrics.sample_count(outcome::SENT), 2);
        assert_eq!(metrics.sample_count(outcome::DROPPED_CORRUPT), 8);
    }
}

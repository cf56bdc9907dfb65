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

use picket_core::codec::{DecodeError, decode_flat_batch};
use picket_core::model::Family;
use picket_proto::v1;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::metrics::{SinkMetrics, outcome};
use super::queue::{Position, Queue, Reader, Record, RecordHeader};

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
    /// InfluxDB; for remote write, which reads it when it encodes a request (how far depends
    /// on its label cache), the record's bytes and sample count.
    type Record<'a>: Send + Sync;

    /// Reads a record: its payload (a `picket.v1.Batch` as the agent sent it, or as ingest
    /// encoded it), with its sample count and shard key (the sending agent's) as queued. An
    /// error drops the record (logged and counted as corrupt). A destination that reads
    /// records only when it sends them reports those it then cannot read in
    /// [`Delivered::dropped`].
    fn read<'a>(&self, record: &'a Record) -> Result<Self::Record<'a>, RecordError>;

    /// Sends several queue records as one request (or more, when the destination has to
    /// split it). `lane` is the worker's (`0..concurrency`): an agent's records always go
    /// through the same lane, one request at a time, so per-lane state sees each agent's
    /// batches in order and needs no sharing.
    fn send(
        &self,
        lane: usize,
        records: &[Self::Record<'_>],
    ) -> impl Future<Output = Result<Delivered, Retry>> + Send;
}

/// Why a queue record could not be read back. The queue's checksum passed, so either is a
/// bug or a disk that lies.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("not a picket.v1.Batch: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error(transparent)]
    Invalid(#[from] DecodeError),
}

/// A record's payload decoded into families, for destinations that encode from the model.
pub fn read_families(payload: &[u8]) -> Result<Vec<Family>, RecordError> {
    let batch = v1::read_received_batch(payload)?;
    Ok(decode_flat_batch(&batch)?.families)
}

pub struct Driver<D> {
    pub name: String,
    pub queue: Arc<Queue>,
    pub metrics: Arc<SinkMetrics>,
    pub destination: Arc<D>,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    pub concurrency: usize,
    pub read_ahead: ReadAhead,
}

/// How far the dispatcher reads ahead of delivery. Two bounds, because memory and order
/// are different limits: a worker that is retrying must neither hold much memory nor stop
/// the other workers before the ordering window is used up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadAhead {
    /// Bytes of records read into memory and not yet delivered, per worker (checked before
    /// a record is handed over, so a worker may hold one record more). A worker at this
    /// bound gets its next records later, read again from the queue.
    pub memory_bytes: usize,
    /// Bytes of records read and not yet committed, times the number of workers, for all of
    /// them together. The queue commits in order, so this is how much later data the other
    /// workers may deliver while the oldest record is still being retried (and how much a
    /// restart may resend).
    pub window_bytes: usize,
    /// The same window in records, so that tiny records cannot pile up bookkeeping.
    pub window_records: usize,
}

impl Default for ReadAhead {
    fn default() -> Self {
        ReadAhead {
            // A full request (10,000 samples) is a few hundred KiB of records: this keeps
            // the next requests ready while one is in flight.
            memory_bytes: 4 * 1024 * 1024,
            window_bytes: 32 * 1024 * 1024,
            window_records: 65_536,
        }
    }
}

/// Where a record read from the queue is, between the reader and the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Passed over because its worker was at its memory bound: only the header is kept.
    Parked,
    /// In its worker's hands (its channel or a request).
    Sent,
    /// Delivered (or counted as dropped); waits for the records before it.
    Done,
}

struct InFlight {
    header: RecordHeader,
    lane: usize,
    stage: Stage,
}

/// One worker as the dispatcher sees it.
struct Lane {
    tx: mpsc::UnboundedSender<(u64, Record)>,
    /// Payload bytes sent to the worker and not yet delivered.
    undelivered: usize,
    /// Records passed over for this worker, oldest first, by id.
    parked: VecDeque<u64>,
}

/// The dispatcher's books: records from the oldest uncommitted one to the newest read.
struct Window<'q> {
    name: String,
    metrics: Arc<SinkMetrics>,
    limits: ReadAhead,
    reader: Reader<'q>,
    lanes: Vec<Lane>,
    records: VecDeque<InFlight>,
    /// Id of `records[0]`.
    first_id: u64,
    bytes: usize,
    /// Reading a parked record back failed: when [`Window::retry_reads`] is due.
    retry_reads_at: Option<tokio::time::Instant>,
}

impl Window<'_> {
    fn concurrency(&self) -> usize {
        self.lanes.len()
    }

    /// Whether another record may be read: the window has room, and some worker could take
    /// it now (otherwise reading would only park it).
    fn may_read(&self) -> bool {
        self.bytes < self.limits.window_bytes * self.concurrency()
            && self.records.len() < self.limits.window_records * self.concurrency()
            && self
                .lanes
                .iter()
                .any(|l| l.parked.is_empty() && l.undelivered < self.limits.memory_bytes)
    }

    /// Takes a header just read: sends the record to its worker, or parks it.
    fn admit(&mut self, header: RecordHeader) -> Result<(), Stopped> {
        let id = self.first_id + self.records.len() as u64;
        let lane = (header.shard_key % self.concurrency() as u64) as usize;
        self.bytes += header.len as usize;
        self.records.push_back(InFlight {
            header,
            lane,
            stage: Stage::Parked,
        });
        self.lanes[lane].parked.push_back(id);
        self.refill(lane)
    }

    /// Sends a worker its parked records, oldest first, while it is under its memory bound.
    fn refill(&mut self, lane: usize) -> Result<(), Stopped> {
        while self.lanes[lane].undelivered < self.limits.memory_bytes {
            let Some(&id) = self.lanes[lane].parked.front() else {
                break;
            };
            self.lanes[lane].parked.pop_front();
            let index = (id - self.first_id) as usize;
            let header = self.records[index].header;
            match self.reader.payload(&header) {
                Ok(payload) => {
                    self.records[index].stage = Stage::Sent;
                    self.lanes[lane].undelivered += payload.len();
                    self.metrics.read_ahead(payload.len() as i64);
                    let record = Record {
                        end: header.end,
                        samples: header.samples,
                        shard_key: header.shard_key,
                        payload,
                    };
                    if self.lanes[lane].tx.send((id, record)).is_err() {
                        tracing::error!(sink = %self.name, "a sink worker stopped; the sink stops");
                        return Err(Stopped);
                    }
                }
                Err(e) => {
                    // The record's segment is kept until it is committed, so the error is
                    // the system's (out of file handles, a failing disk): the record was
                    // acked, so it stays parked and is read again in a second.
                    if self.retry_reads_at.is_none() {
                        tracing::error!(sink = %self.name, error = %e, "cannot read a record back from the sink queue; retrying in 1s");
                        self.retry_reads_at =
                            Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                    self.lanes[lane].parked.push_front(id);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Tries again to send every lane its parked records, after a failed read.
    fn retry_reads(&mut self) -> Result<(), Stopped> {
        self.retry_reads_at = None;
        for lane in 0..self.concurrency() {
            self.refill(lane)?;
        }
        Ok(())
    }

    /// Marks records delivered, refills their workers, and returns what can be committed
    /// now (in order).
    fn finish(&mut self, ids: Vec<u64>) -> Result<Vec<(Position, u32)>, Stopped> {
        let mut lanes = Vec::new();
        for id in ids {
            let Some(entry) = id
                .checked_sub(self.first_id)
                .and_then(|i| self.records.get_mut(i as usize))
            else {
                continue;
            };
            if entry.stage == Stage::Sent {
                let bytes = entry.header.len as usize;
                self.lanes[entry.lane].undelivered -= bytes;
                self.metrics.read_ahead(-(bytes as i64));
                lanes.push(entry.lane);
            }
            entry.stage = Stage::Done;
        }
        lanes.sort_unstable();
        lanes.dedup();
        for lane in lanes {
            self.refill(lane)?;
        }
        let mut committed = Vec::new();
        while self.records.front().is_some_and(|r| r.stage == Stage::Done) {
            if let Some(done) = self.records.pop_front() {
                self.first_id += 1;
                self.bytes -= done.header.len as usize;
                committed.push((done.header.end, done.header.samples));
            }
        }
        Ok(committed)
    }
}

/// A worker's channel closed: the sink cannot go on.
struct Stopped;

impl<D: Destination> Driver<D> {
    /// Runs until the process ends. Nothing needs flushing on shutdown: the queue holds
    /// everything not yet committed.
    pub async fn run(self) {
        let concurrency = self.concurrency.max(1);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Vec<u64>>();
        let mut lanes = Vec::with_capacity(concurrency);
        for lane in 0..concurrency {
            let (tx, rx) = mpsc::unbounded_channel::<(u64, Record)>();
            lanes.push(Lane {
                tx,
                undelivered: 0,
                parked: VecDeque::new(),
            });
            let worker = Worker {
                lane,
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

        let queue = self.queue.clone();
        let mut window = Window {
            name: self.name.clone(),
            metrics: self.metrics.clone(),
            limits: self.read_ahead,
            reader: queue.reader(),
            lanes,
            records: VecDeque::new(),
            first_id: 0,
            bytes: 0,
            retry_reads_at: None,
        };
        loop {
            let may_read = window.may_read();
            tokio::select! {
                // The reads themselves are synchronous file I/O. Records are read moments
                // after they were appended, so they come from the page cache (records read
                // again after waiting for a busy worker may have left it); a read that does
                // reach a slow disk holds up this sink's dispatcher alone.
                header = window.reader.next_header(), if may_read => {
                    let header = match header {
                        Ok(h) => h,
                        Err(e) => {
                            tracing::error!(sink = %self.name, error = %e, "cannot read the sink queue; retrying in 1s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    if window.admit(header).is_err() {
                        break;
                    }
                }
                // The deadline is fixed when the read fails, so other events do not put
                // the retry off.
                _ = tokio::time::sleep_until(window.retry_reads_at.unwrap_or_else(tokio::time::Instant::now)),
                    if window.retry_reads_at.is_some() => {
                    if window.retry_reads().is_err() {
                        break;
                    }
                }
                done = done_rx.recv() => {
                    let Some(done) = done else { break };
                    let Ok(committed) = window.finish(done) else { break };
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
    lane: usize,
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
            let mut payloads = vec![first.1];
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
                payloads.push(next.1);
            }
            // Records may borrow from their payloads (remote write reads them in place), so
            // the payloads stay until delivery ends, retries included. That is at most
            // `max_samples` per worker, and for remote write it replaces the decoded batch
            // that used to be held instead.
            let records = self.read(&payloads);
            self.deliver(&records).await;
            if self.done.send(ids).is_err() {
                return;
            }
        }
    }

    fn read<'a>(&self, records: &'a [Record]) -> Vec<D::Record<'a>> {
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            match self.destination.read(record) {
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
    async fn deliver(&self, records: &[D::Record<'_>]) {
        let mut backoff = self.retry.initial_backoff;
        let mut failing_since: Option<Instant> = None;
        loop {
            match self.destination.send(self.lane, records).await {
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
    use picket_core::codec::BatchEncoder;
    use picket_core::model::{Labels, MetricType};
    use prost::Message;
    use std::sync::Mutex;

    /// Fails the first `failures` sends with a `Retry-After`, then records what it gets.
    struct Flaky {
        failures: Mutex<u32>,
        got: Mutex<Vec<i64>>,
    }

    impl Destination for Flaky {
        type Record<'a> = Vec<Family>;

        fn read(&self, record: &Record) -> Result<Vec<Family>, RecordError> {
            read_families(&record.payload)
        }

        async fn send(
            &self,
            _lane: usize,
            records: &[Self::Record<'_>],
        ) -> Result<Delivered, Retry> {
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

    /// Starts a driver over `queue` into `destination`.
    fn start<D: Destination>(
        queue: &Arc<Queue>,
        destination: &Arc<D>,
        batch: BatchConfig,
        concurrency: usize,
        read_ahead: ReadAhead,
    ) -> (Arc<SinkMetrics>, tokio::task::JoinHandle<()>) {
        let metrics = Arc::new(SinkMetrics::new("t", "test"));
        let driver = Driver {
            name: "t".into(),
            queue: queue.clone(),
            metrics: metrics.clone(),
            destination: destination.clone(),
            batch,
            retry: RetryConfig::default(),
            concurrency,
            read_ahead,
        };
        (metrics, tokio::spawn(driver.run()))
    }

    /// Runs a driver over `queue` into a [`Flaky`] destination that fails `failures` times,
    /// until the queue is empty (at most 20 s).
    async fn drain(
        queue: &Arc<Queue>,
        failures: u32,
        batch: BatchConfig,
        concurrency: usize,
    ) -> (Arc<SinkMetrics>, Arc<Flaky>) {
        let destination = Arc::new(Flaky {
            failures: Mutex::new(failures),
            got: Mutex::new(Vec::new()),
        });
        let (metrics, task) = start(
            queue,
            &destination,
            batch,
            concurrency,
            ReadAhead::default(),
        );
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

    /// Refuses every request carrying agent "a" until released; records what it delivers.
    struct AgentAStuck {
        released: std::sync::atomic::AtomicBool,
        got: Mutex<Vec<(String, i64)>>,
    }

    impl AgentAStuck {
        fn delivered(&self, agent: &str) -> Vec<i64> {
            let got = self.got.lock().unwrap();
            got.iter()
                .filter(|(a, _)| a == agent)
                .map(|(_, ts)| *ts)
                .collect()
        }
    }

    impl Destination for AgentAStuck {
        type Record<'a> = Vec<Family>;

        fn read(&self, record: &Record) -> Result<Vec<Family>, RecordError> {
            read_families(&record.payload)
        }

        async fn send(
            &self,
            _lane: usize,
            records: &[Self::Record<'_>],
        ) -> Result<Delivered, Retry> {
            let points = || records.iter().flatten().flat_map(|f| &f.points);
            let released = self.released.load(std::sync::atomic::Ordering::SeqCst);
            if !released && points().any(|p| p.labels.get("instance") == Some("a")) {
                return Err(Retry {
                    reason: "503".into(),
                    detail: String::new(),
                    after: Some(Duration::from_millis(5)),
                });
            }
            let mut got = self.got.lock().unwrap();
            for p in points() {
                let agent = p.labels.get("instance").unwrap_or_default().to_owned();
                got.push((agent, p.timestamp_ms));
            }
            Ok(Delivered {
                sent: points().count() as u64,
                dropped: Vec::new(),
            })
        }
    }

    /// Waits (at most 20 s) until `done` holds.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let reached = tokio::time::timeout(Duration::from_secs(20), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(reached.is_ok(), "timed out waiting until {what}");
    }

    #[tokio::test]
    async fn a_retrying_lane_neither_stalls_the_others_nor_holds_more_than_its_memory_bound() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(Queue::open(dir.path(), QueueConfig::default()).unwrap());
        let mut largest = 0;
        for ts in 1..=200 {
            // Agent "a" (odd timestamps) goes through lane 1, "b" through lane 0.
            let agent = if ts % 2 == 1 { "a" } else { "b" };
            let payload = payload(agent, ts);
            largest = largest.max(payload.len());
            queue.append(&payload, 1, ts as u64 % 2).unwrap();
        }
        let memory_bytes = 4 * largest;
        let destination = Arc::new(AgentAStuck {
            released: false.into(),
            got: Mutex::new(Vec::new()),
        });
        let batch = BatchConfig {
            max_samples: 2,
            max_delay: Duration::ZERO,
        };
        let read_ahead = ReadAhead {
            memory_bytes,
            ..ReadAhead::default()
        };
        let (metrics, task) = start(&queue, &destination, batch, 2, read_ahead);

        // Lane 0 delivers all of "b" while "a", the oldest record, keeps failing.
        // Once lane 0's last request is reported done, what stays in memory is lane 1's:
        // its bound plus one record (the gauge is only lowered when a delivery is reported,
        // so it is read once lane 0 has finished).
        let bound = (memory_bytes + largest) as i64;
        until(
            "agent b is delivered and the stuck lane holds its bound",
            || destination.delivered("b").len() == 100 && metrics.read_ahead_bytes() <= bound,
        )
        .await;
        assert_eq!(destination.delivered("a"), Vec::<i64>::new());
        assert!(
            metrics.read_ahead_bytes() >= memory_bytes as i64,
            "the stuck lane is filled up to its bound"
        );
        // Nothing is committed past the stuck record.
        assert_eq!(queue.depth().samples, 200);

        // Released, "a" catches up in order from records read again from the queue.
        destination
            .released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        until("the queue is drained", || queue.depth().samples == 0).await;
        task.abort();
        let a: Vec<i64> = (1..=200).filter(|ts| ts % 2 == 1).collect();
        let b: Vec<i64> = (1..=200).filter(|ts| ts % 2 == 0).collect();
        assert_eq!(destination.delivered("a"), a);
        assert_eq!(destination.delivered("b"), b);
        assert_eq!(metrics.sample_count(outcome::SENT), 200);
        assert_eq!(metrics.read_ahead_bytes(), 0);
    }

    /// A dispatcher's books over `queue` with `lanes` workers whose channels the test holds.
    fn window(
        queue: &Queue,
        lanes: usize,
        limits: ReadAhead,
    ) -> (Window<'_>, Vec<mpsc::UnboundedReceiver<(u64, Record)>>) {
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..lanes {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(Lane {
                tx,
                undelivered: 0,
                parked: VecDeque::new(),
            });
            receivers.push(rx);
        }
        let window = Window {
            name: "t".into(),
            metrics: Arc::new(SinkMetrics::new("t", "test")),
            limits,
            reader: queue.reader(),
            lanes: senders,
            records: VecDeque::new(),
            first_id: 0,
            bytes: 0,
            retry_reads_at: None,
        };
        (window, receivers)
    }

    /// Reads while the window lets it; returns the records read.
    fn read_all(window: &mut Window<'_>) -> usize {
        let mut read = 0;
        while window.may_read() {
            let Some(header) = window.reader.try_next_header().unwrap() else {
                break;
            };
            assert!(window.admit(header).is_ok());
            read += 1;
        }
        read
    }

    /// Twenty 10-byte records alternating between lane 0 ("a0", "a2", …) and lane 1.
    fn alternating_queue(dir: &std::path::Path) -> Queue {
        let queue = Queue::open(dir, QueueConfig::default()).unwrap();
        for i in 0..20u64 {
            let lane = if i % 2 == 0 { 'a' } else { 'b' };
            queue
                .append(format!("{lane}{i:09}").as_bytes(), 1, i % 2)
                .unwrap();
        }
        queue
    }

    fn payloads(rx: &mut mpsc::UnboundedReceiver<(u64, Record)>) -> Vec<(u64, String)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|(id, r)| (id, String::from_utf8(r.payload).unwrap()))
            .collect()
    }

    #[test]
    fn a_lane_at_its_memory_bound_gets_later_records_from_the_queue_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let queue = alternating_queue(dir.path());
        let limits = ReadAhead {
            memory_bytes: 20,
            ..ReadAhead::default()
        };
        let (mut window, mut rx) = window(&queue, 2, limits);
        // Lane 1 delivers everything it gets; lane 0 delivers nothing.
        let mut lane_1 = Vec::new();
        loop {
            let read = read_all(&mut window);
            let got = payloads(&mut rx[1]);
            if read == 0 && got.is_empty() {
                break;
            }
            let ids = got.iter().map(|(id, _)| *id).collect();
            lane_1.extend(got.into_iter().map(|(_, p)| p));
            assert_eq!(
                window.finish(ids).ok(),
                Some(Vec::new()),
                "lane 0 holds the cursor"
            );
        }
        let expected_1: Vec<String> = (1..20).step_by(2).map(|i| format!("b{i:09}")).collect();
        assert_eq!(lane_1, expected_1, "lane 1 is not held up by lane 0");
        // Lane 0 holds two records in memory (20 bytes); its other eight are parked.
        let lane_0 = payloads(&mut rx[0]);
        assert_eq!(
            lane_0.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(),
            ["a000000000", "a000000002"]
        );
        assert_eq!(window.metrics.read_ahead_bytes(), 20);
        assert_eq!(window.lanes[0].parked.len(), 8);

        // Lane 0 delivers its two: the next two come back from the queue, and the cursor
        // moves past the first four records.
        let committed = window
            .finish(lane_0.iter().map(|(id, _)| *id).collect())
            .ok()
            .unwrap();
        assert_eq!(committed.len(), 4);
        assert_eq!(committed[3].0.offset, 4 * 30, "four 30-byte records");
        let next: Vec<String> = payloads(&mut rx[0]).into_iter().map(|(_, p)| p).collect();
        assert_eq!(next, ["a000000004", "a000000006"]);
        assert_eq!(window.metrics.read_ahead_bytes(), 20);
    }

    #[test]
    fn a_record_that_cannot_be_read_back_stays_parked_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let queue = alternating_queue(dir.path());
        let limits = ReadAhead {
            memory_bytes: 20,
            ..ReadAhead::default()
        };
        let (mut window, mut rx) = window(&queue, 2, limits);
        // Lane 1 delivers its first two records, so lane 0's next ones are parked.
        read_all(&mut window);
        let lane_1: Vec<u64> = payloads(&mut rx[1]).into_iter().map(|(id, _)| id).collect();
        assert_eq!(lane_1, [1, 3]);
        assert_eq!(window.finish(lane_1).ok(), Some(Vec::new()));
        read_all(&mut window);
        let lane_0: Vec<u64> = payloads(&mut rx[0]).into_iter().map(|(id, _)| id).collect();
        assert_eq!(lane_0, [0, 2]);
        assert_eq!(window.lanes[0].parked, [4, 6]);

        // The segment loses everything from record 4 on (30-byte records).
        let segment = dir.path().join(format!("{:020}.seg", 1));
        let bytes = std::fs::read(&segment).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap()
            .set_len(4 * 30)
            .unwrap();
        let committed = window.finish(lane_0).ok().unwrap();
        assert_eq!(committed.len(), 4, "what was delivered commits");
        assert!(window.retry_reads_at.is_some());
        assert!(payloads(&mut rx[0]).is_empty());
        assert_eq!(
            window.lanes[0].parked.front(),
            Some(&4),
            "nothing is skipped"
        );
        assert_eq!(window.metrics.sample_count(outcome::DROPPED_CORRUPT), 0);
        assert_eq!(window.records.front().map(|r| r.stage), Some(Stage::Parked));

        // Readable again: the retry sends the records in order.
        std::fs::write(&segment, bytes).unwrap();
        assert!(window.retry_reads().is_ok());
        assert!(window.retry_reads_at.is_none());
        let next: Vec<String> = payloads(&mut rx[0]).into_iter().map(|(_, p)| p).collect();
        assert_eq!(next, ["a000000004", "a000000006"]);
    }

    #[test]
    fn the_ordering_window_bounds_what_waits_behind_an_undelivered_record() {
        // Three records per lane, counted in records or in (10-byte) payloads.
        let by_records = ReadAhead {
            window_records: 3,
            ..ReadAhead::default()
        };
        let by_bytes = ReadAhead {
            window_bytes: 30,
            ..ReadAhead::default()
        };
        for limits in [by_records, by_bytes] {
            window_bounds_what_waits_behind_an_undelivered_record(limits);
        }
    }

    fn window_bounds_what_waits_behind_an_undelivered_record(limits: ReadAhead) {
        let dir = tempfile::tempdir().unwrap();
        let queue = alternating_queue(dir.path());
        let (mut window, mut rx) = window(&queue, 2, limits);
        let mut delivered_1 = 0;
        loop {
            let read = read_all(&mut window);
            let ids: Vec<u64> = payloads(&mut rx[1]).into_iter().map(|(id, _)| id).collect();
            if read == 0 && ids.is_empty() {
                break;
            }
            delivered_1 += ids.len();
            assert_eq!(window.finish(ids).ok(), Some(Vec::new()));
        }
        // Six records (three per lane) are read; lane 1 delivered its three and waits.
        assert_eq!(window.records.len(), 6);
        assert_eq!(delivered_1, 3);
        assert!(!window.may_read());
        let lane_0: Vec<u64> = payloads(&mut rx[0]).into_iter().map(|(id, _)| id).collect();
        assert_eq!(lane_0, [0, 2, 4]);
        // The first record delivered: two records commit, two more may be read.
        let committed = window.finish(vec![0]).ok().unwrap();
        assert_eq!(committed.len(), 2);
        assert_eq!(read_all(&mut window), 2);
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

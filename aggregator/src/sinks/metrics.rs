//! Each network sink's own metrics, served at `/metrics` as `picket_sink_*{sink="<name>"}`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use picket_core::model::{Family, Histogram, Labels, MetricType, Point, Value};

use super::queue::Depth;

/// Upper bounds (seconds) of the request latency histogram.
const LATENCY_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Counts {
    samples: BTreeMap<&'static str, u64>,
    retries: BTreeMap<String, u64>,
    requests: BTreeMap<String, u64>,
    latency_buckets: [u64; LATENCY_BOUNDS.len()],
    latency_count: u64,
    latency_sum: f64,
    /// Remote write's label cache: what became of the batches, and its size per lane (each
    /// lane has its own cache). `None` until used.
    label_cache: Option<(LabelCacheUse, Vec<usize>)>,
}

/// Batches by what the remote-write label cache did for them
/// (`picket_sink_label_cache_batches_total{result}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LabelCacheUse {
    /// Their labels were replayed from the cache.
    pub hit: u64,
    /// Encoded in full, and their shape cached.
    pub miss: u64,
    /// Encoded in full, and not cached: the cache is full or the shape too large for it.
    pub uncached: u64,
    /// Encoded without the cache, which another request held.
    pub busy: u64,
}

pub struct SinkMetrics {
    sink: String,
    kind: &'static str,
    counts: Mutex<Counts>,
    /// Bytes of queued records read into memory and not yet delivered.
    read_ahead_bytes: AtomicI64,
}

/// Outcomes of `picket_sink_samples_total`.
pub mod outcome {
    /// Stored in the sink's queue (the agent was acked).
    pub const QUEUED: &str = "queued";
    /// Accepted by the database.
    pub const SENT: &str = "sent";
    /// Removed by the sink's routing rules.
    pub const FILTERED: &str = "filtered";
    /// Deleted from a full queue (`queue.when_full = "drop_oldest"`).
    pub const DROPPED_QUEUE_FULL: &str = "dropped_queue_full";
    /// Refused by the database with a non-retryable status (4xx other than 429).
    pub const REJECTED: &str = "rejected";
    /// NaN or ±Inf, which InfluxDB cannot store.
    pub const DROPPED_NON_FINITE: &str = "dropped_non_finite";
    /// Stale markers, which InfluxDB has no way to express.
    pub const SKIPPED_STALE: &str = "skipped_stale";
    /// A queue record that failed to decode (disk corruption past the checksum).
    pub const DROPPED_CORRUPT: &str = "dropped_corrupt";
}

impl SinkMetrics {
    pub fn new(sink: &str, kind: &'static str) -> SinkMetrics {
        SinkMetrics {
            sink: sink.to_owned(),
            kind,
            counts: Mutex::new(Counts::default()),
            read_ahead_bytes: AtomicI64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn samples(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            *self.lock().samples.entry(outcome).or_default() += n;
        }
    }

    pub fn sample_count(&self, outcome: &str) -> u64 {
        self.lock().samples.get(outcome).copied().unwrap_or(0)
    }

    /// Records read from the queue into memory (positive) or delivered (negative).
    pub fn read_ahead(&self, bytes: i64) {
        self.read_ahead_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn read_ahead_bytes(&self) -> i64 {
        self.read_ahead_bytes.load(Ordering::Relaxed)
    }

    /// One request's use of lane `lane`'s remote-write label cache; `bytes` is that cache's
    /// size after it (`None` when the request could not use the cache: `busy`). A retried
    /// request counts its batches again.
    pub fn label_cache(&self, lane: usize, used: LabelCacheUse, bytes: Option<usize>) {
        let mut c = self.lock();
        let (total, sizes) = c.label_cache.get_or_insert_with(Default::default);
        total.hit += used.hit;
        total.miss += used.miss;
        total.uncached += used.uncached;
        total.busy += used.busy;
        if let Some(bytes) = bytes {
            if sizes.len() <= lane {
                sizes.resize(lane + 1, 0);
            }
            sizes[lane] = bytes;
        }
    }

    pub fn retry(&self, reason: &str) {
        *self.lock().retries.entry(reason.to_owned()).or_default() += 1;
    }

    /// One finished request: its status (`"200"`, `"transport"`, `"timeout"`) and duration.
    pub fn request(&self, status: &str, took: Duration) {
        let mut c = self.lock();
        *c.requests.entry(status.to_owned()).or_default() += 1;
        let secs = took.as_secs_f64();
        for (i, bound) in LATENCY_BOUNDS.iter().enumerate() {
            if secs <= *bound {
                c.latency_buckets[i] += 1;
            }
        }
        c.latency_count += 1;
        c.latency_sum += secs;
    }

    pub fn families(&self, depth: Depth, ts: i64) -> Vec<Family> {
        let c = self.lock();
        let base = Labels::from_pairs([("sink", self.sink.as_str()), ("type", self.kind)]);
        let with = |name: &str, value: &str| {
            let mut l = base.clone();
            l.insert(name, value);
            l
        };
        let mut samples = Family::new(
            "picket_sink_samples_total",
            MetricType::Counter,
            "Samples by what became of them in this sink.",
        );
        for (outcome, n) in &c.samples {
            samples.push(with("outcome", outcome), ts, *n as f64);
        }
        let mut retries = Family::new(
            "picket_sink_retries_total",
            MetricType::Counter,
            "Requests retried, by reason (HTTP status, transport, timeout).",
        );
        for (reason, n) in &c.retries {
            retries.push(with("reason", reason), ts, *n as f64);
        }
        let mut requests = Family::new(
            "picket_sink_requests_total",
            MetricType::Counter,
            "Requests sent, by HTTP status or failure.",
        );
        for (status, n) in &c.requests {
            requests.push(with("status", status), ts, *n as f64);
        }
        let mut queue_bytes = Family::new(
            "picket_sink_queue_bytes",
            MetricType::Gauge,
            "Bytes waiting in the sink's disk queue.",
        );
        queue_bytes.push(base.clone(), ts, depth.bytes as f64);
        let mut queue_samples = Family::new(
            "picket_sink_queue_samples",
            MetricType::Gauge,
            "Samples waiting in the sink's disk queue.",
        );
        queue_samples.push(base.clone(), ts, depth.samples as f64);
        let mut read_ahead = Family::new(
            "picket_sink_read_ahead_bytes",
            MetricType::Gauge,
            "Bytes of queued records read into memory and not yet delivered.",
        );
        read_ahead.push(base.clone(), ts, self.read_ahead_bytes() as f64);
        let mut latency = Family::new(
            "picket_sink_request_duration_seconds",
            MetricType::Histogram,
            "Time from sending a request to its response.",
        );
        latency.points.push(Point {
            labels: base.clone(),
            timestamp_ms: ts,
            value: Value::Histogram(Histogram {
                count: c.latency_count,
                sum: c.latency_sum,
                buckets: LATENCY_BOUNDS
                    .iter()
                    .zip(c.latency_buckets)
                    .map(|(b, n)| (*b, n))
                    .collect(),
            }),
        });
        let mut families = vec![
            samples,
            retries,
            requests,
            queue_bytes,
            queue_samples,
            read_ahead,
            latency,
        ];
        if let Some((used, sizes)) = &c.label_cache {
            let mut batches = Family::new(
                "picket_sink_label_cache_batches_total",
                MetricType::Counter,
                "Batches encoded with labels from the label cache (hit), encoded and cached (miss), encoded and not cached as the cache is full or the shape too large (uncached), or encoded while another request held the cache (busy). Retried requests count again.",
            );
            for (result, n) in [
                ("hit", used.hit),
                ("miss", used.miss),
                ("uncached", used.uncached),
                ("busy", used.busy),
            ] {
                batches.push(with("result", result), ts, n as f64);
            }
            let mut bytes = Family::new(
                "picket_sink_label_cache_bytes",
                MetricType::Gauge,
                "Memory held by the label cache's batch shapes.",
            );
            let held: usize = sizes.iter().sum();
            bytes.push(base.clone(), ts, held as f64);
            families.extend([batches, bytes]);
        }
        families
    }
}

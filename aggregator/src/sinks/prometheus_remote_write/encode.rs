//! Prometheus remote-write 1.0 request encoding.
//!
//! Turns the batches in the sink's queue (`picket.v1.Batch`, as agents send them) into the
//! body the remote-write sink POSTs: a protobuf `WriteRequest` compressed with snappy's block
//! format, as the 1.0 spec requires (<https://prometheus.io/docs/specs/prw/remote_write_spec/>).
//! It reads the batches' symbol tables directly instead of decoding them into families first:
//! that decode built an owned label set per sample and was the relay's largest cost.
//!
//! Families expand the way the text exposition format (and so our own `/metrics`) does:
//! summaries into one series per quantile plus `_sum` and `_count`, histograms into `_bucket`
//! series (with `le="+Inf"` added when missing), `_sum` and `_count`. `le` and `quantile`
//! values go through [`format_float`] so a series is named the same here as on `/metrics`.
//!
//! The spec wants each series' labels sorted, unique and non-empty, and its samples in
//! timestamp order; a batch may carry the same series in several families or points, so
//! samples are grouped per series and sorted before encoding.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Arc;

use foldhash::fast::RandomState;
use picket_core::codec::DecodeError;
use picket_core::exposition::format_float;
use picket_proto::v1::{self, FlatBatch, FlatValue};

use crate::sinks::driver::RecordError;

use super::label_cache::{LabelCache, Lookup, Shape};

/// Remote-write body ready to POST: snappy *block* format (not framed) of a protobuf WriteRequest.
#[derive(Clone, Debug)]
pub struct EncodedWrite {
    pub body: Vec<u8>,
    pub samples: usize,
    pub series: usize,
    /// Samples of batches left out because they could not be read.
    pub unreadable: u64,
}

/// Prometheus' stale marker NaN bit pattern.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// The label carrying the metric name.
const NAME_LABEL: &str = "__name__";

/// Snappy block encoding of zero bytes (a varint 0 length), which is also an empty
/// `WriteRequest`: proto3 encodes a message with no fields set as nothing.
const EMPTY_BODY: [u8; 1] = [0];

/// `WriteRequest` of the remote-write 1.0 spec. Field 2 is reserved by the spec and field 3
/// (metadata) is experimental and left out of 1.0, so neither is sent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// A batch from the sink's queue: a `picket.v1.Batch` as the agent sent it, and its sample
/// count as queued.
#[derive(Clone, Copy, Debug)]
pub struct QueuedBatch<'a> {
    pub wire: &'a [u8],
    pub samples: u32,
    /// Who sent it (the queue's shard key, a hash of the agent's name): its next batch is
    /// first read through the template of this one's shape.
    pub source: u64,
}

/// Encodes queued wire batches as one remote-write request, straight from their symbol
/// tables: each series' label set is looked up from the batch's symbols and sorted in a
/// reused buffer, so no owned label set is built per sample.
///
/// Series appear in the order their first sample appears in the input, each with its samples
/// in timestamp order (samples with equal timestamps keep their input order). Stale points
/// become stale-marker samples ([`STALE_NAN_BITS`]).
///
/// Each batch is read in place and checked with [`check`]; one that cannot be read (damaged
/// in the queue in a way its checksum missed, or written by a broken build) is logged, left
/// out and counted in [`EncodedWrite::unreadable`].
///
/// The whole request is built in memory: expect a few times the encoded size at peak. Callers
/// must keep batches far below snappy's block limit (about 3.6 GiB of protobuf); a request
/// over it cannot be encoded, is logged, and comes back as an empty body with `samples` and
/// `series` 0.
///
/// With a sink lane's [`LaneEncoder`], the request is built in that lane's buffers from
/// earlier requests, and a batch whose skeleton ([`FlatBatch::parse_skeleton`]) is that of
/// one encoded before is read only that far and takes its samples' encoded labels from the
/// lane's [`LabelCache`] instead of building them; the request is the same either way.
pub fn encode(batches: &[QueuedBatch], lane: Option<&mut LaneEncoder>) -> EncodedWrite {
    // Most batches hold one sample per series, so the sample count is a good first size for
    // the series table and saves rehashing while it grows.
    let expected = batches.iter().map(|b| b.samples as usize).sum();
    let mut fresh;
    let lane = match lane {
        Some(lane) => lane,
        None => {
            fresh = LaneEncoder::default();
            &mut fresh
        }
    };
    let keys = match &lane.cache {
        Some(cache) => cache.keys(),
        None => RandomState::default(),
    };
    let mut table = SeriesTable::in_buffers(std::mem::take(&mut lane.table), expected, keys);
    let mut parts = Parts::default();
    let mut unreadable = 0u64;

    for queued in batches {
        // The usual batch: its source's last one with other numbers, found by that batch's
        // template without reading its skeleton.
        if let Some(cache) = lane.cache.as_mut()
            && let Some(shape) = cache.read_known(queued.source, queued.wire)
        {
            let points = shape.template_reading();
            if shape.len() == emitted_samples(points) {
                let source = table.share(shape.labels().clone());
                let mut labeling = Labeling::Replay {
                    shape,
                    source,
                    next: 0,
                };
                emit_batch(points, &mut labeling, &mut table, &mut parts);
                continue;
            }
            // Cannot happen, as below for a skeleton.
            debug_assert!(false, "a shape disagrees with its template");
        }
        let mut record = None;
        if let Some(cache) = lane.cache.as_mut()
            && let Some(points) = FlatBatch::parse_skeleton(queued.wire, cache.key_mut())
        {
            match cache.look_up(queued.source, queued.wire) {
                Lookup::Found(shape) if shape.len() == emitted_samples(&points) => {
                    let source = table.share(shape.labels().clone());
                    let mut labeling = Labeling::Replay {
                        shape,
                        source,
                        next: 0,
                    };
                    emit_batch(&points, &mut labeling, &mut table, &mut parts);
                    continue;
                }
                // Cannot happen: the skeleton decides every sample emitted, and
                // `emitted_samples` counts as `emit_batch` emits. Should it anyway, the batch
                // is read and encoded in full.
                Lookup::Found(_) => debug_assert!(false, "a shape disagrees with its skeleton"),
                Lookup::Record { hash, room } => record = Some((hash, Shape::new(room))),
                Lookup::Skip => {}
            }
        }
        let batch = match read_checked(queued.wire) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(%error, samples = queued.samples,
                    "unreadable batch in the remote-write queue; left out of the request");
                unreadable += u64::from(queued.samples);
                continue;
            }
        };
        let (hash, shape) = record.unzip();
        let mut labeling = Labeling::Encode { record: shape };
        emit_batch(&batch, &mut labeling, &mut table, &mut parts);
        if let (
            Some(cache),
            Some(hash),
            Labeling::Encode {
                record: Some(shape),
            },
        ) = (lane.cache.as_mut(), hash, labeling)
        {
            cache.insert(hash, shape, queued.source, queued.wire);
        }
    }

    let series_count = table.series.len();
    let samples = table.samples.len();
    lane.table = table.write_request(&mut lane.proto);
    let proto = &lane.proto;

    // Compressed into the lane's buffer, kept at its largest length so it is neither zeroed
    // nor faulted in again; the body is then a copy of what was written.
    // (Over snappy's block limit `max_compress_len` is 0 and `compress` refuses the input.)
    let room = snap::raw::max_compress_len(proto.len());
    if lane.compressed.len() < room {
        lane.compressed.resize(room, 0);
    }
    let encoded = match lane.snappy.compress(proto, &mut lane.compressed) {
        Ok(n) => EncodedWrite {
            body: lane.compressed[..n].to_vec(),
            samples,
            series: series_count,
            unreadable,
        },
        Err(error) => {
            tracing::error!(
                %error, samples, series = series_count, bytes = proto.len(),
                "remote write request too large to compress; dropping it (send smaller batches)"
            );
            EncodedWrite {
                body: EMPTY_BODY.to_vec(),
                samples: 0,
                series: 0,
                unreadable,
            }
        }
    };
    lane.trim();
    encoded
}

/// Reused scratch space for expanding points into samples.
#[derive(Default)]
struct Parts {
    floats: FloatLabels,
    name: String,
}

/// Adds every sample of `batch` to the table, labelled as `labeling` says.
fn emit_batch(
    batch: &FlatBatch,
    labeling: &mut Labeling,
    table: &mut SeriesTable,
    parts: &mut Parts,
) {
    let symbols = batch.symbols();
    let mut labels = SortedLabels::default();
    labels.start_batch(batch);
    for family in batch.families() {
        let base = symbol(symbols, family.name);
        let has_parts = has_parts(family.r#type);
        for series in batch.series(family) {
            labels.start_series(batch.labels(series));
            for point in batch.points(series) {
                let Some(value) = point.value() else { continue };
                let mut emit = PointSink {
                    floats: &mut parts.floats,
                    name: &mut parts.name,
                    base,
                    out: Emitter {
                        table: &mut *table,
                        labeling: &mut *labeling,
                        labels: &mut labels,
                        timestamp: point.timestamp_ms,
                    },
                };
                emit.point(batch, value, has_parts);
            }
        }
    }
    if let Labeling::Replay { shape, next, .. } = labeling {
        debug_assert_eq!(*next, shape.len(), "a replay emitted what was recorded");
    }
}

/// Whether a family of this type is a summary or histogram, whose stale markers go to `_sum`
/// and `_count`.
fn has_parts(kind: i32) -> bool {
    matches!(
        v1::MetricType::try_from(kind),
        Ok(v1::MetricType::Summary | v1::MetricType::Histogram)
    )
}

/// How many samples [`emit_batch`] emits for `batch`: [`PointSink::point`]'s expansion,
/// counted. (Only the points are read, so it works on a skeleton reading.)
fn emitted_samples(batch: &FlatBatch) -> usize {
    let mut samples = 0;
    for family in batch.families() {
        let has_parts = has_parts(family.r#type);
        for series in batch.series(family) {
            for point in batch.points(series) {
                samples += match point.value() {
                    None => 0,
                    Some(FlatValue::Number(_)) => 1,
                    Some(FlatValue::Summary { quantiles, .. }) => quantiles.len() + 2,
                    Some(FlatValue::Histogram { buckets, .. }) => {
                        let inf = batch.buckets(buckets).any(|(b, _)| b == f64::INFINITY);
                        buckets.len() + usize::from(!inf) + 2
                    }
                    Some(FlatValue::Stale) => 1 + usize::from(has_parts),
                };
            }
        }
    }
    samples
}

/// A queued batch read in place and checked ([`check`]).
fn read_checked(wire: &[u8]) -> Result<FlatBatch<'_>, RecordError> {
    let batch = v1::read_received_batch(wire)?;
    check(&batch)?;
    Ok(batch)
}

/// What one lane of a remote-write sink keeps from request to request: its label cache and
/// the buffers a request is built in. Building each request in new buffers cost a fifth of a
/// relaying aggregator's CPU time: the buffers are megabytes, so each one was mapped, faulted
/// in page by page, grown by copying, zeroed (snappy's output) and unmapped again.
pub struct LaneEncoder {
    /// `None` with `label_cache_bytes = 0`.
    pub(super) cache: Option<LabelCache>,
    table: TableBuffers,
    proto: Vec<u8>,
    compressed: Vec<u8>,
    snappy: snap::raw::Encoder,
}

impl Default for LaneEncoder {
    fn default() -> Self {
        LaneEncoder {
            cache: None,
            table: TableBuffers::default(),
            proto: Vec::new(),
            compressed: Vec::new(),
            snappy: snap::raw::Encoder::new(),
        }
    }
}

impl LaneEncoder {
    /// Buffers kept between requests, at most. Requests are bounded by `batch.max_samples`
    /// (10,000 by default: about 11 MiB of buffers with Flink-like labels), but one request
    /// carries at least one whole agent batch, however large; buffers grown past this by such
    /// a batch are given back rather than kept for good.
    const KEPT_BYTES: usize = 64 << 20;

    pub fn new(cache: Option<LabelCache>) -> Self {
        LaneEncoder {
            cache,
            ..Default::default()
        }
    }

    /// The label cache, if the lane has one.
    pub fn cache(&self) -> Option<&LabelCache> {
        self.cache.as_ref()
    }

    fn trim(&mut self) {
        if let Some(cache) = &mut self.cache {
            cache.trim();
        }
        let kept = self.table.capacity_bytes() + self.proto.capacity() + self.compressed.capacity();
        if kept > Self::KEPT_BYTES {
            self.table = TableBuffers::default();
            self.proto = Vec::new();
            self.compressed = Vec::new();
        }
    }
}

/// A [`SeriesTable`]'s vectors, emptied, between requests.
#[derive(Default)]
struct TableBuffers {
    series: Vec<SeriesEntry>,
    arena: Vec<u8>,
    by_hash: HashMap<u64, usize, BuildHasherDefault<Prehashed>>,
    collisions: Vec<Option<usize>>,
    samples: Vec<(usize, TableSample)>,
    shared: Vec<Arc<[u8]>>,
}

impl TableBuffers {
    fn capacity_bytes(&self) -> usize {
        self.series.capacity() * size_of::<SeriesEntry>()
            + self.arena.capacity()
            + self.by_hash.capacity() * (size_of::<(u64, usize)>() + 1)
            + self.collisions.capacity() * size_of::<Option<usize>>()
            + self.samples.capacity() * size_of::<(usize, TableSample)>()
    }
}

/// The symbol at `index`; [`check`] has made sure it exists.
fn symbol<'b>(symbols: &'b [Cow<'_, str>], index: u32) -> &'b str {
    symbols.get(index as usize).map_or("", |s| s.as_ref())
}

/// Label (name, value) pairs from symbol index pairs.
fn symbol_pairs<'b>(
    symbols: &'b [Cow<'_, str>],
    indices: &'b [u32],
) -> impl Iterator<Item = (&'b str, &'b str)> + 'b {
    indices
        .chunks_exact(2)
        .map(move |pair| (symbol(symbols, pair[0]), symbol(symbols, pair[1])))
}

/// Checks what [`encode`] relies on in a batch read back from the sink's queue: symbol
/// indices in range, labels in pairs, a known type and a value of that type on every point.
///
/// The aggregator queues only batches that passed ingest's validation (in full, or their
/// points with a skeleton that passed in full), so this fails only for a record damaged in a
/// way its checksum missed or written by a broken build. It is deliberately cheaper than that
/// validation (no label names are checked); label names, quantiles, buckets and timestamps
/// were validated at ingest.
pub fn check(batch: &FlatBatch) -> Result<(), DecodeError> {
    let len = batch.symbols().len();
    let in_range = |at: &dyn Fn() -> String, index: u32| {
        if (index as usize) < len {
            Ok(())
        } else {
            Err(DecodeError::SymbolOutOfRange {
                at: at(),
                index,
                len,
            })
        }
    };
    let label_pairs = |at: &dyn Fn() -> String, indices: &[u32]| {
        if !indices.len().is_multiple_of(2) {
            return Err(DecodeError::OddLabelCount {
                at: at(),
                count: indices.len(),
            });
        }
        indices.iter().try_for_each(|&index| in_range(at, index))
    };
    label_pairs(&|| "common labels".to_owned(), batch.common_labels())?;
    for (fi, family) in batch.families().iter().enumerate() {
        let at = || format!("family #{fi}");
        in_range(&at, family.name)?;
        let kind =
            v1::MetricType::try_from(family.r#type).map_err(|_| DecodeError::UnknownType {
                at: at(),
                value: family.r#type,
            })?;
        for (si, series) in batch.series(family).iter().enumerate() {
            let at = || format!("family #{fi} series #{si}");
            label_pairs(&at, batch.labels(series))?;
            for point in batch.points(series) {
                let value = point.value();
                let fits = match (value, kind) {
                    (None, _) => return Err(DecodeError::MissingValue { at: at() }),
                    (Some(FlatValue::Stale), _) => true,
                    (Some(FlatValue::Number(_)), k) => {
                        !matches!(k, v1::MetricType::Summary | v1::MetricType::Histogram)
                    }
                    (Some(FlatValue::Summary { .. }), k) => k == v1::MetricType::Summary,
                    (Some(FlatValue::Histogram { .. }), k) => k == v1::MetricType::Histogram,
                };
                if !fits {
                    return Err(DecodeError::TypeMismatch {
                        at: at(),
                        kind: kind_name(kind),
                        value: value_kind(value),
                    });
                }
            }
        }
    }
    Ok(())
}

fn kind_name(kind: v1::MetricType) -> &'static str {
    match kind {
        v1::MetricType::Unspecified => "untyped",
        v1::MetricType::Gauge => "gauge",
        v1::MetricType::Counter => "counter",
        v1::MetricType::Summary => "summary",
        v1::MetricType::Histogram => "histogram",
    }
}

fn value_kind(value: Option<FlatValue>) -> &'static str {
    match value {
        None => "no",
        Some(FlatValue::Number(_)) => "number",
        Some(FlatValue::Summary { .. }) => "summary",
        Some(FlatValue::Histogram { .. }) => "histogram",
        Some(FlatValue::Stale) => "stale",
    }
}

/// How one batch's samples get their encoded labels.
enum Labeling<'c> {
    /// Built from the batch (and, with `record`, kept for the label cache).
    Encode { record: Option<Shape> },
    /// Taken in order from what was emitted for a batch of the same shape, whose labels are
    /// the table's shared labels `source`.
    Replay {
        shape: &'c Shape,
        source: u32,
        next: usize,
    },
}

/// One series' labels (the batch's common labels and its own), sorted by name, built only
/// when first needed: a replayed series never needs them.
#[derive(Default)]
struct SortedLabels<'s> {
    symbols: &'s [Cow<'s, str>],
    common: Vec<(&'s str, &'s str)>,
    own: &'s [u32],
    sorted: Vec<(&'s str, &'s str)>,
    built: bool,
}

impl<'s> SortedLabels<'s> {
    fn start_batch(&mut self, batch: &'s FlatBatch<'s>) {
        self.symbols = batch.symbols();
        self.common.clear();
        self.common
            .extend(symbol_pairs(self.symbols, batch.common_labels()));
    }

    fn start_series(&mut self, own: &'s [u32]) {
        self.own = own;
        self.built = false;
    }

    fn get(&mut self) -> &[(&'s str, &'s str)] {
        if !self.built {
            self.sorted.clear();
            self.sorted.extend_from_slice(&self.common);
            self.sorted.extend(symbol_pairs(self.symbols, self.own));
            // Agents send a handful of labels per series, mostly in order already; the
            // stable sort is an insertion sort at this size.
            self.sorted.sort_by(|a, b| a.0.cmp(b.0));
            self.built = true;
        }
        &self.sorted
    }
}

/// Adds one point's samples to the series table, with the series' labels and the point's
/// timestamp.
struct Emitter<'t, 's, 'c> {
    table: &'t mut SeriesTable,
    labeling: &'t mut Labeling<'c>,
    labels: &'t mut SortedLabels<'s>,
    timestamp: i64,
}

impl Emitter<'_, '_, '_> {
    fn push(&mut self, name: &str, extra: Option<(&'static str, &str)>, value: f64) {
        let timestamp = self.timestamp;
        match self.labeling {
            Labeling::Replay {
                shape,
                source,
                next,
            } => {
                // `encode` checked the shape has a sample for each one the batch emits.
                if let Some((labels, hash)) = shape.sample(*next) {
                    *next += 1;
                    self.table
                        .push_shared(*source, labels, hash, timestamp, value);
                }
            }
            Labeling::Encode { record } => {
                let labels = self.labels.get();
                let (encoded, hash) = self.table.push(name, labels, extra, timestamp, value);
                if let Some(shape) = record {
                    shape.record(encoded, hash);
                }
            }
        }
    }
}

/// Where one point's samples go, with the family name.
struct PointSink<'t, 's, 'c> {
    floats: &'t mut FloatLabels,
    name: &'t mut String,
    base: &'s str,
    out: Emitter<'t, 's, 'c>,
}

impl PointSink<'_, '_, '_> {
    /// Expands the point the way the text exposition format (and `/metrics`) does.
    /// `has_parts`: the family is a summary or histogram, whose stale markers go to `_sum`
    /// and `_count`.
    fn point(&mut self, batch: &FlatBatch, value: FlatValue, has_parts: bool) {
        let base = self.base;
        match value {
            FlatValue::Number(v) => self.out.push(base, None, data(v)),
            FlatValue::Summary {
                count,
                sum,
                quantiles,
            } => {
                for (quantile, value) in batch.quantiles(quantiles) {
                    let extra = Some(("quantile", self.floats.format(quantile)));
                    self.out.push(base, extra, data(value));
                }
                self.parts(data(sum), count as f64);
            }
            FlatValue::Histogram {
                count,
                sum,
                buckets,
            } => {
                let bucket = with_suffix(self.name, base, "_bucket");
                let mut saw_inf = false;
                for (bound, cumulative) in batch.buckets(buckets) {
                    saw_inf |= bound == f64::INFINITY;
                    let extra = Some(("le", self.floats.format(bound)));
                    self.out.push(bucket, extra, cumulative as f64);
                }
                // Prometheus requires the +Inf bucket; it always equals the total count.
                if !saw_inf {
                    let extra = Some(("le", self.floats.format(f64::INFINITY)));
                    self.out.push(bucket, extra, count as f64);
                }
                self.parts(data(sum), count as f64);
            }
            FlatValue::Stale => {
                let stale = f64::from_bits(STALE_NAN_BITS);
                if has_parts {
                    // A stale point does not say which quantiles or buckets the series had,
                    // so only `_sum` and `_count`, which every summary and histogram has, get
                    // markers. The quantile and bucket series simply stop and drop out of
                    // queries after the receiver's lookback window.
                    self.parts(stale, stale);
                } else {
                    self.out.push(base, None, stale);
                }
            }
        }
    }

    /// The `_sum` and `_count` series of a summary or histogram.
    fn parts(&mut self, sum: f64, count: f64) {
        let sum_name = with_suffix(self.name, self.base, "_sum");
        self.out.push(sum_name, None, sum);
        let count_name = with_suffix(self.name, self.base, "_count");
        self.out.push(count_name, None, count);
    }
}

/// A data value as sent. The spec reserves the stale-marker NaN for stale markers, so a
/// measured value that happens to carry those bits is sent as an ordinary NaN instead of
/// ending its series.
fn data(v: f64) -> f64 {
    if v.to_bits() == STALE_NAN_BITS {
        f64::NAN
    } else {
        v
    }
}

/// `name` followed by `suffix`, built in a reused buffer so per-sample names cost no
/// allocation.
fn with_suffix<'b>(buf: &'b mut String, name: &str, suffix: &str) -> &'b str {
    buf.clear();
    buf.push_str(name);
    buf.push_str(suffix);
    buf
}

/// `le` and `quantile` label values, formatted once per distinct bound: every point of a
/// family repeats the same few bounds, and `format_float` allocates.
#[derive(Default)]
struct FloatLabels(HashMap<u64, String>);

impl FloatLabels {
    fn format(&mut self, v: f64) -> &str {
        self.0.entry(v.to_bits()).or_insert_with(|| format_float(v))
    }
}

/// The labels of one series, borrowed from the input: `__name__`, the series' labels and the
/// optional `le`/`quantile` label, written out as the request sends them.
struct SeriesLabels<'s> {
    name: &'s str,
    /// Sorted by name (byte order).
    labels: &'s [(&'s str, &'s str)],
    extra: Option<(&'static str, &'s str)>,
}

impl<'s> SeriesLabels<'s> {
    /// Calls `f` with each label as sent: sorted by name in byte order, labels with an empty
    /// name or value left out (an empty value means "no such label" in Prometheus, and the
    /// spec forbids sending it), and the labels the encoder adds replacing point labels of the
    /// same name (a point's own `__name__` or `le` must not produce a duplicate).
    fn for_each(self, mut f: impl FnMut(&'s str, &'s str)) {
        let mut emit = |name: &'s str, value: &'s str| {
            if !name.is_empty() && !value.is_empty() {
                f(name, value);
            }
        };
        // The added labels, sorted among themselves, merged into the (already sorted) point
        // labels. Merging by comparison rather than putting `__name__` first matters: label
        // names starting with an uppercase letter sort before it.
        let named = (NAME_LABEL, self.name);
        let mut storage = [named, named];
        let added: &[(&'s str, &'s str)] = match self.extra {
            None => &storage[..1],
            Some(extra) => {
                storage = if extra.0 < NAME_LABEL {
                    [extra, named]
                } else {
                    [named, extra]
                };
                &storage
            }
        };
        let mut next = 0;
        for &(name, value) in self.labels {
            while let Some(&(n, v)) = added.get(next).filter(|(n, _)| *n < name) {
                emit(n, v);
                next += 1;
            }
            if added.get(next).is_some_and(|(n, _)| *n == name) {
                continue;
            }
            emit(name, value);
        }
        for &(n, v) in &added[next..] {
            emit(n, v);
        }
    }

    /// Appends the labels as `TimeSeries.labels` fields (each a `Label` message).
    fn encode_into(self, out: &mut Vec<u8>) {
        self.for_each(|name, value| {
            let inner = field_len(name.len()) + field_len(value.len());
            out.push(0x0a); // TimeSeries.labels (1), length-delimited
            put_varint(out, inner as u64);
            out.push(0x0a); // Label.name (1)
            put_varint(out, name.len() as u64);
            out.extend_from_slice(name.as_bytes());
            out.push(0x12); // Label.value (2)
            put_varint(out, value.len() as u64);
            out.extend_from_slice(value.as_bytes());
        });
    }
}

/// Bytes of a length-delimited field with a one-byte tag and `len` bytes of payload.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes of one `Sample` message: value (fixed64) and timestamp (varint), both always sent.
fn sample_len(sample: &TableSample) -> usize {
    1 + 8 + 1 + varint_len(sample.timestamp as u64)
}

/// One sample as the table keeps it until the request is written.
#[derive(Clone, Copy)]
struct TableSample {
    value: f64,
    /// Milliseconds since the Unix epoch.
    timestamp: i64,
}

/// One series of the request: its labels (encoded, a range of the table's arena or of one of
/// its shared label buffers) and how many samples it has.
struct SeriesEntry {
    labels: std::ops::Range<usize>,
    /// [`IN_ARENA`], or the index of the shared buffer.
    source: u32,
    samples: usize,
}

/// [`SeriesEntry::source`] of labels in the table's arena.
const IN_ARENA: u32 = u32::MAX;

/// The series of one request, in order of first appearance, found by a hash of their labels.
///
/// Keying a map on owned label sets would cost a `Vec<Label>` per sample just to look it up;
/// instead each sample's labels are encoded (as they will be sent) at the end of the arena,
/// the map holds a 64-bit hash of those bytes, and every hit is verified against the stored
/// bytes; a sample of a known series takes its bytes back off the arena. The hash is
/// randomly keyed: per lane for the process's life when the lane has a label cache (whose
/// stored hashes must match the table's), per request otherwise. Label values can steer it
/// only by guessing the key, and a collision costs only a comparison. Hashing the encoding
/// in one pass costs less than hashing the labels one string at a time. Samples go into one list in arrival order and
/// are grouped by series only when the request is written, so a series costs no allocation
/// of its own.
struct SeriesTable<S = RandomState> {
    series: Vec<SeriesEntry>,
    /// Every series' labels, encoded once as protobuf `Label` fields; at its end, briefly,
    /// the labels of the sample being added.
    arena: Vec<u8>,
    /// Label hash → the newest series with that hash.
    by_hash: HashMap<u64, usize, BuildHasherDefault<Prehashed>>,
    /// Per series, the previous series with the same hash. Real collisions are rare enough
    /// for a chain.
    collisions: Vec<Option<usize>>,
    keys: S,
    /// Every sample with the index of its series, in arrival order.
    samples: Vec<(usize, TableSample)>,
    /// Label buffers of the label cache's shapes replayed in this request, which their
    /// series refer to rather than copy (a tenth of a relaying aggregator's time went to
    /// copying them into the arena). Held until the request is written, so a shape the
    /// cache drops meanwhile still has its labels here.
    shared: Vec<Arc<[u8]>>,
}

impl<S: BuildHasher> SeriesTable<S> {
    /// A table hashing with `keys` (tests pass one under which everything collides).
    #[cfg(test)]
    fn with_keys(capacity: usize, keys: S) -> Self {
        SeriesTable::in_buffers(TableBuffers::default(), capacity, keys)
    }

    /// An empty table in `buffers` (from an earlier request: emptied, capacity kept), with
    /// room for `capacity` series.
    fn in_buffers(buffers: TableBuffers, capacity: usize, keys: S) -> Self {
        let TableBuffers {
            mut series,
            mut arena,
            mut by_hash,
            mut collisions,
            mut samples,
            mut shared,
        } = buffers;
        shared.clear();
        series.clear();
        arena.clear();
        by_hash.clear();
        collisions.clear();
        samples.clear();
        series.reserve(capacity);
        by_hash.reserve(capacity);
        collisions.reserve(capacity);
        samples.reserve(capacity);
        SeriesTable {
            series,
            arena,
            by_hash,
            collisions,
            keys,
            samples,
            shared,
        }
    }

    /// Makes a shape's labels available to [`SeriesTable::push_shared`], as the returned
    /// source.
    fn share(&mut self, labels: Arc<[u8]>) -> u32 {
        // One per replayed batch, so far fewer than `IN_ARENA`; past it (never), the
        // request would merely not find sources, so saturate rather than wrap.
        let source = u32::try_from(self.shared.len()).unwrap_or(IN_ARENA - 1);
        self.shared.push(labels);
        source
    }

    /// The encoded labels of series `i`.
    fn labels_of(&self, i: usize) -> &[u8] {
        labels_in(&self.arena, &self.shared, &self.series[i])
    }

    fn push(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        extra: Option<(&'static str, &str)>,
        timestamp: i64,
        value: f64,
    ) -> (&[u8], u64) {
        let key = SeriesLabels {
            name,
            labels,
            extra,
        };
        let start = self.arena.len();
        key.encode_into(&mut self.arena);
        let hash = self.keys.hash_one(&self.arena[start..]);
        let index = self.add(
            Encoded::AtArenaEnd(start),
            hash,
            TableSample { value, timestamp },
        );
        (self.labels_of(index), hash)
    }

    /// [`SeriesTable::push`] for labels already encoded, `labels` of the shared buffer
    /// `source` ([`SeriesTable::share`]), with their hash under this table's keys (from the
    /// label cache). They are not copied.
    fn push_shared(
        &mut self,
        source: u32,
        labels: std::ops::Range<usize>,
        hash: u64,
        timestamp: i64,
        value: f64,
    ) {
        self.add(
            Encoded::Shared { source, labels },
            hash,
            TableSample { value, timestamp },
        );
    }

    /// Adds a sample to the series with its labels, which is new unless one has the same
    /// labels (labels at the arena's end then come off it). Returns the series' index.
    fn add(&mut self, labels: Encoded, hash: u64, sample: TableSample) -> usize {
        let index = self.series.len();
        let (arena, shared, series) = (&self.arena, &self.shared, &self.series);
        let adding: &[u8] = match &labels {
            Encoded::AtArenaEnd(start) => &arena[*start..],
            Encoded::Shared { source, labels } => &shared[*source as usize][labels.clone()],
        };
        let same = |i: usize| labels_in(arena, shared, &series[i]) == adding;
        let previous = match self.by_hash.entry(hash) {
            Entry::Vacant(slot) => {
                slot.insert(index);
                None
            }
            Entry::Occupied(mut slot) => {
                let mut candidate = Some(*slot.get());
                while let Some(i) = candidate {
                    if same(i) {
                        if let Encoded::AtArenaEnd(start) = labels {
                            self.arena.truncate(start);
                        }
                        self.series[i].samples += 1;
                        self.samples.push((i, sample));
                        return i;
                    }
                    candidate = self.collisions[i];
                }
                Some(slot.insert(index))
            }
        };
        let (labels, source) = match labels {
            Encoded::AtArenaEnd(start) => (start..self.arena.len(), IN_ARENA),
            Encoded::Shared { source, labels } => (labels, source),
        };
        self.collisions.push(previous);
        self.series.push(SeriesEntry {
            labels,
            source,
            samples: 1,
        });
        self.samples.push((index, sample));
        index
    }

    /// Writes the `WriteRequest` protobuf into `out` (replacing what it held), straight from
    /// the table: each series' labels are kept encoded in the arena, so no `Label` strings
    /// are allocated per series. Returns the table's buffers for the next request.
    fn write_request(mut self, out: &mut Vec<u8>) -> TableBuffers {
        // Group the samples by series (a counting sort, so each series keeps arrival order),
        // then put each series in timestamp order. When every series has one sample (a
        // request of one round per agent, the usual case), the k-th sample is the k-th
        // series' and there is nothing to group.
        let one_each = self.samples.len() == self.series.len();
        let mut starts = Vec::new();
        let mut grouped = Vec::new();
        if !one_each {
            starts.reserve(self.series.len());
            let mut offset = 0;
            for s in &self.series {
                starts.push(offset);
                offset += s.samples;
            }
            let mut next = starts.clone();
            let unset = TableSample {
                value: 0.0,
                timestamp: 0,
            };
            grouped = vec![unset; self.samples.len()];
            for &(series, sample) in &self.samples {
                grouped[next[series]] = sample;
                next[series] += 1;
            }
        }

        out.clear();
        let label_bytes: usize = self.series.iter().map(|s| s.labels.len()).sum();
        out.reserve(label_bytes + self.samples.len() * 24 + self.series.len() * 6);
        for (i, s) in self.series.iter().enumerate() {
            let samples = if one_each {
                debug_assert_eq!(self.samples[i].0, i, "one sample per series, in order");
                std::slice::from_mut(&mut self.samples[i].1)
            } else {
                &mut grouped[starts[i]..starts[i] + s.samples]
            };
            // Usually already in order (one sample, or points arriving in time order); the
            // check is cheaper than sorting. `sort_by_key` is stable, so equal timestamps
            // keep their input order.
            if !samples.is_sorted_by_key(|sample| sample.timestamp) {
                samples.sort_by_key(|sample| sample.timestamp);
            }
            let samples_len: usize = samples.iter().map(|x| field_len(sample_len(x))).sum();
            out.push(0x0a); // WriteRequest.timeseries (1)
            put_varint(out, (s.labels.len() + samples_len) as u64);
            out.extend_from_slice(labels_in(&self.arena, &self.shared, s));
            for sample in samples.iter() {
                out.push(0x12); // TimeSeries.samples (2)
                put_varint(out, sample_len(sample) as u64);
                out.push(0x09); // Sample.value (1), fixed64
                out.extend_from_slice(&sample.value.to_le_bytes());
                out.push(0x10); // Sample.timestamp (2), varint
                put_varint(out, sample.timestamp as u64);
            }
        }
        TableBuffers {
            series: self.series,
            arena: self.arena,
            by_hash: self.by_hash,
            collisions: self.collisions,
            samples: self.samples,
            // Emptied now: the request no longer needs the shapes' labels kept alive.
            shared: {
                let mut shared = self.shared;
                shared.clear();
                shared
            },
        }
    }
}

/// A series' encoded labels, in a table's `arena` or `shared` buffers.
fn labels_in<'t>(arena: &'t [u8], shared: &'t [Arc<[u8]>], entry: &SeriesEntry) -> &'t [u8] {
    match entry.source {
        IN_ARENA => &arena[entry.labels.clone()],
        source => &shared[source as usize][entry.labels.clone()],
    }
}

/// A sample's encoded labels, as [`SeriesTable::add`] gets them.
enum Encoded {
    /// Written at the end of the table's arena, from this offset.
    AtArenaEnd(usize),
    /// In one of the table's shared buffers (a label cache shape's).
    Shared {
        source: u32,
        labels: std::ops::Range<usize>,
    },
}

/// Hasher for keys that already are uniformly distributed 64-bit hashes: hashing them again
/// would only cost time.
#[derive(Default)]
pub(super) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are used, which go through `write_u64`; fold anything else in so
        // the hasher stays correct if that ever changes.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use picket_core::codec::{BatchEncoder, decode_batch};
    use picket_core::model::{Family, Histogram, Labels, MetricType, Point, Summary, Value};
    use prost::Message;

    /// Encodes families the way they reach the sink: each as an agent's wire batch, read in
    /// place from its bytes.
    fn encode_families<'a>(families: impl IntoIterator<Item = &'a Family>) -> EncodedWrite {
        let wires: Vec<Vec<u8>> = families
            .into_iter()
            .map(|family| {
                let mut encoder = BatchEncoder::new(&Labels::new());
                encoder.push(family);
                encoder.finish(0).encode_to_vec()
            })
            .collect();
        let batches: Vec<QueuedBatch> = wires.iter().map(|wire| parse(wire)).collect();
        encode_every_way(&batches)
    }

    fn cached_lane(cache: LabelCache) -> LaneEncoder {
        LaneEncoder::new(Some(cache))
    }

    fn hits(lane: &LaneEncoder) -> u64 {
        lane.cache().map_or(0, LabelCache::hits)
    }

    fn template_hits(lane: &LaneEncoder) -> u64 {
        lane.cache().map_or(0, LabelCache::template_hits)
    }

    fn held(lane: &LaneEncoder) -> usize {
        lane.cache().map_or(0, LabelCache::bytes)
    }

    /// Encodes `batches` without a lane encoder, then twice with one (building its label
    /// cache, then replaying every batch from it), then once more in the same lane after a
    /// request of only the first batch (its buffers left as that request left them), and
    /// requires the same request every time.
    fn encode_every_way(batches: &[QueuedBatch]) -> EncodedWrite {
        let plain = encode(batches, None);
        let mut cache = cached_lane(LabelCache::default());
        let building = encode(batches, Some(&mut cache));
        let hits_before = hits(&cache);
        let replayed = encode(batches, Some(&mut cache));
        let replays = hits(&cache) - hits_before;
        encode(&batches[..batches.len().min(1)], Some(&mut cache));
        let after_another = encode(batches, Some(&mut cache));
        // Each batch from a source of its own: the second time, every one is found by its
        // source's template (and the first time, a source's earlier batch of the same
        // skeleton may be).
        let sourced: Vec<QueuedBatch> = (0u64..)
            .zip(batches)
            .map(|(source, b)| QueuedBatch { source, ..*b })
            .collect();
        let mut by_template = cached_lane(LabelCache::default());
        let templates_building = encode(&sourced, Some(&mut by_template));
        let template_hits_before = template_hits(&by_template);
        let from_templates = encode(&sourced, Some(&mut by_template));
        assert_eq!(
            template_hits(&by_template) - template_hits_before,
            batches.len() as u64,
            "every batch read through its source's template the second time"
        );
        for (way, write) in [
            ("building the cache", &building),
            ("from the cache", &replayed),
            ("after another request", &after_another),
            (
                "building the cache, one source per batch",
                &templates_building,
            ),
            ("through the sources' templates", &from_templates),
        ] {
            assert_eq!(write.body, plain.body, "{way}");
            assert_eq!((write.samples, write.series), (plain.samples, plain.series));
        }
        assert_eq!(
            replays,
            batches.len() as u64,
            "every batch replayed the second time"
        );
        plain
    }

    fn decode(write: &EncodedWrite) -> WriteRequest {
        let proto = snap::raw::Decoder::new()
            .decompress_vec(&write.body)
            .expect("snappy block");
        let request = WriteRequest::decode(proto.as_slice()).expect("protobuf WriteRequest");
        assert_eq!(request.timeseries.len(), write.series);
        let samples: usize = request.timeseries.iter().map(|s| s.samples.len()).sum();
        assert_eq!(samples, write.samples);
        request
    }

    fn labels_of(series: &TimeSeries) -> Vec<(&str, &str)> {
        series
            .labels
            .iter()
            .map(|l| (l.name.as_str(), l.value.as_str()))
            .collect()
    }

    fn samples_of(series: &TimeSeries) -> Vec<(i64, f64)> {
        series
            .samples
            .iter()
            .map(|s| (s.timestamp, s.value))
            .collect()
    }

    /// One decoded series: its labels and its `(timestamp, value)` samples.
    type Decoded<'r> = (Vec<(&'r str, &'r str)>, Vec<(i64, f64)>);

    fn series_of(request: &WriteRequest) -> Vec<Decoded<'_>> {
        request
            .timeseries
            .iter()
            .map(|s| (labels_of(s), samples_of(s)))
            .collect()
    }

    fn point(labels: Labels, timestamp_ms: i64, value: Value) -> Point {
        Point {
            labels,
            timestamp_ms,
            value,
        }
    }

    fn family(name: &str, kind: MetricType, points: Vec<Point>) -> Family {
        Family {
            name: name.to_owned(),
            kind,
            help: String::new(),
            points,
        }
    }

    #[test]
    fn wire_format_uses_the_spec_field_numbers() {
        // Hand-assembled protobuf, independent of the derive attributes above:
        // WriteRequest.timeseries = 1, TimeSeries.labels = 1, .samples = 2,
        // Label.name = 1, .value = 2, Sample.value = 1 (double), .timestamp = 2 (int64).
        let mut g = Family::new("m", MetricType::Gauge, "");
        g.push(Labels::from_pairs([("a", "b")]), 2, 1.0);
        let write = encode_families([&g]);
        let proto = snap::raw::Decoder::new()
            .decompress_vec(&write.body)
            .unwrap();
        let mut sample = vec![0x09];
        sample.extend_from_slice(&1.0f64.to_le_bytes());
        sample.extend_from_slice(&[0x10, 0x02]);
        let mut series = vec![0x0a, 13];
        series.extend_from_slice(&[0x0a, 8, b'_', b'_', b'n', b'a', b'm', b'e', b'_', b'_']);
        series.extend_from_slice(&[0x12, 1, b'm']);
        series.extend_from_slice(&[0x0a, 6, 0x0a, 1, b'a', 0x12, 1, b'b']);
        series.push(0x12);
        series.push(sample.len() as u8);
        series.extend_from_slice(&sample);
        let mut expected = vec![0x0a, series.len() as u8];
        expected.extend_from_slice(&series);
        assert_eq!(proto, expected);
    }

    #[test]
    fn labels_are_sorted_by_bytes_with_name_among_them() {
        let labels = Labels::from_pairs([
            ("zone", "z"),
            ("alpha", "a"),
            ("_x", "x"),
            ("Zeta", "Z"),
            ("AB", "ab"),
        ]);
        let mut g = Family::new("up", MetricType::Gauge, "");
        g.push(labels, 1, 1.0);
        let request = decode(&encode_families([&g]));
        let got = labels_of(&request.timeseries[0]);
        assert_eq!(
            got,
            vec![
                ("AB", "ab"),
                ("Zeta", "Z"),
                ("__name__", "up"),
                ("_x", "x"),
                ("alpha", "a"),
                ("zone", "z"),
            ]
        );
        let names: Vec<&[u8]> = got.iter().map(|(n, _)| n.as_bytes()).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn empty_label_values_are_dropped_and_name_is_not_duplicated() {
        let mut g = Family::new("m", MetricType::Counter, "");
        g.push(Labels::from_pairs([("a", ""), ("b", "x")]), 1, 1.0);
        // Same series: `a=""` means no `a`, and the family name wins over a point `__name__`.
        g.push(
            Labels::from_pairs([("b", "x"), ("__name__", "other")]),
            2,
            2.0,
        );
        g.push(Labels::from_pairs([("b", "")]), 3, 3.0);
        let write = encode_families([&g]);
        let request = decode(&write);
        assert_eq!((write.series, write.samples), (2, 3));
        assert_eq!(
            labels_of(&request.timeseries[0]),
            vec![("__name__", "m"), ("b", "x")]
        );
        assert_eq!(samples_of(&request.timeseries[0]), vec![(1, 1.0), (2, 2.0)]);
        assert_eq!(labels_of(&request.timeseries[1]), vec![("__name__", "m")]);
    }

    #[test]
    fn summary_expands_to_quantiles_sum_and_count() {
        let s = Summary {
            count: 7,
            sum: 10.5,
            quantiles: vec![(0.5, 1.5), (0.99, 2.0), (1.0, 3.0)],
        };
        let labels = Labels::from_pairs([("job", "j"), ("zone", "z")]);
        let f = family(
            "lat",
            MetricType::Summary,
            vec![point(labels, 5, Value::Summary(s))],
        );
        let write = encode_families([&f]);
        let request = decode(&write);
        assert_eq!((write.series, write.samples), (5, 5));
        let q = |v: &'static str| {
            vec![
                ("__name__", "lat"),
                ("job", "j"),
                ("quantile", v),
                ("zone", "z"),
            ]
        };
        assert_eq!(labels_of(&request.timeseries[0]), q("0.5"));
        assert_eq!(labels_of(&request.timeseries[1]), q("0.99"));
        // Formatted like /metrics shows it: `1`, not `1.0`.
        assert_eq!(format_float(1.0), "1");
        assert_eq!(labels_of(&request.timeseries[2]), q("1"));
        let plain = |n: &'static str| vec![("__name__", n), ("job", "j"), ("zone", "z")];
        assert_eq!(labels_of(&request.timeseries[3]), plain("lat_sum"));
        assert_eq!(labels_of(&request.timeseries[4]), plain("lat_count"));
        let values: Vec<f64> = request
            .timeseries
            .iter()
            .map(|s| s.samples[0].value)
            .collect();
        assert_eq!(values, vec![1.5, 2.0, 3.0, 10.5, 7.0]);
        assert!(
            request
                .timeseries
                .iter()
                .all(|s| s.samples[0].timestamp == 5)
        );
    }

    #[test]
    fn histogram_expands_and_adds_inf_bucket_once() {
        let without_inf = Histogram {
            count: 5,
            sum: 2.5,
            buckets: vec![(0.1, 1), (1.0, 3)],
        };
        let with_inf = Histogram {
            count: 9,
            sum: 4.0,
            buckets: vec![(0.25, 2), (f64::INFINITY, 9)],
        };
        // A point label `le` must not duplicate the bucket's own.
        let labels = Labels::from_pairs([("a", "1"), ("le", "bogus")]);
        let f = family(
            "req",
            MetricType::Histogram,
            vec![
                point(labels, 1, Value::Histogram(without_inf)),
                point(Labels::new(), 2, Value::Histogram(with_inf)),
            ],
        );
        let write = encode_families([&f]);
        let request = decode(&write);
        let got = series_of(&request);
        let bucket = |le| vec![("__name__", "req_bucket"), ("a", "1"), ("le", le)];
        let bucket2 = |le| vec![("__name__", "req_bucket"), ("le", le)];
        // Only the added `le` replaces the point's; `_sum` and `_count` keep it.
        let plain = |n| vec![("__name__", n), ("a", "1"), ("le", "bogus")];
        assert_eq!(
            got,
            vec![
                (bucket("0.1"), vec![(1, 1.0)]),
                (bucket("1"), vec![(1, 3.0)]),
                (bucket("+Inf"), vec![(1, 5.0)]),
                (plain("req_sum"), vec![(1, 2.5)]),
                (plain("req_count"), vec![(1, 5.0)]),
                (bucket2("0.25"), vec![(2, 2.0)]),
                (bucket2("+Inf"), vec![(2, 9.0)]),
                (vec![("__name__", "req_sum")], vec![(2, 4.0)]),
                (vec![("__name__", "req_count")], vec![(2, 9.0)]),
            ]
        );
        assert_eq!((write.series, write.samples), (9, 9));
    }

    #[test]
    fn stale_markers_keep_their_exact_bits() {
        let l = || Labels::from_pairs([("i", "1")]);
        let fams = [
            family("g", MetricType::Gauge, vec![point(l(), 7, Value::Stale)]),
            family("s", MetricType::Summary, vec![point(l(), 7, Value::Stale)]),
            family(
                "h",
                MetricType::Histogram,
                vec![point(l(), 7, Value::Stale)],
            ),
            // A measured NaN that carries the marker's bits must not end its series.
            family(
                "n",
                MetricType::Gauge,
                vec![point(l(), 7, Value::Number(f64::from_bits(STALE_NAN_BITS)))],
            ),
        ];
        let write = encode_families(&fams);
        let request = decode(&write);
        let names: Vec<&str> = request
            .timeseries
            .iter()
            .map(|s| s.labels[0].value.as_str())
            .collect();
        assert_eq!(names, ["g", "s_sum", "s_count", "h_sum", "h_count", "n"]);
        for s in &request.timeseries[..5] {
            assert_eq!(s.samples[0].value.to_bits(), STALE_NAN_BITS);
            assert_eq!(s.samples[0].timestamp, 7);
        }
        let measured = request.timeseries[5].samples[0].value;
        assert!(measured.is_nan());
        assert_ne!(measured.to_bits(), STALE_NAN_BITS);
    }

    #[test]
    fn samples_of_one_series_merge_in_time_order() {
        let a1 = || Labels::from_pairs([("a", "1")]);
        let a2 = Labels::from_pairs([("a", "2")]);
        let first = family(
            "x",
            MetricType::Gauge,
            vec![
                point(a1(), 30, Value::Number(1.0)),
                point(a2, 10, Value::Number(9.0)),
            ],
        );
        let second = family(
            "x",
            MetricType::Gauge,
            vec![
                point(a1(), 10, Value::Number(2.0)),
                point(a1(), 30, Value::Number(3.0)),
            ],
        );
        // A summary's `_sum` is the same series as a gauge family named `x_sum`.
        let summary = family(
            "x",
            MetricType::Summary,
            vec![point(
                a1(),
                20,
                Value::Summary(Summary {
                    count: 1,
                    sum: 4.0,
                    quantiles: vec![],
                }),
            )],
        );
        let mut sum = Family::new("x_sum", MetricType::Gauge, "");
        sum.push(a1(), 5, 5.0);
        let write = encode_families([&first, &second, &summary, &sum]);
        let request = decode(&write);
        assert_eq!((write.series, write.samples), (4, 7));
        let got = series_of(&request);
        assert_eq!(
            got,
            vec![
                (
                    vec![("__name__", "x"), ("a", "1")],
                    // Equal timestamps keep input order: 1.0 before 3.0.
                    vec![(10, 2.0), (30, 1.0), (30, 3.0)]
                ),
                (vec![("__name__", "x"), ("a", "2")], vec![(10, 9.0)]),
                (
                    vec![("__name__", "x_sum"), ("a", "1")],
                    vec![(5, 5.0), (20, 4.0)]
                ),
                (vec![("__name__", "x_count"), ("a", "1")], vec![(20, 1.0)]),
            ]
        );
    }

    #[test]
    fn label_values_pass_through_unchanged() {
        let odd = "naïve \"quoted\"\n\\back\tslash, a=b {x} 日本語 🚀 \u{0}";
        let mut g = Family::new("m", MetricType::Gauge, "");
        g.push(
            Labels::from_pairs([("path", odd), ("empty_ok", " ")]),
            1,
            1.0,
        );
        let request = decode(&encode_families([&g]));
        assert_eq!(
            labels_of(&request.timeseries[0]),
            vec![("__name__", "m"), ("empty_ok", " "), ("path", odd)]
        );
    }

    #[test]
    fn huge_batch_round_trips() {
        const SERIES: usize = 50_000;
        const ROUNDS: i64 = 4;
        // Newest round first, so every series needs sorting.
        let fams: Vec<Family> = (0..ROUNDS)
            .rev()
            .map(|round| {
                let mut f = Family::new("cpu_seconds", MetricType::Counter, "");
                for i in 0..SERIES {
                    let labels = Labels::from_pairs([
                        ("cpu", (i % 64).to_string()),
                        ("instance", format!("host-{i}")),
                    ]);
                    f.push(labels, 1_700_000_000_000 + round * 15_000, round as f64);
                }
                f
            })
            .collect();
        let write = encode_families(&fams);
        assert_eq!(write.samples, SERIES * ROUNDS as usize);
        assert_eq!(write.series, SERIES);
        let request = decode(&write);
        for (i, s) in request.timeseries.iter().enumerate() {
            assert_eq!(s.labels[2].value, format!("host-{i}"));
            let values: Vec<f64> = s.samples.iter().map(|s| s.value).collect();
            assert_eq!(values, [0.0, 1.0, 2.0, 3.0]);
            assert!(s.samples.is_sorted_by_key(|s| s.timestamp));
        }
    }

    /// A batch as an agent builds it: `symbols[0]` empty, labels as symbol index pairs.
    fn wire(symbols: &[&str], common: &[u32], families: Vec<v1::Family>) -> v1::Batch {
        v1::Batch {
            sequence: 1,
            symbols: symbols.iter().map(|s| (*s).to_owned()).collect(),
            common_labels: common.to_vec(),
            families,
        }
    }

    fn gauge_family(name: u32, labels: &[u32], value: Option<v1::point::Value>) -> v1::Family {
        v1::Family {
            name,
            r#type: v1::MetricType::Gauge as i32,
            help: 0,
            series: vec![v1::Series {
                labels: labels.to_vec(),
                points: vec![v1::Point {
                    timestamp_ms: 5,
                    value,
                }],
            }],
        }
    }

    #[test]
    fn common_labels_merge_into_every_series_in_byte_order() {
        let symbols = ["", "m", "zone", "z", "AB", "x", "b", "1", "Zeta", "2"];
        let number = Some(v1::point::Value::Number(1.0));
        // Neither the common labels nor the series' own are in order.
        let batch = wire(
            &symbols,
            &[2, 3, 4, 5],
            vec![gauge_family(1, &[6, 7, 8, 9], number)],
        );
        check(&FlatBatch::of(&batch)).expect("well-formed batch");
        let wire = batch.encode_to_vec();
        let request = decode(&encode_every_way(&[parse(&wire)]));
        assert_eq!(
            labels_of(&request.timeseries[0]),
            vec![
                ("AB", "x"),
                ("Zeta", "2"),
                ("__name__", "m"),
                ("b", "1"),
                ("zone", "z"),
            ]
        );
    }

    /// One series with owned labels: its labels and its `(timestamp, value)` samples.
    type Owned = (Vec<(String, String)>, Vec<(i64, f64)>);

    #[test]
    fn series_match_what_the_full_decode_gives() {
        // Flink-like batches from one agent, two rounds, with the agent's common labels:
        // every encoded series must be exactly `__name__` plus the decoded point's labels.
        let common = Labels::from_pairs([("instance", "tm-1"), ("region", "eu")]);
        let round = |ts: i64| {
            let mut encoder = BatchEncoder::new(&common);
            for (name, kind) in [
                (
                    "flink_taskmanager_job_task_numRecordsIn",
                    MetricType::Counter,
                ),
                (
                    "flink_taskmanager_job_task_buffers_inPoolUsage",
                    MetricType::Gauge,
                ),
            ] {
                let mut family = Family::new(name, kind, "help text");
                for subtask in 0..4 {
                    let labels = Labels::from_pairs([
                        ("task_name", "Source: Kafka -> Map".to_owned()),
                        ("job_name", "orders".to_owned()),
                        ("subtask_index", subtask.to_string()),
                        ("Zone", "a".to_owned()),
                    ]);
                    family.push(labels, ts, subtask as f64 + ts as f64);
                }
                encoder.push(&family);
            }
            encoder.finish(ts as u64)
        };
        let batches = [round(1_000), round(2_000)];
        let mut expected: Vec<Owned> = Vec::new();
        for batch in &batches {
            check(&FlatBatch::of(batch)).expect("the agent's own encoding passes the check");
            for family in decode_batch(batch).expect("decodes").families {
                for point in family.points {
                    let mut labels: Vec<(String, String)> = point
                        .labels
                        .iter()
                        .map(|(n, v)| (n.to_owned(), v.to_owned()))
                        .collect();
                    labels.push(("__name__".to_owned(), family.name.clone()));
                    labels.sort();
                    let Value::Number(v) = point.value else {
                        panic!("only numbers in this batch")
                    };
                    match expected.iter_mut().find(|(l, _)| *l == labels) {
                        Some((_, samples)) => samples.push((point.timestamp_ms, v)),
                        None => expected.push((labels, vec![(point.timestamp_ms, v)])),
                    }
                }
            }
        }
        let wires = batches.each_ref().map(|b| b.encode_to_vec());
        let write = encode_every_way(&wires.each_ref().map(|w| parse(w)));
        let request = decode(&write);
        let got: Vec<Owned> = request
            .timeseries
            .iter()
            .map(|s| {
                let labels = labels_of(s)
                    .into_iter()
                    .map(|(n, v)| (n.to_owned(), v.to_owned()))
                    .collect();
                (labels, samples_of(s))
            })
            .collect();
        assert_eq!(got, expected);
        assert_eq!((write.series, write.samples), (8, 16));
    }

    #[test]
    fn check_refuses_what_the_encoder_cannot_read() {
        use v1::point::Value as W;
        let number = || Some(W::Number(1.0));
        let symbols = ["", "m", "a", "b"];
        let error = |batch: v1::Batch| check(&FlatBatch::of(&batch)).unwrap_err().to_string();

        assert!(
            check(&FlatBatch::of(&wire(
                &symbols,
                &[2, 3],
                vec![gauge_family(1, &[], number())]
            )))
            .is_ok()
        );
        let out_of_range = error(wire(
            &symbols,
            &[],
            vec![gauge_family(1, &[2, 9], number())],
        ));
        assert!(
            out_of_range.contains("symbol index 9 is out of range"),
            "{out_of_range}"
        );
        let bad_name = error(wire(&symbols, &[], vec![gauge_family(4, &[], number())]));
        assert!(bad_name.contains("family #0"), "{bad_name}");
        let odd = error(wire(&symbols, &[2], vec![gauge_family(1, &[], number())]));
        assert!(
            odd.contains("common labels") && odd.contains("odd"),
            "{odd}"
        );
        let missing = error(wire(&symbols, &[], vec![gauge_family(1, &[], None)]));
        assert!(missing.contains("no value"), "{missing}");
        let mut unknown = gauge_family(1, &[], number());
        unknown.r#type = 99;
        let unknown = error(wire(&symbols, &[], vec![unknown]));
        assert!(unknown.contains("unknown metric type 99"), "{unknown}");
        let summary = Some(W::Summary(v1::Summary::default()));
        let mismatch = error(wire(&symbols, &[], vec![gauge_family(1, &[], summary)]));
        assert!(
            mismatch.contains("gauge family carries a summary"),
            "{mismatch}"
        );
    }

    #[test]
    fn empty_input_is_an_empty_request() {
        for write in [
            encode_families(std::iter::empty()),
            encode_families([&Family::new("m", MetricType::Gauge, "")]),
        ] {
            assert_eq!((write.samples, write.series), (0, 0));
            assert_eq!(write.body, EMPTY_BODY);
            assert_eq!(decode(&write), WriteRequest::default());
        }
    }

    /// Series are told apart by their labels, not their hash: under a hasher where every
    /// label set collides, samples still land in their own series, in time order.
    #[test]
    fn series_whose_hashes_collide_stay_apart() {
        #[derive(Default)]
        struct Collide;
        impl Hasher for Collide {
            fn finish(&self) -> u64 {
                7
            }
            fn write(&mut self, _: &[u8]) {}
        }
        let mut table = SeriesTable::with_keys(4, BuildHasherDefault::<Collide>::default());
        let (a, b) = ([("job", "a")], [("job", "b")]);
        table.push("m", &a, None, 20, 1.0);
        table.push("m", &b, None, 10, 2.0);
        table.push("m", &a, None, 10, 3.0);
        table.push("m", &b, Some(("le", "1")), 10, 4.0);
        table.push("m", &b, None, 30, 5.0);
        let mut proto = Vec::new();
        table.write_request(&mut proto);
        let request = WriteRequest::decode(proto.as_slice()).expect("protobuf WriteRequest");
        let got: Vec<_> = request
            .timeseries
            .iter()
            .map(|s| (labels_of(s), samples_of(s)))
            .collect();
        assert_eq!(
            got,
            [
                (
                    vec![("__name__", "m"), ("job", "a")],
                    vec![(10, 3.0), (20, 1.0)]
                ),
                (
                    vec![("__name__", "m"), ("job", "b")],
                    vec![(10, 2.0), (30, 5.0)]
                ),
                (
                    vec![("__name__", "m"), ("job", "b"), ("le", "1")],
                    vec![(10, 4.0)]
                ),
            ]
        );
    }

    /// One agent's round: a gauge per (job, operator) and a summary, at `ts`, with values
    /// from `v`, and `stale` making the summary's point a stale marker.
    fn round(ts: i64, v: f64, operator: &str, stale: bool) -> Vec<u8> {
        let mut gauge = Family::new("flink_records_in", MetricType::Gauge, "help");
        for job in ["a", "b"] {
            gauge.push(
                Labels::from_pairs([("job", job), ("operator", operator)]),
                ts,
                v,
            );
        }
        let summary_value = if stale {
            Value::Stale
        } else {
            Value::Summary(Summary {
                count: 3,
                sum: v,
                quantiles: vec![(0.5, v), (0.99, v * 2.0)],
            })
        };
        let summary = family(
            "latency",
            MetricType::Summary,
            vec![point(Labels::from_pairs([("job", "a")]), ts, summary_value)],
        );
        let mut encoder = BatchEncoder::new(&Labels::from_pairs([("instance", "pi-1")]));
        encoder.push(&gauge);
        encoder.push(&summary);
        encoder.finish(0).encode_to_vec()
    }

    /// A wire batch as the sink's queue gives it, with its sample count.
    fn parse(wire: &[u8]) -> QueuedBatch<'_> {
        let batch = FlatBatch::parse(wire).expect("an agent's batch is read in place");
        let samples = picket_core::codec::validate_flat_batch(&batch).unwrap_or(0);
        QueuedBatch {
            wire,
            samples: samples as u32,
            source: 0,
        }
    }

    /// The next round of an agent replays the first round's labels with its own timestamps
    /// and values; the request equals the one built without the cache.
    #[test]
    fn a_batch_shaped_like_an_earlier_one_replays_its_labels() {
        let mut cache = cached_lane(LabelCache::default());
        let first = round(1_000, 1.0, "map", false);
        let second = round(2_000, 5.0, "map", false);
        encode(&[parse(&first)], Some(&mut cache));
        assert_eq!(hits(&cache), 0);
        let cached = encode(&[parse(&second)], Some(&mut cache));
        assert_eq!(hits(&cache), 1, "the second round's shape was found");
        assert_eq!(cached.body, encode(&[parse(&second)], None).body);
        let request = decode(&cached);
        let samples: Vec<_> = request.timeseries.iter().map(samples_of).collect();
        assert_eq!(samples[0], [(2_000, 5.0)]);
        assert_eq!(samples[2], [(2_000, 5.0)], "quantile 0.5 of the summary");
        assert_eq!(samples[3], [(2_000, 10.0)], "quantile 0.99");
        // Two rounds in one request: the second replays and merges into the first's series.
        let both = encode(&[parse(&first), parse(&second)], Some(&mut cache));
        assert_eq!(hits(&cache), 3);
        assert_eq!(
            both.body,
            encode(&[parse(&first), parse(&second)], None).body
        );
        assert_eq!((both.series, both.samples), (6, 12));
    }

    /// Anything that changes which samples are emitted or their labels is another shape:
    /// a label value, a stale marker in place of a summary, other quantiles, another common
    /// label. Each is encoded in full, and correctly, rather than replayed.
    #[test]
    fn a_batch_of_another_shape_is_encoded_in_full() {
        let mut cache = cached_lane(LabelCache::default());
        let first = round(1_000, 1.0, "map", false);
        encode(&[parse(&first)], Some(&mut cache));
        let mut other_quantiles = Family::new("latency", MetricType::Summary, "");
        other_quantiles.points.push(point(
            Labels::from_pairs([("job", "a")]),
            2_000,
            Value::Summary(Summary {
                count: 3,
                sum: 1.0,
                quantiles: vec![(0.5, 1.0), (0.9, 2.0)],
            }),
        ));
        let mut encoder = BatchEncoder::new(&Labels::from_pairs([("instance", "pi-2")]));
        encoder.push(&Family::new("flink_records_in", MetricType::Gauge, ""));
        let mut gauge = Family::new("flink_records_in", MetricType::Gauge, "");
        for job in ["a", "b"] {
            gauge.push(
                Labels::from_pairs([("job", job), ("operator", "map")]),
                2_000,
                1.0,
            );
        }
        encoder.push(&gauge);
        let other_instance = encoder.finish(0).encode_to_vec();
        let mut encoder = BatchEncoder::new(&Labels::from_pairs([("instance", "pi-1")]));
        encoder.push(&other_quantiles);
        let other_quantiles = encoder.finish(0).encode_to_vec();
        for (what, wire) in [
            ("another label value", round(2_000, 1.0, "sink", false)),
            ("a stale summary", round(2_000, 1.0, "map", true)),
            ("other quantiles", other_quantiles),
            ("another common label", other_instance),
        ] {
            let before = hits(&cache);
            let cached = encode(&[parse(&wire)], Some(&mut cache));
            assert_eq!(hits(&cache), before, "{what}: not replayed");
            assert_eq!(cached.body, encode(&[parse(&wire)], None).body, "{what}");
        }
        let stale = decode(&encode(
            &[parse(&round(3_000, 1.0, "map", true))],
            Some(&mut cache),
        ));
        assert_eq!(hits(&cache), 1, "the stale round's own shape was kept");
        let names: Vec<_> = stale
            .timeseries
            .iter()
            .map(|s| labels_of(s)[0].1.to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "flink_records_in",
                "flink_records_in",
                "latency_sum",
                "latency_count"
            ]
        );
    }

    /// A source whose batches alternate between shapes (an agent's round split into
    /// batches) has each read through its own template once both were seen; the requests
    /// are those built without the cache.
    #[test]
    fn a_source_alternating_between_shapes_reads_each_through_its_template() {
        fn from(wire: &[u8]) -> QueuedBatch<'_> {
            QueuedBatch {
                source: 9,
                ..parse(wire)
            }
        }
        let mut lane = cached_lane(LabelCache::default());
        for round_n in 0..4 {
            let ts = 1_000 + round_n * 1_000;
            // (Not 0.0: proto3 leaves a zero sum out, and the batch would be shorter.)
            let a = round(ts, 1.0 + round_n as f64, "map", false);
            let b = round(ts, 1.0 + round_n as f64, "sink", false);
            for batch in [&a, &b] {
                let before = template_hits(&lane);
                let write = encode(&[from(batch)], Some(&mut lane));
                assert_eq!(write.body, encode(&[from(batch)], None).body);
                let by_template = template_hits(&lane) > before;
                assert_eq!(by_template, round_n > 0, "round {round_n}");
            }
        }
        // A fifth shape from the source pushes out its oldest: still readable, by skeleton.
        for op in ["a", "b", "c", "d"] {
            encode(&[from(&round(9_000, 1.0, op, false))], Some(&mut lane));
        }
        let before = (hits(&lane), template_hits(&lane));
        encode(&[from(&round(10_000, 2.0, "map", false))], Some(&mut lane));
        assert_eq!(
            (hits(&lane), template_hits(&lane)),
            (before.0 + 1, before.1),
            "found by its skeleton, not a template"
        );
    }

    /// A full cache keeps the shapes it has, which go on replaying, and caches no more (the
    /// batches it has no room for are encoded as without it); shapes idle for `IDLE` are
    /// swept out, which makes room again. A shape larger than the whole cache is never kept.
    /// The requests are the same throughout.
    #[test]
    fn a_full_cache_keeps_its_shapes_and_sweeps_idle_ones() {
        use super::super::label_cache::{IDLE, SWEEP_INTERVAL};
        let rounds: Vec<Vec<u8>> = (0..50)
            .map(|i| round(1_000, 1.0, &format!("operator-{i:02}"), false))
            .collect();
        let mut one = cached_lane(LabelCache::default());
        encode(&[parse(&rounds[0])], Some(&mut one));
        let shape = held(&one);
        assert!(shape > 0);
        let mut lane = cached_lane(LabelCache::new(shape as u64 * 5));
        let check = |lane: &mut LaneEncoder, n: usize| {
            let before = hits(lane);
            let write = encode(&[parse(&rounds[n])], Some(lane));
            assert_eq!(
                write.body,
                encode(&[parse(&rounds[n])], None).body,
                "round {n}"
            );
            hits(lane) > before
        };
        for n in 0..50 {
            assert!(!check(&mut lane, n), "round {n} is new");
            assert!(held(&lane) <= shape * 5, "{} bytes cached", held(&lane));
        }
        assert_eq!(held(&lane), shape * 5, "the first five rounds fill it");
        for n in 0..5 {
            assert!(check(&mut lane, n), "round {n} was cached first and stays");
        }
        assert!(!check(&mut lane, 49), "no room was made for later rounds");
        assert_eq!(held(&lane), shape * 5);

        // Rounds 1 to 4 go idle; round 0 goes on. A sweep while none is idle yet finds the
        // cache full again at the next new shape; the next sweep, a minute on, drops the
        // idle ones, and the cache takes new shapes again.
        let cache = lane.cache.as_mut().expect("a cache");
        cache.advance_clock(IDLE - SWEEP_INTERVAL);
        assert!(check(&mut lane, 0));
        lane.cache
            .as_mut()
            .expect("a cache")
            .advance_clock(SWEEP_INTERVAL * 2);
        assert!(!check(&mut lane, 49), "recorded, did not fit: full again");
        assert!(!check(&mut lane, 49), "swept, then cached");
        assert!(check(&mut lane, 49));
        assert!(check(&mut lane, 0), "round 0 was in use");
        assert!(!check(&mut lane, 1), "round 1 was idle and went");
        assert_eq!(held(&lane), shape * 3, "rounds 0, 49 and 1");

        // (Without its template, which it would go without if that were all that did not
        // fit: a_shape_too_large_for_the_cache_leaves_it_open.)
        let template = one.cache().map_or(0, LabelCache::template_bytes);
        let mut small = cached_lane(LabelCache::new((shape - template) as u64 - 1));
        let write = encode(&[parse(&rounds[0])], Some(&mut small));
        assert_eq!(held(&small), 0);
        assert_eq!(write.body, encode(&[parse(&rounds[0])], None).body);
    }

    /// One-family batches: a single series of `kind` with `value`, from instance `pi-1`.
    fn single(name: &str, kind: MetricType, labels: &[(&str, &str)], value: Value) -> Vec<u8> {
        let f = family(
            name,
            kind,
            vec![point(
                Labels::from_pairs(labels.iter().copied()),
                1_000,
                value,
            )],
        );
        let mut encoder = BatchEncoder::new(&Labels::from_pairs([("instance", "pi-1")]));
        encoder.push(&f);
        encoder.finish(0).encode_to_vec()
    }

    /// Batches that differ from each other in one thing each that decides the samples or
    /// their labels. After any of them, any other encodes in the same lane exactly as it
    /// does alone: no shape is taken for another.
    #[test]
    fn no_batch_replays_another_shape() {
        let histogram = |buckets: Vec<(f64, u64)>| {
            Value::Histogram(Histogram {
                count: 9,
                sum: 4.0,
                buckets,
            })
        };
        let summary = |quantiles: Vec<(f64, f64)>| {
            Value::Summary(Summary {
                count: 3,
                sum: 1.0,
                quantiles,
            })
        };
        let job = [("job", "a")];
        // The same strings, and the same labels, under two symbol orders.
        let symbols = ["", "m", "job", "a", "zone", "z"];
        let permuted = ["", "zone", "z", "m", "job", "a"];
        let number = Some(v1::point::Value::Number(1.0));
        let variants: Vec<(&str, Vec<u8>)> = vec![
            ("round", round(1_000, 1.0, "map", false)),
            ("another operator", round(1_000, 1.0, "sink", false)),
            ("stale summary", round(1_000, 1.0, "map", true)),
            (
                "buckets without +Inf",
                single(
                    "h",
                    MetricType::Histogram,
                    &job,
                    histogram(vec![(0.5, 2), (1.0, 9)]),
                ),
            ),
            (
                "buckets with +Inf",
                single(
                    "h",
                    MetricType::Histogram,
                    &job,
                    histogram(vec![(0.5, 2), (f64::INFINITY, 9)]),
                ),
            ),
            (
                "other bounds",
                single(
                    "h",
                    MetricType::Histogram,
                    &job,
                    histogram(vec![(0.25, 2), (1.0, 9)]),
                ),
            ),
            (
                "quantiles",
                single("h", MetricType::Summary, &job, summary(vec![(0.5, 1.0)])),
            ),
            (
                "stale gauge",
                single("h", MetricType::Gauge, &job, Value::Stale),
            ),
            (
                "stale histogram",
                single("h", MetricType::Histogram, &job, Value::Stale),
            ),
            (
                "gauge",
                single("h", MetricType::Gauge, &job, Value::Number(1.0)),
            ),
            (
                "an empty label value",
                single("h", MetricType::Gauge, &[("job", "")], Value::Number(1.0)),
            ),
            (
                "symbols",
                wire(
                    &symbols,
                    &[4, 5],
                    vec![gauge_family(1, &[2, 3], number.clone())],
                )
                .encode_to_vec(),
            ),
            (
                "permuted symbols",
                wire(
                    &permuted,
                    &[1, 2],
                    vec![gauge_family(3, &[4, 5], number.clone())],
                )
                .encode_to_vec(),
            ),
        ];
        for (first, x) in &variants {
            for (then, y) in &variants {
                let mut lane = cached_lane(LabelCache::default());
                encode(&[parse(x)], Some(&mut lane));
                let alone = encode(&[parse(y)], None);
                let after = encode(&[parse(y)], Some(&mut lane));
                assert_eq!(after.body, alone.body, "{then} after {first}");
                let both = encode(&[parse(x), parse(y)], Some(&mut lane));
                assert_eq!(
                    both.body,
                    encode(&[parse(x), parse(y)], None).body,
                    "{first} with {then}"
                );
            }
        }
    }

    /// A replayed batch and a newly encoded one in the same request share the series
    /// table's hash keys: a series in both is still one series.
    #[test]
    fn replayed_and_encoded_batches_merge_their_series() {
        let mut lane = cached_lane(LabelCache::default());
        encode(&[parse(&round(1_000, 1.0, "map", false))], Some(&mut lane));
        // The first round's gauge series for job "a", alone, in another shape.
        let other = single(
            "flink_records_in",
            MetricType::Gauge,
            &[("job", "a"), ("operator", "map")],
            Value::Number(7.0),
        );
        let replayed = round(2_000, 2.0, "map", false);
        let before = hits(&lane);
        let write = encode(&[parse(&replayed), parse(&other)], Some(&mut lane));
        assert_eq!(hits(&lane), before + 1, "the round was replayed");
        let plain = encode(&[parse(&replayed), parse(&other)], None);
        assert_eq!(write.body, plain.body);
        let request = decode(&write);
        let merged = &request.timeseries[0];
        assert_eq!(samples_of(merged), [(1_000, 7.0), (2_000, 2.0)]);
        assert_eq!(write.series, 6);
    }

    /// A shape too large for the cache is not kept and does not stop the cache taking
    /// smaller ones; it is not recorded again each time it comes.
    #[test]
    fn a_shape_too_large_for_the_cache_leaves_it_open() {
        let big = round(1_000, 1.0, "map", false);
        let small = single("m", MetricType::Gauge, &[("job", "a")], Value::Number(1.0));
        let mut sizes = cached_lane(LabelCache::default());
        encode(&[parse(&big)], Some(&mut sizes));
        let big_bytes = held(&sizes);
        let template = sizes.cache().map_or(0, LabelCache::template_bytes);
        assert!(template > 0);

        // Room for the shape but not its template: kept without one, and found by its
        // skeleton.
        let mut tight = cached_lane(LabelCache::new(big_bytes as u64 - 1));
        encode(&[parse(&big)], Some(&mut tight));
        assert_eq!(held(&tight), big_bytes - template);
        let again = round(2_000, 2.0, "map", false);
        let write = encode(&[parse(&again)], Some(&mut tight));
        assert_eq!(write.body, encode(&[parse(&again)], None).body);
        assert_eq!((hits(&tight), template_hits(&tight)), (1, 0));
        assert_eq!(held(&tight), big_bytes - template, "not learnt again");

        // No room for the shape at all.
        let mut lane = cached_lane(LabelCache::new((big_bytes - template) as u64 - 1));
        for _ in 0..3 {
            let write = encode(&[parse(&big)], Some(&mut lane));
            assert_eq!(write.body, encode(&[parse(&big)], None).body);
            assert_eq!(held(&lane), 0);
        }
        let cache = lane.cache().expect("a cache");
        assert_eq!((cache.batches(), cache.cached()), (3, 0));
        assert_eq!(
            cache.recordings(),
            1,
            "known as too large after the first time"
        );
        encode(&[parse(&small)], Some(&mut lane));
        assert!(held(&lane) > 0, "the small shape is cached");
        encode(&[parse(&small)], Some(&mut lane));
        assert_eq!(hits(&lane), 1);
    }
}

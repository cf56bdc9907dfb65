//! Converts model families to `picket.v1` batches and back.
//!
//! Encoding interns every string (metric names, help, label names and values) into the batch's
//! symbol table once and groups points of the same series, so a batch carrying several
//! collection rounds repeats no label set. Decoding validates everything a peer could get wrong
//! (symbol indices, label syntax, duplicate labels, quantile ranges, bucket order) and reports
//! the first problem precisely; the aggregator turns that into a `Rejected` ack.

use std::borrow::Cow;

use foldhash::HashMap;
use picket_proto::v1::{self, FlatBatch, FlatFamily, FlatPoint, FlatValue};

use crate::model::{
    Family, Histogram, Labels, MetricType, Point, Summary, Value, is_valid_label_name,
    is_valid_metric_name,
};

/// Most labels one series may carry; Prometheus itself rejects far fewer in practice.
pub const MAX_LABELS_PER_SERIES: usize = 128;

/// Most bytes of label text a batch may expand to once decoded. Every point carries its full
/// label set, so a small batch with long label values and many points could otherwise make
/// the aggregator allocate gigabytes (a hostile or broken peer must not be able to).
pub const MAX_DECODED_LABEL_BYTES: usize = 64 * 1024 * 1024;

/// Accumulates families into one batch, interning strings and merging series.
#[derive(Default)]
pub struct BatchEncoder {
    symbols: Vec<String>,
    symbol_index: HashMap<String, u32>,
    common_labels: Vec<u32>,
    families: Vec<v1::Family>,
    /// (family name, type) -> index in `families`.
    family_index: HashMap<(String, MetricType), usize>,
    /// (family index, encoded labels) -> series index in that family.
    series_index: HashMap<(usize, Vec<u32>), usize>,
    samples: usize,
    points: usize,
}

impl BatchEncoder {
    /// Starts a batch whose every series carries `common_labels`.
    pub fn new(common_labels: &Labels) -> Self {
        let mut encoder = BatchEncoder::default();
        encoder.intern("");
        encoder.common_labels = encoder.intern_labels(common_labels);
        encoder
    }

    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.symbol_index.get(s) {
            return i;
        }
        let i = self.symbols.len() as u32;
        self.symbols.push(s.to_owned());
        self.symbol_index.insert(s.to_owned(), i);
        i
    }

    fn intern_labels(&mut self, labels: &Labels) -> Vec<u32> {
        let mut out = Vec::with_capacity(labels.len() * 2);
        for (name, value) in labels.iter() {
            out.push(self.intern(name));
            out.push(self.intern(value));
        }
        out
    }

    /// Adds every point of `family`.
    pub fn push(&mut self, family: &Family) {
        let key = (family.name.clone(), family.kind);
        let family_idx = match self.family_index.get(&key) {
            Some(&i) => i,
            None => {
                let name = self.intern(&family.name);
                let help = self.intern(&family.help);
                self.families.push(v1::Family {
                    name,
                    r#type: wire_type(family.kind) as i32,
                    help,
                    series: Vec::new(),
                });
                self.family_index.insert(key, self.families.len() - 1);
                self.families.len() - 1
            }
        };
        for point in &family.points {
            let key = (family_idx, self.intern_labels(&point.labels));
            let series = &mut self.families[family_idx].series;
            let series_idx = match self.series_index.get(&key) {
                Some(&i) => i,
                None => {
                    series.push(v1::Series {
                        labels: key.1.clone(),
                        points: Vec::new(),
                    });
                    self.series_index.insert(key, series.len() - 1);
                    series.len() - 1
                }
            };
            series[series_idx].points.push(wire_point(point));
            self.samples += point.value.sample_count();
            self.points += 1;
        }
    }

    /// Prometheus samples added so far.
    pub fn sample_count(&self) -> usize {
        self.samples
    }

    /// Points added so far.
    pub fn point_count(&self) -> usize {
        self.points
    }

    pub fn is_empty(&self) -> bool {
        self.points == 0
    }

    /// Finishes the batch with its sequence number.
    pub fn finish(self, sequence: u64) -> v1::Batch {
        v1::Batch {
            sequence,
            symbols: self.symbols,
            common_labels: self.common_labels,
            families: self.families,
        }
    }
}

fn wire_type(kind: MetricType) -> v1::MetricType {
    match kind {
        MetricType::Untyped => v1::MetricType::Unspecified,
        MetricType::Gauge => v1::MetricType::Gauge,
        MetricType::Counter => v1::MetricType::Counter,
        MetricType::Summary => v1::MetricType::Summary,
        MetricType::Histogram => v1::MetricType::Histogram,
    }
}

fn wire_point(point: &Point) -> v1::Point {
    use v1::point::Value as W;
    let value = match &point.value {
        Value::Number(v) => W::Number(*v),
        Value::Summary(s) => W::Summary(v1::Summary {
            count: s.count,
            sum: s.sum,
            quantiles: s
                .quantiles
                .iter()
                .map(|&(quantile, value)| v1::Quantile { quantile, value })
                .collect(),
        }),
        Value::Histogram(h) => W::Histogram(v1::Histogram {
            count: h.count,
            sum: h.sum,
            buckets: h
                .buckets
                .iter()
                .map(|&(upper_bound, cumulative_count)| v1::Bucket {
                    upper_bound,
                    cumulative_count,
                })
                .collect(),
        }),
        Value::Stale => W::Stale(v1::Stale {}),
    };
    v1::Point {
        timestamp_ms: point.timestamp_ms,
        value: Some(value),
    }
}

/// Why a batch could not be decoded. Every message names where in the batch the problem is.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("{at}: symbol index {index} is out of range (the batch has {len} symbols)")]
    SymbolOutOfRange { at: String, index: u32, len: usize },
    #[error("symbol 0 must be the empty string")]
    FirstSymbolNotEmpty,
    #[error("{at}: labels must be name/value index pairs, got an odd count ({count})")]
    OddLabelCount { at: String, count: usize },
    #[error("{at}: invalid metric name {name:?} (expected [a-zA-Z_:][a-zA-Z0-9_:]*)")]
    BadMetricName { at: String, name: String },
    #[error(
        "{at}: invalid label name {name:?} (expected [a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"
    )]
    BadLabelName { at: String, name: String },
    #[error("{at}: label {name:?} appears twice")]
    DuplicateLabel { at: String, name: String },
    #[error("{at}: {count} labels, more than the limit of {MAX_LABELS_PER_SERIES}")]
    TooManyLabels { at: String, count: usize },
    #[error("{at}: unknown metric type {value}")]
    UnknownType { at: String, value: i32 },
    #[error("{at}: point has no value")]
    MissingValue { at: String },
    #[error("{at}: a {kind} family carries a {value} value")]
    TypeMismatch {
        at: String,
        kind: &'static str,
        value: &'static str,
    },
    #[error("{at}: quantile {quantile} is outside [0, 1]")]
    BadQuantile { at: String, quantile: f64 },
    #[error("{at}: histogram buckets must have increasing bounds and non-decreasing counts")]
    BadBuckets { at: String },
    #[error("{at}: timestamp {timestamp_ms} is not a positive Unix time in milliseconds")]
    BadTimestamp { at: String, timestamp_ms: i64 },
    #[error("{at}: family has no series")]
    EmptyFamily { at: String },
    #[error(
        "{at}: the batch expands to more than {MAX_DECODED_LABEL_BYTES} bytes of labels; send smaller batches"
    )]
    TooLarge { at: String },
}

/// A decoded batch: its sequence number, the labels common to all series, and families whose
/// points carry the full label set (common labels merged in).
#[derive(Debug, PartialEq)]
pub struct DecodedBatch {
    pub sequence: u64,
    pub common_labels: Labels,
    pub families: Vec<Family>,
}

impl DecodedBatch {
    pub fn sample_count(&self) -> usize {
        self.families.iter().map(Family::sample_count).sum()
    }
}

/// Decodes and validates a wire batch.
pub fn decode_batch(batch: &v1::Batch) -> Result<DecodedBatch, DecodeError> {
    decode_flat_batch(&FlatBatch::of(batch))
}

/// Decodes and validates a batch read in place ([`v1::read_received_batch`]).
pub fn decode_flat_batch(batch: &FlatBatch) -> Result<DecodedBatch, DecodeError> {
    let symbols = batch.symbols();
    if symbols.first().is_some_and(|s| !s.is_empty()) {
        return Err(DecodeError::FirstSymbolNotEmpty);
    }
    let symbol = |at: &dyn Fn() -> String, index: u32| symbol_at(symbols, at, index);
    // Whether each symbol is a valid label name, checked the first time it is used as one:
    // every series repeats the same few names.
    let name_checked: Vec<std::cell::Cell<Option<bool>>> = (0..symbols.len())
        .map(|_| std::cell::Cell::new(None))
        .collect();
    let valid_label_name = |index: u32, name: &str| {
        let checked = &name_checked[index as usize];
        checked.get().unwrap_or_else(|| {
            let valid = is_valid_label_name(name) && !name.starts_with("__");
            checked.set(Some(valid));
            valid
        })
    };
    let labels_of =
        |at: &dyn Fn() -> String, pairs: &[u32], into: &mut Labels| -> Result<(), DecodeError> {
            if !pairs.len().is_multiple_of(2) {
                return Err(DecodeError::OddLabelCount {
                    at: at(),
                    count: pairs.len(),
                });
            }
            // Checked before inserting: each insert into the sorted set is linear.
            if into.len() + pairs.len() / 2 > MAX_LABELS_PER_SERIES {
                return Err(DecodeError::TooManyLabels {
                    at: at(),
                    count: into.len() + pairs.len() / 2,
                });
            }
            for pair in pairs.chunks_exact(2) {
                let name = symbol(at, pair[0])?;
                let value = symbol(at, pair[1])?;
                if !valid_label_name(pair[0], name) {
                    return Err(DecodeError::BadLabelName {
                        at: at(),
                        name: name.to_owned(),
                    });
                }
                if into.contains(name) {
                    return Err(DecodeError::DuplicateLabel {
                        at: at(),
                        name: name.to_owned(),
                    });
                }
                into.insert(name, value);
            }
            Ok(())
        };

    let mut common_labels = Labels::new();
    labels_of(
        &|| "common labels".to_owned(),
        batch.common_labels(),
        &mut common_labels,
    )?;

    let mut decoded_label_bytes = 0usize;
    let mut families = Vec::with_capacity(batch.families().len());
    for (fi, wf) in batch.families().iter().enumerate() {
        let (name, kind, help) = family_header(batch, fi, wf)?;
        let mut family = Family::new(name, kind, help);
        for (si, ws) in batch.series(wf).iter().enumerate() {
            let series_at = || format!("family {name:?} series #{si}");
            let (pairs, points) = (batch.labels(ws), batch.points(ws));
            // Sized up front (one allocation each for text and offsets): the series' labels
            // are added one by one.
            let series_bytes = pairs
                .iter()
                .map(|&i| symbols.get(i as usize).map_or(0, |s| s.len()))
                .fold(0usize, usize::saturating_add);
            let mut labels = common_labels.clone_with_room(pairs.len() / 2, series_bytes);
            labels_of(&series_at, pairs, &mut labels)?;
            let label_bytes = labels.byte_len();
            decoded_label_bytes =
                decoded_label_bytes.saturating_add(label_bytes.saturating_mul(points.len()));
            if decoded_label_bytes > MAX_DECODED_LABEL_BYTES {
                return Err(DecodeError::TooLarge { at: series_at() });
            }
            for (pi, wp) in points.iter().enumerate() {
                // The last point takes the label set itself; most series have one point.
                let labels = if pi + 1 == points.len() {
                    std::mem::take(&mut labels)
                } else {
                    labels.clone()
                };
                family.points.push(Point {
                    labels,
                    timestamp_ms: wp.timestamp_ms,
                    value: decode_value(&series_at, kind, batch, wp)?,
                });
            }
        }
        families.push(family);
    }
    Ok(DecodedBatch {
        sequence: batch.sequence,
        common_labels,
        families,
    })
}

/// Validates a wire batch exactly as [`decode_batch`] does — the same checks in the same
/// order, so the same error for a bad batch — without building its families, and returns
/// its sample count ([`DecodedBatch::sample_count`]).
pub fn validate_batch(batch: &v1::Batch) -> Result<usize, DecodeError> {
    validate_flat_batch(&FlatBatch::of(batch))
}

/// [`validate_batch`] for a batch read in place ([`v1::read_received_batch`]).
///
/// For a receiver that passes batches on as they are (the aggregator relaying to remote write
/// with nothing else needing the decoded samples), the decode's label sets are pure cost.
pub fn validate_flat_batch(batch: &FlatBatch) -> Result<usize, DecodeError> {
    let symbols = batch.symbols();
    if symbols.first().is_some_and(|s| !s.is_empty()) {
        return Err(DecodeError::FirstSymbolNotEmpty);
    }
    let mut label_check = LabelCheck {
        symbols,
        name_checked: vec![None; symbols.len()],
    };
    // The label names of the series being checked (common labels first), for duplicates.
    let mut names: Vec<&str> = Vec::new();

    let mut common_bytes = 0usize;
    label_check.check(
        &|| "common labels".to_owned(),
        batch.common_labels(),
        &mut names,
        &mut common_bytes,
    )?;
    let common_count = names.len();

    let mut decoded_label_bytes = 0usize;
    let mut samples = 0usize;
    for (fi, wf) in batch.families().iter().enumerate() {
        let (name, kind, _) = family_header(batch, fi, wf)?;
        for (si, ws) in batch.series(wf).iter().enumerate() {
            let series_at = || format!("family {name:?} series #{si}");
            names.truncate(common_count);
            let mut label_bytes = common_bytes;
            label_check.check(&series_at, batch.labels(ws), &mut names, &mut label_bytes)?;
            let points = batch.points(ws);
            decoded_label_bytes =
                decoded_label_bytes.saturating_add(label_bytes.saturating_mul(points.len()));
            if decoded_label_bytes > MAX_DECODED_LABEL_BYTES {
                return Err(DecodeError::TooLarge { at: series_at() });
            }
            for wp in points {
                samples += check_value(&series_at, kind, batch, wp)?;
            }
        }
    }
    Ok(samples)
}

/// The checks of [`validate_flat_batch`] that depend on points' timestamps and values
/// (timestamps after the epoch, a value of the family's type, histogram buckets in order and
/// within the count), for a batch read by [`FlatBatch::parse_skeleton`] whose skeleton was
/// that of a batch that passed [`validate_flat_batch`]: together they are its checks. Returns
/// the sample count, or `None` if a point fails (read the batch in full then, for the error).
pub fn validate_points(batch: &FlatBatch) -> Option<usize> {
    let no_place = || String::new();
    let mut samples = 0usize;
    for family in batch.families() {
        let kind = metric_type(family.r#type)?;
        for series in batch.series(family) {
            for point in batch.points(series) {
                samples += check_value(&no_place, kind, batch, point).ok()?;
            }
        }
    }
    Some(samples)
}

/// A family's name, type and help, checked (`fi` is its position in the batch).
fn family_header<'b>(
    batch: &'b FlatBatch,
    fi: usize,
    wf: &FlatFamily,
) -> Result<(&'b str, MetricType, &'b str), DecodeError> {
    let symbols = batch.symbols();
    let name = symbol_at(symbols, &|| format!("family #{fi}"), wf.name)?;
    let family_at = || format!("family {name:?}");
    if !is_valid_metric_name(name) {
        return Err(DecodeError::BadMetricName {
            at: format!("family #{fi}"),
            name: name.to_owned(),
        });
    }
    let kind = metric_type(wf.r#type).ok_or_else(|| DecodeError::UnknownType {
        at: family_at(),
        value: wf.r#type,
    })?;
    if batch.series(wf).is_empty() {
        return Err(DecodeError::EmptyFamily { at: family_at() });
    }
    let help = symbol_at(symbols, &family_at, wf.help)?;
    Ok((name, kind, help))
}

/// The value of common label `name` in a wire batch, if it has one.
pub fn common_label<'b>(batch: &'b FlatBatch, name: &str) -> Option<&'b str> {
    let symbol = |index: u32| batch.symbols().get(index as usize).map(|s| s.as_ref());
    batch
        .common_labels()
        .chunks_exact(2)
        .find(|pair| symbol(pair[0]) == Some(name))
        .and_then(|pair| symbol(pair[1]))
}

fn symbol_at<'b>(
    symbols: &'b [Cow<'_, str>],
    at: &dyn Fn() -> String,
    index: u32,
) -> Result<&'b str, DecodeError> {
    symbols
        .get(index as usize)
        .map(|s| s.as_ref())
        .ok_or_else(|| DecodeError::SymbolOutOfRange {
            at: at(),
            index,
            len: symbols.len(),
        })
}

/// [`validate_batch`]'s label checks: those of `decode_batch`'s `labels_of`, on names
/// collected in a list instead of a label set.
struct LabelCheck<'b, 'a> {
    symbols: &'b [Cow<'a, str>],
    /// Whether each symbol is a valid label name, checked the first time it is used as one.
    name_checked: Vec<Option<bool>>,
}

impl<'b> LabelCheck<'b, '_> {
    /// Checks `pairs` against the names already in `names` and adds them; `bytes` grows by
    /// the label text a decoded label set would hold.
    fn check(
        &mut self,
        at: &dyn Fn() -> String,
        pairs: &[u32],
        names: &mut Vec<&'b str>,
        bytes: &mut usize,
    ) -> Result<(), DecodeError> {
        if !pairs.len().is_multiple_of(2) {
            return Err(DecodeError::OddLabelCount {
                at: at(),
                count: pairs.len(),
            });
        }
        if names.len() + pairs.len() / 2 > MAX_LABELS_PER_SERIES {
            return Err(DecodeError::TooManyLabels {
                at: at(),
                count: names.len() + pairs.len() / 2,
            });
        }
        for pair in pairs.chunks_exact(2) {
            let name = symbol_at(self.symbols, at, pair[0])?;
            let value = symbol_at(self.symbols, at, pair[1])?;
            // In range: `symbol_at` just found it.
            let checked = &mut self.name_checked[pair[0] as usize];
            let valid = *checked
                .get_or_insert_with(|| is_valid_label_name(name) && !name.starts_with("__"));
            if !valid {
                return Err(DecodeError::BadLabelName {
                    at: at(),
                    name: name.to_owned(),
                });
            }
            // At most MAX_LABELS_PER_SERIES names: a scan costs no more than a set would.
            if names.contains(&name) {
                return Err(DecodeError::DuplicateLabel {
                    at: at(),
                    name: name.to_owned(),
                });
            }
            names.push(name);
            *bytes += name.len() + value.len();
        }
        Ok(())
    }
}

/// The model's type for a wire type number, `None` for one this build does not know.
pub fn metric_type(wire: i32) -> Option<MetricType> {
    match v1::MetricType::try_from(wire).ok()? {
        v1::MetricType::Unspecified => Some(MetricType::Untyped),
        v1::MetricType::Gauge => Some(MetricType::Gauge),
        v1::MetricType::Counter => Some(MetricType::Counter),
        v1::MetricType::Summary => Some(MetricType::Summary),
        v1::MetricType::Histogram => Some(MetricType::Histogram),
    }
}

/// A point's value as the model holds it, checked against its family's type (`kind`), for a
/// reader that walks a batch in place instead of decoding it ([`decode_flat_batch`]).
pub fn point_value(
    batch: &FlatBatch,
    kind: MetricType,
    point: &FlatPoint,
) -> Result<Value, DecodeError> {
    decode_value(&|| "point".to_owned(), kind, batch, point)
}

/// A point's value, checked against its family's type. The checks are those of
/// [`check_value`], which [`validate_flat_batch`] uses instead.
fn decode_value(
    at: &dyn Fn() -> String,
    kind: MetricType,
    batch: &FlatBatch,
    point: &FlatPoint,
) -> Result<Value, DecodeError> {
    check_value(at, kind, batch, point)?;
    Ok(match point.value() {
        // Refused by `check_value` above.
        None => return Err(DecodeError::MissingValue { at: at() }),
        Some(FlatValue::Stale) => Value::Stale,
        Some(FlatValue::Number(v)) => Value::Number(v),
        Some(FlatValue::Summary {
            count,
            sum,
            quantiles,
        }) => Value::Summary(Summary {
            count,
            sum,
            quantiles: batch.quantiles(quantiles).collect(),
        }),
        Some(FlatValue::Histogram {
            count,
            sum,
            buckets,
        }) => Value::Histogram(Histogram {
            count,
            sum,
            buckets: batch.buckets(buckets).collect(),
        }),
    })
}

/// Checks a point's timestamp and value against its family's type; returns the samples
/// its value expands to ([`Value::sample_count`]).
fn check_value(
    at: &dyn Fn() -> String,
    kind: MetricType,
    batch: &FlatBatch,
    point: &FlatPoint,
) -> Result<usize, DecodeError> {
    if point.timestamp_ms <= 0 {
        return Err(DecodeError::BadTimestamp {
            at: at(),
            timestamp_ms: point.timestamp_ms,
        });
    }
    let mismatch = |value: &'static str| DecodeError::TypeMismatch {
        at: at(),
        kind: kind.as_str(),
        value,
    };
    match point.value() {
        None => Err(DecodeError::MissingValue { at: at() }),
        Some(FlatValue::Stale) => Ok(Value::Stale.sample_count()),
        Some(FlatValue::Number(v)) => match kind {
            MetricType::Summary | MetricType::Histogram => Err(mismatch("number")),
            _ => Ok(Value::Number(v).sample_count()),
        },
        Some(FlatValue::Summary { quantiles, .. }) => {
            if kind != MetricType::Summary {
                return Err(mismatch("summary"));
            }
            if let Some((quantile, _)) = batch
                .quantiles(quantiles)
                .find(|(q, _)| !(0.0..=1.0).contains(q))
            {
                return Err(DecodeError::BadQuantile { at: at(), quantile });
            }
            // As `Value::sample_count` counts them (the batch_decode fuzz target compares).
            Ok(quantiles.len() + 2)
        }
        Some(FlatValue::Histogram { count, buckets, .. }) => {
            if kind != MetricType::Histogram {
                return Err(mismatch("histogram"));
            }
            let mut previous: Option<(f64, u64)> = None;
            for (bound, cumulative) in batch.buckets(buckets) {
                let ordered = previous.is_none_or(|(b, c)| b < bound && c <= cumulative);
                if !ordered || cumulative > count || bound.is_nan() {
                    return Err(DecodeError::BadBuckets { at: at() });
                }
                previous = Some((bound, cumulative));
            }
            Ok(buckets.len() + 3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flink_latency_summary() -> Family {
        let mut f = Family::new(
            "flink_taskmanager_job_latency_source_id_operator_id_operator_subtask_index_latency",
            MetricType::Summary,
            "latency",
        );
        let quantiles = [0.0, 0.5, 0.75, 0.95, 0.98, 0.99, 0.999, 1.0];
        f.points.push(Point {
            labels: Labels::from_pairs([("job_name", "risk scoring"), ("subtask", "0")]),
            timestamp_ms: 1_700_000_000_123,
            value: Value::Summary(Summary {
                count: 42,
                sum: 0.0,
                quantiles: quantiles.iter().map(|&q| (q, q * 20.0)).collect(),
            }),
        });
        f
    }

    fn sample_families() -> Vec<Family> {
        let mut cpu = Family::new("host_cpu_usage_ratio", MetricType::Gauge, "CPU busy");
        for round in 0..3 {
            for core in 0..4 {
                cpu.push(
                    Labels::from_pairs([("cpu", core.to_string())]),
                    1_700_000_000_000 + round * 10_000,
                    0.25 * core as f64,
                );
            }
        }
        let mut bytes = Family::new("host_network_receive_bytes_total", MetricType::Counter, "");
        bytes.push(
            Labels::from_pairs([("device", "eth0")]),
            1_700_000_000_000,
            1e12,
        );
        bytes.points.push(Point {
            labels: Labels::from_pairs([("device", "wlan0")]),
            timestamp_ms: 1_700_000_010_000,
            value: Value::Stale,
        });
        let mut hist = Family::new("rpc_seconds", MetricType::Histogram, "h");
        hist.points.push(Point {
            labels: Labels::new(),
            timestamp_ms: 1_700_000_000_000,
            value: Value::Histogram(Histogram {
                count: 10,
                sum: 2.5,
                buckets: vec![(0.1, 2), (1.0, 9)],
            }),
        });
        vec![cpu, bytes, flink_latency_summary(), hist]
    }

    fn with_common(families: &[Family], common: &Labels) -> Vec<Family> {
        families
            .iter()
            .map(|f| {
                let mut f = f.clone();
                for p in &mut f.points {
                    for (n, v) in common.iter() {
                        p.labels.insert(n, v);
                    }
                }
                f
            })
            .collect()
    }

    #[test]
    fn round_trip_preserves_every_point() {
        let common = Labels::from_pairs([("instance", "pi-07"), ("site", "lab")]);
        let families = sample_families();
        let mut encoder = BatchEncoder::new(&common);
        for f in &families {
            encoder.push(f);
        }
        let samples = encoder.sample_count();
        let batch = encoder.finish(7);
        let decoded = decode_batch(&batch).expect("valid batch");
        assert_eq!(decoded.sequence, 7);
        assert_eq!(decoded.common_labels, common);
        // Points come back grouped by series; within a series their order is kept.
        let by_series = |families: Vec<Family>| -> Vec<Family> {
            families
                .into_iter()
                .map(|mut f| {
                    f.points.sort_by(|a, b| a.labels.cmp(&b.labels));
                    f
                })
                .collect()
        };
        assert_eq!(
            by_series(decoded.families.clone()),
            by_series(with_common(&families, &common))
        );
        assert_eq!(decoded.sample_count(), samples);
    }

    #[test]
    fn repeated_rounds_share_symbols_and_series() {
        let families = sample_families();
        let mut encoder = BatchEncoder::new(&Labels::from_pairs([("instance", "a")]));
        encoder.push(&families[0]);
        let batch = encoder.finish(1);
        // 3 rounds x 4 cores: 4 series with 3 points each, label strings stored once.
        assert_eq!(batch.families.len(), 1);
        assert_eq!(batch.families[0].series.len(), 4);
        assert!(batch.families[0].series.iter().all(|s| s.points.len() == 3));
        let cpu_symbols = batch.symbols.iter().filter(|s| *s == "cpu").count();
        assert_eq!(cpu_symbols, 1);
    }

    fn valid_batch() -> v1::Batch {
        let mut encoder = BatchEncoder::new(&Labels::from_pairs([("instance", "a")]));
        for f in sample_families() {
            encoder.push(&f);
        }
        encoder.finish(1)
    }

    #[test]
    fn rejects_out_of_range_symbols() {
        let mut batch = valid_batch();
        batch.families[0].series[0].labels[1] = 9999;
        let err = decode_batch(&batch).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::SymbolOutOfRange { index: 9999, .. }
        ));
        assert!(err.to_string().contains("host_cpu_usage_ratio"), "{err}");
    }

    #[test]
    fn rejects_odd_labels_bad_names_and_duplicates() {
        let mut batch = valid_batch();
        batch.families[0].series[0].labels.push(1);
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::OddLabelCount { .. })
        ));

        let mut batch = valid_batch();
        batch.symbols.push("bad-name".into());
        let idx = batch.symbols.len() as u32 - 1;
        batch.families[0].series[0].labels.extend([idx, idx]);
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::BadLabelName { .. })
        ));

        // "instance" is a common label; a series may not set it again.
        let mut batch = valid_batch();
        let common = batch.common_labels.clone();
        batch.families[0].series[0].labels.extend(common);
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::DuplicateLabel { .. })
        ));
    }

    #[test]
    fn rejects_type_mismatch_and_bad_values() {
        let mut batch = valid_batch();
        batch.families[0].r#type = v1::MetricType::Summary as i32;
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::TypeMismatch { .. })
        ));

        let mut batch = valid_batch();
        batch.families[0].r#type = 99;
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::UnknownType { value: 99, .. })
        ));

        let mut batch = valid_batch();
        batch.families[0].series[0].points[0].value = None;
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::MissingValue { .. })
        ));

        let mut batch = valid_batch();
        batch.families[0].series[0].points[0].timestamp_ms = 0;
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::BadTimestamp { .. })
        ));

        let mut batch = valid_batch();
        if let Some(v1::point::Value::Histogram(h)) =
            &mut batch.families[3].series[0].points[0].value
        {
            h.buckets.swap(0, 1);
        }
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::BadBuckets { .. })
        ));

        let mut batch = valid_batch();
        if let Some(v1::point::Value::Summary(s)) = &mut batch.families[2].series[0].points[0].value
        {
            s.quantiles[0].quantile = 1.5;
        }
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::BadQuantile { .. })
        ));
    }

    #[test]
    fn rejects_batches_that_would_expand_beyond_the_budget() {
        // 1 MiB of label value times 100 points: small on the wire, 100 MiB decoded.
        let mut f = Family::new("m", MetricType::Gauge, "");
        let labels = Labels::from_pairs([("big", "x".repeat(1024 * 1024))]);
        for ts in 1..=100 {
            f.push(labels.clone(), ts, 1.0);
        }
        let mut encoder = BatchEncoder::new(&Labels::new());
        encoder.push(&f);
        let batch = encoder.finish(1);
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::TooLarge { .. })
        ));

        let mut batch = valid_batch();
        let symbols = batch.symbols.len() as u32;
        batch.families[0].series[0].labels = vec![1; MAX_LABELS_PER_SERIES * 2];
        assert!(symbols > 1);
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::TooManyLabels { .. })
        ));
    }

    #[test]
    fn rejects_bad_metric_name_and_first_symbol() {
        let mut batch = valid_batch();
        let name = batch.families[0].name as usize;
        batch.symbols[name] = "9lives".into();
        assert!(matches!(
            decode_batch(&batch),
            Err(DecodeError::BadMetricName { .. })
        ));

        let mut batch = valid_batch();
        batch.symbols[0] = "x".into();
        assert_eq!(decode_batch(&batch), Err(DecodeError::FirstSymbolNotEmpty));
    }
    /// Every kind of bad batch `decode_batch` refuses, plus edge cases it accepts.
    fn odd_batches() -> Vec<(&'static str, v1::Batch)> {
        let mut out = vec![("valid", valid_batch())];
        let mut add = |what: &'static str, change: &dyn Fn(&mut v1::Batch)| {
            let mut batch = valid_batch();
            change(&mut batch);
            out.push((what, batch));
        };
        add("series symbol out of range", &|b| {
            b.families[0].series[0].labels[1] = 9999
        });
        add("common symbol out of range", &|b| b.common_labels[0] = 9999);
        add("family name out of range", &|b| b.families[1].name = 9999);
        add("help out of range", &|b| b.families[1].help = 9999);
        add("odd series labels", &|b| {
            b.families[0].series[0].labels.push(1)
        });
        add("odd common labels", &|b| b.common_labels.push(1));
        add("bad label name", &|b| {
            b.symbols.push("bad-name".into());
            let idx = b.symbols.len() as u32 - 1;
            b.families[0].series[1].labels.extend([idx, idx]);
        });
        add("reserved label name", &|b| {
            b.symbols.push("__name__".into());
            let idx = b.symbols.len() as u32 - 1;
            b.common_labels.extend([idx, idx]);
        });
        add("duplicate of a common label", &|b| {
            let common = b.common_labels.clone();
            b.families[0].series[0].labels.extend(common);
        });
        add("duplicate within a series", &|b| {
            let own = b.families[0].series[2].labels.clone();
            b.families[0].series[2].labels.extend(own);
        });
        add("empty label value", &|b| {
            b.families[0].series[0].labels.extend([1, 0]);
            b.symbols[1] = "zone".into();
        });
        add("type mismatch", &|b| {
            b.families[0].r#type = v1::MetricType::Summary as i32
        });
        add("unknown type", &|b| b.families[0].r#type = 99);
        add("missing value", &|b| {
            b.families[0].series[0].points[0].value = None
        });
        add("zero timestamp", &|b| {
            b.families[1].series[0].points[0].timestamp_ms = 0
        });
        add("unordered buckets", &|b| {
            if let Some(v1::point::Value::Histogram(h)) =
                &mut b.families[3].series[0].points[0].value
            {
                h.buckets.swap(0, 1);
            }
        });
        add("quantile above 1", &|b| {
            if let Some(v1::point::Value::Summary(s)) = &mut b.families[2].series[0].points[0].value
            {
                s.quantiles[0].quantile = 1.5;
            }
        });
        add("too many labels", &|b| {
            b.families[0].series[0].labels = vec![1; MAX_LABELS_PER_SERIES * 2]
        });
        add("bad metric name", &|b| {
            let name = b.families[0].name as usize;
            b.symbols[name] = "9lives".into();
        });
        add("first symbol not empty", &|b| b.symbols[0] = "x".into());
        add("empty family", &|b| b.families[1].series.clear());
        add("series without points", &|b| {
            b.families[0].series[0].points.clear()
        });
        add("two errors: the first one wins", &|b| {
            b.families[0].series[0].points[0].value = None;
            b.families[2].r#type = 99;
        });
        // Over the decoded-size budget: 1 MiB of label value times 100 points.
        let mut f = Family::new("m", MetricType::Gauge, "");
        let labels = Labels::from_pairs([("big", "x".repeat(1024 * 1024))]);
        for ts in 1..=100 {
            f.push(labels.clone(), ts, 1.0);
        }
        let mut encoder = BatchEncoder::new(&Labels::from_pairs([("instance", "a")]));
        encoder.push(&f);
        out.push(("too large decoded", encoder.finish(1)));
        out
    }

    #[test]
    fn validation_alone_agrees_with_the_full_decode() {
        let batches = odd_batches();
        let refused = batches
            .iter()
            .filter(|(_, b)| decode_batch(b).is_err())
            .count();
        assert!(
            refused >= 20,
            "the cases must exercise the errors: {refused}"
        );
        for (what, batch) in &batches {
            let decoded = decode_batch(batch).map(|d| d.sample_count());
            assert_eq!(validate_batch(batch), decoded, "{what}");
        }
        assert_eq!(
            validate_batch(&valid_batch()),
            Ok(4 * 3 + 2 + (8 + 2) + (2 + 3)),
            "12 cpu points, 2 counter points, a summary of 8 quantiles, a 2-bucket histogram"
        );
    }

    #[test]
    fn common_label_reads_the_wire_batch() {
        let batch = valid_batch();
        assert_eq!(common_label(&FlatBatch::of(&batch), "instance"), Some("a"));
        assert_eq!(common_label(&FlatBatch::of(&batch), "cpu"), None);
    }
}

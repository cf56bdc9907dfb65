//! `picket.v1.Batch` read in place: [`FlatBatch`] keeps the batch's nested lists (families,
//! their series, their label indices and points, summaries' quantiles and histograms'
//! buckets) in one array each and borrows its strings from the bytes it was read from.
//!
//! The aggregator reads every batch twice, at ingest to check it and in each queue-fed sink
//! to encode it, and prost's [`v1::Batch`] costs an allocation per symbol, per series and per point
//! list: most of the relay's allocator time. A `FlatBatch` costs a handful of allocations
//! per batch, whatever its size.
//!
//! Most batches need even less: an agent sends the same series round after round, so a batch
//! usually differs from one read before only in its timestamps and values.
//! [`FlatBatch::parse_skeleton`] reads just the points and copies the rest, undecoded, into the
//! batch's *skeleton*; where that skeleton equals one whose batch was read in full and
//! checked, the check and whatever was derived from the labels carry over.
//!
//! [`FlatBatch::parse`] reads the encoding agents write (any field order, packed or unpacked
//! label lists, unknown fields skipped) and gives up, with `None`, on anything unusual: a
//! group, a point whose value is set twice (which protobuf merges), a wrong wire type, a
//! malformed varint. Whatever it accepts, prost reads the same way; the `flat_batch` fuzz
//! target holds it to that. Callers fall back to prost for what it refuses
//! ([`crate::v1::read_received_batch`]), so it never decides whether a batch is valid.
//!
//! Adding a field to `Batch` or a message inside it: [`FlatBatch::of`] stops compiling
//! until the field is handled there, and [`FlatBatch::parse`] must read it too (it would
//! otherwise skip it as unknown). Whatever `Reader` decodes from it must also go into the
//! skeleton (a token, unless it is a timestamp or value): nothing checks that but the
//! skeleton tests, and a field left out would let two batches that differ in it share a
//! skeleton.

use std::borrow::Cow;

use crate::v1;

mod template;

pub use template::BatchTemplate;
use template::{Hole, HoleKind};

// Protobuf wire types (`prost::encoding::WireType`, as the numbers in a key).
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A run of entries in one of a [`FlatBatch`]'s arrays. Only meaningful for the batch it
/// came from: another batch's accessors would read other entries, or panic.
///
/// Counted in 32 bits, which halves the arrays of series and shrinks those of points (kept
/// per stream and per label-cache shape in a `BatchTemplate`): every entry takes at least a
/// byte of the batch, the reading refuses a batch of 4 GiB or more, and the aggregator's
/// `grpc.max_message_bytes` (which bounds what prost reads) is below that.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn new(start: usize, end: usize) -> Self {
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    fn starting_at(start: usize) -> Self {
        Span::new(start, start)
    }

    fn end_at(&mut self, end: usize) {
        self.end = end as u32;
    }

    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }

    pub fn len(self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(self) -> bool {
        self.start == self.end
    }
}

/// A `picket.v1.Batch` with its lists flattened. Floats are kept as their bits, so two
/// readings compare equal exactly when they hold the same values (NaNs included).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlatBatch<'a> {
    pub sequence: u64,
    symbols: Vec<Cow<'a, str>>,
    common_labels: Vec<u32>,
    families: Vec<FlatFamily>,
    series: Vec<FlatSeries>,
    labels: Vec<u32>,
    points: Vec<FlatPoint>,
    /// Quantiles as (quantile, value) and buckets as (upper bound, cumulative count), as bits.
    pairs: Vec<[u64; 2]>,
}

/// `picket.v1.Family`; its series are [`FlatBatch::series`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlatFamily {
    /// Symbol index.
    pub name: u32,
    /// `MetricType` as sent (any value: the enum is open).
    pub r#type: i32,
    /// Symbol index; 0 means no help text.
    pub help: u32,
    series: Span,
}

/// `picket.v1.Series`; see [`FlatBatch::labels`] and [`FlatBatch::points`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlatSeries {
    labels: Span,
    points: Span,
}

/// `picket.v1.Point`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlatPoint {
    pub timestamp_ms: i64,
    value: Option<StoredValue>,
}

/// `Point.value` as stored: floats as bits, for exact comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoredValue {
    Number(u64),
    Summary {
        count: u64,
        sum: u64,
        quantiles: Span,
    },
    Histogram {
        count: u64,
        sum: u64,
        buckets: Span,
    },
    Stale,
}

/// `Point.value`. Quantiles and buckets are read with [`FlatBatch::quantiles`] and
/// [`FlatBatch::buckets`].
#[derive(Clone, Copy, Debug)]
pub enum FlatValue {
    Number(f64),
    Summary {
        count: u64,
        sum: f64,
        quantiles: Span,
    },
    Histogram {
        count: u64,
        sum: f64,
        buckets: Span,
    },
    Stale,
}

impl FlatPoint {
    pub fn value(&self) -> Option<FlatValue> {
        Some(match self.value? {
            StoredValue::Number(bits) => FlatValue::Number(f64::from_bits(bits)),
            StoredValue::Summary {
                count,
                sum,
                quantiles,
            } => FlatValue::Summary {
                count,
                sum: f64::from_bits(sum),
                quantiles,
            },
            StoredValue::Histogram {
                count,
                sum,
                buckets,
            } => FlatValue::Histogram {
                count,
                sum: f64::from_bits(sum),
                buckets,
            },
            StoredValue::Stale => FlatValue::Stale,
        })
    }
}

impl<'a> FlatBatch<'a> {
    /// The symbol table.
    pub fn symbols(&self) -> &[Cow<'a, str>] {
        &self.symbols
    }

    /// Label index pairs common to every series.
    pub fn common_labels(&self) -> &[u32] {
        &self.common_labels
    }

    pub fn families(&self) -> &[FlatFamily] {
        &self.families
    }

    pub fn series(&self, family: &FlatFamily) -> &[FlatSeries] {
        &self.series[family.series.range()]
    }

    /// The series' label index pairs.
    pub fn labels(&self, series: &FlatSeries) -> &[u32] {
        &self.labels[series.labels.range()]
    }

    /// Points in all series of all families.
    pub fn point_count(&self) -> usize {
        self.points.len()
    }

    pub fn points(&self, series: &FlatSeries) -> &[FlatPoint] {
        &self.points[series.points.range()]
    }

    /// A summary's (quantile, value) pairs.
    pub fn quantiles(&self, quantiles: Span) -> impl ExactSizeIterator<Item = (f64, f64)> + '_ {
        self.pairs[quantiles.range()]
            .iter()
            .map(|&[q, v]| (f64::from_bits(q), f64::from_bits(v)))
    }

    /// A histogram's (upper bound, cumulative count) pairs.
    pub fn buckets(&self, buckets: Span) -> impl ExactSizeIterator<Item = (f64, u64)> + '_ {
        self.pairs[buckets.range()]
            .iter()
            .map(|&[bound, count]| (f64::from_bits(bound), count))
    }

    /// Reads a batch's encoding in place, or `None` where it is unusual enough to leave to
    /// prost (see the module documentation): a `None` says nothing about validity.
    pub fn parse(bytes: &'a [u8]) -> Option<FlatBatch<'a>> {
        let mut reader = Reader::new(bytes, true);
        reader.parse(bytes)?;
        Some(reader.batch)
    }

    /// Reads only what changes from round to round, the points, and writes everything else
    /// into `skeleton` (cleared first): a batch's *skeleton*. The batch returned has the
    /// families, series, points, quantiles and buckets [`FlatBatch::parse`] would give, but
    /// no symbols, common labels or series labels, which stay undecoded in the skeleton.
    ///
    /// Two batches with equal skeletons read the same in everything but their sequence and
    /// their points' timestamps and values (and help texts' and labels' bytes are the same),
    /// so whatever was derived and checked from one batch's symbols and labels holds for the
    /// other: the aggregator validates an agent's batch in full only when its skeleton
    /// changes, and the remote-write sink replays the label sets it encoded for a skeleton.
    ///
    /// It refuses (`None`) what [`FlatBatch::parse`] refuses in the batch's structure and
    /// points, but reads symbols and label lists only as bytes: invalid UTF-8 or a malformed
    /// label varint passes here. So a skeleton must have been read in full once (and pass
    /// whatever the caller checks) before anything is taken from it; one only ever compared
    /// with such skeletons needs no more.
    pub fn parse_skeleton(bytes: &'a [u8], skeleton: &mut Vec<u8>) -> Option<FlatBatch<'a>> {
        skeleton.clear();
        let mut reader = Reader::new(bytes, false);
        reader.skeleton = Some(skeleton);
        reader.parse(bytes)?;
        Some(reader.batch)
    }

    /// The batch as [`FlatBatch::parse_skeleton`] reads it: without symbols, common labels
    /// or series labels (for comparing the two readings).
    pub fn without_labels(mut self) -> FlatBatch<'a> {
        self.symbols.clear();
        self.common_labels.clear();
        self.labels.clear();
        for series in &mut self.series {
            series.labels = Span::default();
        }
        self
    }

    /// The reading without symbols and labels, which own nothing of the bytes it was read
    /// from: points, with the families and series they are in.
    fn into_points_only(self) -> FlatBatch<'static> {
        let FlatBatch {
            sequence,
            families,
            mut series,
            points,
            pairs,
            ..
        } = self;
        for series in &mut series {
            series.labels = Span::default();
        }
        FlatBatch {
            sequence,
            symbols: Vec::new(),
            common_labels: Vec::new(),
            families,
            series,
            labels: Vec::new(),
            points,
            pairs,
        }
    }

    /// Gives back the arrays' spare capacity.
    fn shrink_to_fit(&mut self) {
        self.symbols.shrink_to_fit();
        self.common_labels.shrink_to_fit();
        self.families.shrink_to_fit();
        self.series.shrink_to_fit();
        self.labels.shrink_to_fit();
        self.points.shrink_to_fit();
        self.pairs.shrink_to_fit();
    }

    /// Heap bytes held by the reading's arrays (not the strings it borrows).
    pub fn heap_bytes(&self) -> usize {
        self.symbols.capacity() * size_of::<Cow<'a, str>>()
            + (self.common_labels.capacity() + self.labels.capacity()) * size_of::<u32>()
            + self.families.capacity() * size_of::<FlatFamily>()
            + self.series.capacity() * size_of::<FlatSeries>()
            + self.points.capacity() * size_of::<FlatPoint>()
            + self.pairs.capacity() * size_of::<[u64; 2]>()
    }

    /// A batch prost decoded, borrowing its strings.
    pub fn of(batch: &'a v1::Batch) -> FlatBatch<'a> {
        let v1::Batch {
            sequence,
            symbols,
            common_labels,
            families,
        } = batch;
        let symbols = symbols.iter().map(|s| Cow::Borrowed(s.as_str())).collect();
        FlatBatch::flatten(*sequence, symbols, common_labels, families)
    }

    /// Flattens the lists under the symbol table. Every message is taken apart field by
    /// field, so a field added to the schema does not compile until it is handled here.
    fn flatten(
        sequence: u64,
        symbols: Vec<Cow<'a, str>>,
        common_labels: &[u32],
        families: &[v1::Family],
    ) -> FlatBatch<'a> {
        let mut flat = FlatBatch {
            sequence,
            symbols,
            common_labels: common_labels.to_vec(),
            ..FlatBatch::default()
        };
        for family in families {
            let v1::Family {
                name,
                r#type,
                help,
                series,
            } = family;
            let start = flat.series.len();
            for one in series {
                let v1::Series { labels, points } = one;
                let label_start = flat.labels.len();
                flat.labels.extend_from_slice(labels);
                let point_start = flat.points.len();
                for point in points {
                    let v1::Point {
                        timestamp_ms,
                        value,
                    } = point;
                    let value = value.as_ref().map(|value| flat.store_value(value));
                    flat.points.push(FlatPoint {
                        timestamp_ms: *timestamp_ms,
                        value,
                    });
                }
                flat.series.push(FlatSeries {
                    labels: Span::new(label_start, flat.labels.len()),
                    points: Span::new(point_start, flat.points.len()),
                });
            }
            flat.families.push(FlatFamily {
                name: *name,
                r#type: *r#type,
                help: *help,
                series: Span::new(start, flat.series.len()),
            });
        }
        flat
    }

    fn store_value(&mut self, value: &v1::point::Value) -> StoredValue {
        use v1::point::Value as W;
        match value {
            W::Number(v) => StoredValue::Number(v.to_bits()),
            W::Summary(v1::Summary {
                count,
                sum,
                quantiles,
            }) => {
                let start = self.pairs.len();
                for v1::Quantile { quantile, value } in quantiles {
                    self.pairs.push([quantile.to_bits(), value.to_bits()]);
                }
                StoredValue::Summary {
                    count: *count,
                    sum: sum.to_bits(),
                    quantiles: Span::new(start, self.pairs.len()),
                }
            }
            W::Histogram(v1::Histogram {
                count,
                sum,
                buckets,
            }) => {
                let start = self.pairs.len();
                for v1::Bucket {
                    upper_bound,
                    cumulative_count,
                } in buckets
                {
                    self.pairs.push([upper_bound.to_bits(), *cumulative_count]);
                }
                StoredValue::Histogram {
                    count: *count,
                    sum: sum.to_bits(),
                    buckets: Span::new(start, self.pairs.len()),
                }
            }
            W::Stale(v1::Stale {}) => StoredValue::Stale,
        }
    }
}

impl FlatBatch<'static> {
    /// A batch prost decoded, taking its strings.
    pub fn from_batch(batch: v1::Batch) -> FlatBatch<'static> {
        let v1::Batch {
            sequence,
            symbols,
            common_labels,
            families,
        } = batch;
        let symbols = symbols.into_iter().map(Cow::Owned).collect();
        FlatBatch::flatten(sequence, symbols, &common_labels, &families)
    }
}

/// Reads one batch into `batch`, and with `skeleton` writes its skeleton
/// ([`FlatBatch::parse_skeleton`]) instead of decoding symbols and labels.
///
/// The skeleton is a token per field read, in the order read: the field's key (one byte:
/// every field read has a number below 16), then for a string or packed list its length and
/// bytes, for a varint its bytes as sent, for a message its own tokens and an [`END`] byte,
/// for a quantile or bucket its bound's bits. Timestamps, values, counts, sums and the
/// sequence write nothing; nor do unknown fields, which no reading looks at. Since every
/// token is self-delimiting and a message's end is marked, equal skeletons come from the same
/// fields in the same order with the same contents.
///
/// With `holes`, it also notes where in the bytes each number of the points (and the
/// sequence) was read from, for a [`BatchTemplate`].
struct Reader<'a, 'k> {
    batch: FlatBatch<'a>,
    /// Whether symbols and label lists are decoded into `batch` (else they are only skipped,
    /// or copied into the skeleton).
    labels: bool,
    skeleton: Option<&'k mut Vec<u8>>,
    holes: Option<&'k mut Vec<Hole>>,
    /// The address of the batch's first byte, which holes are counted from.
    base: usize,
}

/// Ends a message's tokens in a skeleton: no field key is 0.
const END: u8 = 0;

impl<'a> Reader<'a, '_> {
    fn new(bytes: &[u8], labels: bool) -> Self {
        Reader {
            batch: FlatBatch::default(),
            labels,
            skeleton: None,
            holes: None,
            base: bytes.as_ptr() as usize,
        }
    }

    /// Reads a number of the points (or the sequence), a varint or a fixed64 as `kind` says,
    /// and with holes wanted notes where it lay. It belongs to the point (or, for a quantile
    /// or bucket, the pair) about to be pushed.
    fn number(&mut self, input: &mut Input<'_>, kind: HoleKind) -> Option<u64> {
        let before = input.0;
        let number = match kind.is_varint() {
            true => input.varint()?,
            false => input.fixed64()?,
        };
        if let Some(holes) = &mut self.holes {
            let index = match kind {
                HoleKind::Sequence => 0,
                HoleKind::QuantileValue | HoleKind::BucketCount => self.batch.pairs.len(),
                _ => self.batch.points.len(),
            };
            holes.push(Hole {
                at: (before.as_ptr() as usize - self.base) as u32,
                index: index as u32,
                len: (before.len() - input.0.len()) as u8,
                kind,
            });
        }
        Some(number)
    }

    /// Adds a field's key to the skeleton.
    fn token(&mut self, tag: u32, wire: u8) {
        if let Some(skeleton) = &mut self.skeleton {
            skeleton.push(((tag << 3) as u8) | wire);
        }
    }

    /// Adds a message's end to the skeleton.
    fn end(&mut self) {
        if let Some(skeleton) = &mut self.skeleton {
            skeleton.push(END);
        }
    }

    /// A varint field read for the batch and kept, as sent, in the skeleton.
    fn varint_field(&mut self, input: &mut Input<'a>, tag: u32) -> Option<u64> {
        let before = input.0;
        let value = input.varint()?;
        if let Some(skeleton) = &mut self.skeleton {
            skeleton.push((tag << 3) as u8 | VARINT);
            skeleton.extend_from_slice(&before[..before.len() - input.0.len()]);
        }
        Some(value)
    }

    /// A length-delimited field of symbols or labels, kept as its bytes in the skeleton;
    /// `true` when the caller must decode it.
    fn raw_field(&mut self, bytes: &[u8], tag: u32) -> bool {
        if let Some(skeleton) = &mut self.skeleton {
            skeleton.push((tag << 3) as u8 | LEN);
            put_varint(skeleton, bytes.len() as u64);
            skeleton.extend_from_slice(bytes);
        }
        self.labels
    }

    fn parse(&mut self, bytes: &'a [u8]) -> Option<()> {
        // Spans count in 32 bits (no gRPC message is this large).
        u32::try_from(bytes.len()).ok()?;
        // Agents' batches take about 35 bytes per point (a series with Flink-like labels and
        // one point): sized for that, the arrays grow once or not at all instead of a dozen
        // times, copying themselves each time.
        let expected = bytes.len() / 32;
        self.batch.series.reserve(expected);
        self.batch.points.reserve(expected);
        let mut input = Input(bytes);
        while let Some((tag, wire)) = input.key()? {
            match (tag, wire) {
                (1, VARINT) => {
                    self.batch.sequence = self.number(&mut input, HoleKind::Sequence)?;
                }
                (2, LEN) => {
                    let bytes = input.delimited()?;
                    if self.raw_field(bytes, tag) {
                        let text = std::str::from_utf8(bytes).ok()?;
                        self.batch.symbols.push(Cow::Borrowed(text));
                    }
                }
                (3, LEN) => {
                    let bytes = input.delimited()?;
                    if self.raw_field(bytes, tag) {
                        packed_u32(bytes, &mut self.batch.common_labels)?;
                    }
                }
                (3, VARINT) => {
                    let index = self.varint_field(&mut input, tag)? as u32;
                    if self.labels {
                        self.batch.common_labels.push(index);
                    }
                }
                (4, LEN) => {
                    self.token(tag, wire);
                    self.parse_family(input.delimited()?)?;
                    self.end();
                }
                (1..=4, _) => return None,
                _ => input.skip(wire)?,
            }
        }
        Some(())
    }

    fn parse_family(&mut self, bytes: &'a [u8]) -> Option<()> {
        let mut family = FlatFamily {
            series: Span::starting_at(self.batch.series.len()),
            ..FlatFamily::default()
        };
        let mut input = Input(bytes);
        while let Some((tag, wire)) = input.key()? {
            match (tag, wire) {
                (1, VARINT) => family.name = self.varint_field(&mut input, tag)? as u32,
                (2, VARINT) => family.r#type = self.varint_field(&mut input, tag)? as i32,
                (3, VARINT) => family.help = self.varint_field(&mut input, tag)? as u32,
                (4, LEN) => {
                    self.token(tag, wire);
                    self.parse_series(input.delimited()?)?;
                    self.end();
                }
                (1..=4, _) => return None,
                _ => input.skip(wire)?,
            }
        }
        // Series are read depth first, so this family's are the ones added since it began.
        family.series.end_at(self.batch.series.len());
        self.batch.families.push(family);
        Some(())
    }

    fn parse_series(&mut self, bytes: &'a [u8]) -> Option<()> {
        let mut series = FlatSeries {
            labels: Span::starting_at(self.batch.labels.len()),
            points: Span::starting_at(self.batch.points.len()),
        };
        let mut input = Input(bytes);
        while let Some((tag, wire)) = input.key()? {
            match (tag, wire) {
                (1, LEN) => {
                    let bytes = input.delimited()?;
                    if self.raw_field(bytes, tag) {
                        packed_u32(bytes, &mut self.batch.labels)?;
                    }
                }
                (1, VARINT) => {
                    let index = self.varint_field(&mut input, tag)? as u32;
                    if self.labels {
                        self.batch.labels.push(index);
                    }
                }
                (2, LEN) => {
                    self.token(tag, wire);
                    self.parse_point(input.delimited()?)?;
                    self.end();
                }
                (1..=2, _) => return None,
                _ => input.skip(wire)?,
            }
        }
        series.labels.end_at(self.batch.labels.len());
        series.points.end_at(self.batch.points.len());
        self.batch.series.push(series);
        Some(())
    }

    fn parse_point(&mut self, bytes: &'a [u8]) -> Option<()> {
        let mut point = FlatPoint::default();
        let mut input = Input(bytes);
        while let Some((tag, wire)) = input.key()? {
            let value = match (tag, wire) {
                (1, VARINT) => {
                    point.timestamp_ms = self.number(&mut input, HoleKind::Timestamp)? as i64;
                    continue;
                }
                (2, FIXED64) => {
                    self.token(tag, wire);
                    StoredValue::Number(self.number(&mut input, HoleKind::Number)?)
                }
                (3, LEN) => {
                    self.token(tag, wire);
                    let (count, sum, quantiles) = self.parse_parts(input.delimited()?, FIXED64)?;
                    StoredValue::Summary {
                        count,
                        sum,
                        quantiles,
                    }
                }
                (4, LEN) => {
                    self.token(tag, wire);
                    let (count, sum, buckets) = self.parse_parts(input.delimited()?, VARINT)?;
                    StoredValue::Histogram {
                        count,
                        sum,
                        buckets,
                    }
                }
                (5, LEN) => {
                    self.token(tag, wire);
                    // `Stale` has no fields; anything in it is unknown and skipped.
                    let mut stale = Input(input.delimited()?);
                    while let Some((_, wire)) = stale.key()? {
                        stale.skip(wire)?;
                    }
                    StoredValue::Stale
                }
                (1..=5, _) => return None,
                _ => {
                    input.skip(wire)?;
                    continue;
                }
            };
            // A second value merges into or replaces the first, depending on its kind;
            // agents never send one, so that is left to prost.
            if point.value.replace(value).is_some() {
                return None;
            }
        }
        self.batch.points.push(point);
        Some(())
    }

    /// A `Summary` or `Histogram`, which share their layout: `count` (1), `sum` (2) and
    /// repeated pairs (3) whose second field has wire type `second_wire`. Returns the count,
    /// the sum's bits and the pairs' span. The skeleton gets each pair's first field (the
    /// quantile or the bucket's bound), and the end of the list.
    fn parse_parts(&mut self, bytes: &[u8], second_wire: u8) -> Option<(u64, u64, Span)> {
        let (mut count, mut sum) = (0, 0);
        let mut pairs = Span::starting_at(self.batch.pairs.len());
        let mut input = Input(bytes);
        while let Some((tag, wire)) = input.key()? {
            match (tag, wire) {
                (1, VARINT) => count = self.number(&mut input, HoleKind::Count)?,
                (2, FIXED64) => sum = self.number(&mut input, HoleKind::Sum)?,
                (3, LEN) => {
                    let pair = self.parse_pair(input.delimited()?, second_wire)?;
                    if let Some(skeleton) = &mut self.skeleton {
                        skeleton.push((3 << 3) | LEN);
                        skeleton.extend_from_slice(&pair[0].to_le_bytes());
                    }
                    self.batch.pairs.push(pair);
                }
                (1..=3, _) => return None,
                _ => input.skip(wire)?,
            }
        }
        self.end();
        pairs.end_at(self.batch.pairs.len());
        Some((count, sum, pairs))
    }

    /// A `Quantile` (both fields doubles) or a `Bucket` (a double and a varint count), as
    /// bits. Its second number is a hole of the pair about to be pushed.
    fn parse_pair(&mut self, bytes: &[u8], second_wire: u8) -> Option<[u64; 2]> {
        let mut pair = [0u64; 2];
        let mut input = Input(bytes);
        while let Some((tag, wire)) = input.key()? {
            match (tag, wire) {
                (1, FIXED64) => pair[0] = input.fixed64()?,
                (2, w) if w == second_wire => {
                    let kind = match w {
                        VARINT => HoleKind::BucketCount,
                        _ => HoleKind::QuantileValue,
                    };
                    pair[1] = self.number(&mut input, kind)?;
                }
                (1..=2, _) => return None,
                _ => input.skip(wire)?,
            }
        }
        Some(pair)
    }
}

/// Appends `v` as a protobuf varint.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A packed `repeated uint32`: varints to the end of the field, each truncated to 32 bits
/// as protobuf does.
fn packed_u32(bytes: &[u8], into: &mut Vec<u32>) -> Option<()> {
    let mut input = Input(bytes);
    while !input.0.is_empty() {
        into.push(input.varint()? as u32);
    }
    Some(())
}

/// The unread rest of one message's bytes.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    /// The next field's number and wire type, `Some(None)` at the end of the message.
    /// Field number 0, numbers past 32 bits and wire types 6 and 7 are errors.
    fn key(&mut self) -> Option<Option<(u32, u8)>> {
        if self.0.is_empty() {
            return Some(None);
        }
        let key = u32::try_from(self.varint()?).ok()?;
        let (tag, wire) = (key >> 3, (key & 7) as u8);
        if tag == 0 || wire > FIXED32 {
            return None;
        }
        Some(Some((tag, wire)))
    }

    /// A varint of at most 10 bytes whose value fits 64 bits (protobuf's limits).
    fn varint(&mut self) -> Option<u64> {
        // Keys, symbol indices and most lengths are below 128: one byte.
        if let Some((&byte, rest)) = self.0.split_first()
            && byte < 0x80
        {
            self.0 = rest;
            return Some(u64::from(byte));
        }
        // Up to eight bytes from one load, without a branch per byte: timestamps (six bytes
        // in milliseconds) are most of what is left. Byte k's low seven bits go to bits
        // 7k..7k+6.
        if let Some(chunk) = self.0.first_chunk::<8>() {
            let word = u64::from_le_bytes(*chunk);
            let ends = !word & 0x8080_8080_8080_8080;
            if ends != 0 {
                let len = (ends.trailing_zeros() / 8 + 1) as usize;
                let bits = match len {
                    8 => word,
                    _ => word & ((1u64 << (8 * len)) - 1),
                };
                let value = (0..8).fold(0u64, |value, k| value | ((bits >> k) & (0x7f << (7 * k))));
                self.0 = &self.0[len..];
                return Some(value);
            }
        }
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().take(10).enumerate() {
            if i == 9 && byte > 1 {
                return None;
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                self.0 = &self.0[i + 1..];
                return Some(value);
            }
        }
        None
    }

    fn fixed64(&mut self) -> Option<u64> {
        let (bytes, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*bytes))
    }

    fn delimited(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (field, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(field)
    }

    /// Skips an unknown field. Groups (wire types 3 and 4, deprecated) are left to prost.
    fn skip(&mut self, wire: u8) -> Option<()> {
        match wire {
            VARINT => {
                self.varint()?;
            }
            FIXED64 => {
                self.fixed64()?;
            }
            LEN => {
                self.delimited()?;
            }
            FIXED32 => {
                self.0 = self.0.get(4..)?;
            }
            _ => return None,
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::v1::point::Value as W;

    fn point(timestamp_ms: i64, value: W) -> v1::Point {
        v1::Point {
            timestamp_ms,
            value: Some(value),
        }
    }

    /// Every kind of value, several families and series, labels and common labels.
    fn full_batch() -> v1::Batch {
        v1::Batch {
            sequence: 300,
            symbols: ["", "up", "job", "flink", "lat", "q", "h", "ünïcode"]
                .map(str::to_owned)
                .to_vec(),
            common_labels: vec![2, 3],
            families: vec![
                v1::Family {
                    name: 1,
                    r#type: v1::MetricType::Gauge as i32,
                    help: 7,
                    series: vec![
                        v1::Series {
                            labels: vec![5, 7, 300_000],
                            points: vec![
                                point(1_700_000_000_000, W::Number(f64::NAN)),
                                point(-5, W::Number(f64::from_bits(0x7ff0_0000_0000_0002))),
                                point(2, W::Stale(v1::Stale {})),
                            ],
                        },
                        v1::Series {
                            labels: vec![],
                            points: vec![v1::Point {
                                timestamp_ms: 3,
                                value: None,
                            }],
                        },
                    ],
                },
                v1::Family {
                    name: 4,
                    r#type: -3,
                    help: 0,
                    series: vec![v1::Series {
                        labels: vec![u32::MAX],
                        points: vec![
                            point(
                                9,
                                W::Summary(v1::Summary {
                                    count: u64::MAX,
                                    sum: -0.0,
                                    quantiles: vec![
                                        v1::Quantile {
                                            quantile: 0.5,
                                            value: 1.5,
                                        },
                                        v1::Quantile {
                                            quantile: 0.99,
                                            value: f64::INFINITY,
                                        },
                                    ],
                                }),
                            ),
                            point(
                                10,
                                W::Histogram(v1::Histogram {
                                    count: 4,
                                    sum: 2.5,
                                    buckets: vec![v1::Bucket {
                                        upper_bound: 0.1,
                                        cumulative_count: 3,
                                    }],
                                }),
                            ),
                        ],
                    }],
                },
                v1::Family::default(),
            ],
        }
    }

    #[test]
    fn reads_what_prost_writes_exactly_as_prost_reads_it() {
        let batch = full_batch();
        let bytes = batch.encode_to_vec();
        let parsed = FlatBatch::parse(&bytes).expect("prost's own encoding is not unusual");
        // Compared with prost's reading of the bytes, not with `batch`: proto3 does not
        // send a field at its default, and -0.0 counts as one (it comes back as 0.0).
        let decoded = v1::Batch::decode(bytes.as_slice()).expect("prost reads its own encoding");
        assert_eq!(parsed, FlatBatch::of(&decoded));
        assert_eq!(parsed, FlatBatch::from_batch(decoded.clone()));

        // And the accessors give back what was sent.
        let family = &parsed.families()[1];
        assert_eq!((family.name, family.r#type), (4, -3));
        let series = &parsed.series(family)[0];
        assert_eq!(parsed.labels(series), &[u32::MAX]);
        let points = parsed.points(series);
        match points[0].value() {
            Some(FlatValue::Summary {
                count,
                sum,
                quantiles,
            }) => {
                assert_eq!((count, sum.to_bits()), (u64::MAX, 0));
                let got: Vec<_> = parsed.quantiles(quantiles).collect();
                assert_eq!(got, [(0.5, 1.5), (0.99, f64::INFINITY)]);
            }
            other => panic!("summary read as {other:?}"),
        }
        match points[1].value() {
            Some(FlatValue::Histogram { buckets, .. }) => {
                assert_eq!(parsed.buckets(buckets).collect::<Vec<_>>(), [(0.1, 3)]);
            }
            other => panic!("histogram read as {other:?}"),
        }
        let first = &parsed.series(&parsed.families()[0])[0];
        assert_eq!(parsed.points(first)[0].timestamp_ms, 1_700_000_000_000);
        assert!(matches!(
            parsed.points(first)[2].value(),
            Some(FlatValue::Stale)
        ));
        assert_eq!(parsed.symbols()[7], "ünïcode");
        assert_eq!(parsed.series(&parsed.families()[2]).len(), 0);
    }

    /// Encodings prost accepts that agents do not write: read the same way, or refused.
    #[test]
    fn unusual_encodings_read_as_prost_reads_them_or_are_left_to_it() {
        let agrees = |bytes: &[u8]| {
            let prost = v1::Batch::decode(bytes);
            match FlatBatch::parse(bytes) {
                Some(flat) => {
                    let prost = prost.expect("flat reading accepted what prost refuses");
                    assert_eq!(flat, FlatBatch::of(&prost));
                    true
                }
                None => false,
            }
        };
        // Labels unpacked, one varint field each, then packed again: concatenated.
        let unpacked = [
            0x22, 0x0c, // families (4), 12 bytes
            0x22, 0x0a, // series (4), 10 bytes
            0x08, 0x01, 0x08, 0x02, // labels 1, 2 unpacked
            0x0a, 0x02, 0x03, 0x04, // labels 3, 4 packed
            0x12, 0x00, // an empty point
        ];
        assert!(agrees(&unpacked));
        // The sequence twice: the last one counts. Unknown fields of every wire type.
        let repeated_scalar = [
            0x08, 0x05, 0x08, 0x07, // sequence 5, then 7
            0x78, 0x01, // field 15 varint
            0x79, 1, 2, 3, 4, 5, 6, 7, 8, // field 15 fixed64
            0x7a, 0x01, 0xff, // field 15, one byte of length-delimited
            0x7d, 1, 2, 3, 4, // field 15 fixed32
        ];
        assert!(agrees(&repeated_scalar));
        // A family split in two: two families, as in prost (repeated message fields append).
        let two_families = [0x22, 0x02, 0x08, 0x01, 0x22, 0x02, 0x10, 0x02];
        assert!(agrees(&two_families));

        // A point whose value comes twice: prost merges the two (here two stale markers);
        // the flat reading leaves that to it.
        let twice = [0x22, 0x08, 0x22, 0x06, 0x12, 0x04, 0x2a, 0x00, 0x2a, 0x00];
        assert!(v1::Batch::decode(twice.as_slice()).is_ok());
        assert_eq!(FlatBatch::parse(&twice), None);

        // Also left to prost, which accepts the first (groups) and refuses the others: a
        // group, a wrong wire type, a varint past 64 bits, a length past the end, invalid
        // UTF-8, field number 0.
        let refused: [&[u8]; 6] = [
            &[0x7b, 0x7c],
            &[0x09, 0, 0, 0, 0, 0, 0, 0, 0],
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
            ],
            &[0x12, 0x05, b'a'],
            &[0x12, 0x01, 0xff],
            &[0x00, 0x01],
        ];
        for bytes in refused {
            assert_eq!(FlatBatch::parse(bytes), None, "{bytes:02x?}");
        }
    }

    fn skeleton_of(bytes: &[u8]) -> Option<(Vec<u8>, FlatBatch<'_>)> {
        let mut skeleton = Vec::new();
        let batch = FlatBatch::parse_skeleton(bytes, &mut skeleton)?;
        Some((skeleton, batch))
    }

    /// The skeleton reading gives the points the full reading gives, for the encoding agents
    /// write and for the unusual ones the full reading accepts; what it refuses, so does the
    /// full reading.
    #[test]
    fn a_skeleton_reading_gives_the_points_of_the_full_reading() {
        let full = full_batch().encode_to_vec();
        let unusual: [&[u8]; 4] = [
            &[
                0x22, 0x0c, 0x22, 0x0a, 0x08, 0x01, 0x08, 0x02, 0x0a, 0x02, 0x03, 0x04, 0x12, 0x00,
            ],
            &[
                0x08, 0x05, 0x08, 0x07, 0x78, 0x01, 0x79, 1, 2, 3, 4, 5, 6, 7, 8, 0x7a, 0x01, 0xff,
                0x7d, 1, 2, 3, 4,
            ],
            &[0x22, 0x02, 0x08, 0x01, 0x22, 0x02, 0x10, 0x02],
            &full,
        ];
        for bytes in unusual {
            let parsed = FlatBatch::parse(bytes).expect("read in full");
            let (skeleton, points) = skeleton_of(bytes).expect("read as a skeleton");
            assert_eq!(points, parsed.without_labels(), "{bytes:02x?}");
            assert!(!skeleton.is_empty() || bytes.len() <= 23);
        }
        // Refused in the structure or the points: refused by both readings.
        let twice = [0x22, 0x08, 0x22, 0x06, 0x12, 0x04, 0x2a, 0x00, 0x2a, 0x00];
        let refused: [&[u8]; 5] = [
            &twice,
            &[0x7b, 0x7c],
            &[0x09, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0x12, 0x05, b'a'],
            &[0x00, 0x01],
        ];
        for bytes in refused {
            assert_eq!(skeleton_of(bytes), None, "{bytes:02x?}");
        }
        // Symbols and labels are only bytes to it: invalid UTF-8 passes (and so must never be
        // trusted from a skeleton that was not read in full once).
        assert!(skeleton_of(&[0x12, 0x01, 0xff]).is_some());
        assert_eq!(FlatBatch::parse(&[0x12, 0x01, 0xff]), None);
    }

    /// Rounds of one batch differing only in sequence, timestamps and values share a
    /// skeleton; a change to anything else gives another.
    #[test]
    fn skeletons_differ_exactly_where_more_than_points_differ() {
        let base = full_batch();
        let skeleton = |batch: &v1::Batch| skeleton_of(&batch.encode_to_vec()).unwrap().0;
        let first = skeleton(&base);

        let mut round = base.clone();
        round.sequence += 1;
        for family in &mut round.families {
            for series in &mut family.series {
                for point in &mut series.points {
                    point.timestamp_ms += 15_000;
                    match &mut point.value {
                        Some(W::Number(v)) => *v += 1.0,
                        Some(W::Summary(s)) => {
                            s.count = s.count.wrapping_add(3);
                            s.sum += 2.5;
                            for q in &mut s.quantiles {
                                q.value -= 2.0;
                            }
                        }
                        Some(W::Histogram(h)) => {
                            h.count += 7;
                            h.sum += 1.0;
                            for b in &mut h.buckets {
                                b.cumulative_count += 7;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        assert_ne!(round.encode_to_vec(), base.encode_to_vec());
        assert_eq!(skeleton(&round), first, "only points' readings changed");

        type Change = fn(&mut v1::Batch);
        let changes: [(&str, Change); 12] = [
            ("a symbol", |b| b.symbols[3].push('x')),
            ("one more symbol", |b| b.symbols.push(String::new())),
            ("a common label", |b| b.common_labels[1] = 1),
            ("a family name", |b| b.families[0].name = 2),
            ("a family type", |b| b.families[0].r#type = 2),
            ("a help text", |b| b.families[0].help = 1),
            ("a series label", |b| b.families[0].series[0].labels[0] = 6),
            ("a point more", |b| {
                let extra = b.families[0].series[0].points[0].clone();
                b.families[0].series[0].points.push(extra);
            }),
            ("a value's kind", |b| {
                b.families[0].series[0].points[0].value = Some(W::Stale(v1::Stale {}))
            }),
            ("a missing value", |b| {
                b.families[0].series[0].points[0].value = None
            }),
            ("a series more", |b| {
                let extra = b.families[0].series[1].clone();
                b.families[0].series.push(extra);
            }),
            ("a quantile or bucket bound", |b| {
                for family in &mut b.families {
                    for series in &mut family.series {
                        for point in &mut series.points {
                            match &mut point.value {
                                Some(W::Summary(s)) => s.quantiles[0].quantile = 0.25,
                                Some(W::Histogram(h)) => h.buckets[0].upper_bound = 0.125,
                                _ => {}
                            }
                        }
                    }
                }
            }),
        ];
        for (what, change) in changes {
            let mut changed = base.clone();
            change(&mut changed);
            assert_ne!(skeleton(&changed), first, "{what} changed");
        }
    }

    /// `full_batch` with every number changed, none in its encoded length.
    fn next_round(base: &v1::Batch) -> v1::Batch {
        let mut round = base.clone();
        round.sequence += 1;
        for family in &mut round.families {
            for series in &mut family.series {
                for point in &mut series.points {
                    point.timestamp_ms += 1;
                    match &mut point.value {
                        Some(W::Number(v)) => *v = 42.5,
                        Some(W::Summary(s)) => {
                            // (Its sum stays -0.0, which proto3 leaves out.)
                            s.count -= 1;
                            for q in &mut s.quantiles {
                                q.value = -1.0;
                            }
                        }
                        Some(W::Histogram(h)) => {
                            h.count += 1;
                            h.sum = 3.0;
                            for b in &mut h.buckets {
                                b.cumulative_count += 1;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        round
    }

    /// A template reads a later round as the skeleton reading does, and anything else it
    /// reads at all — every byte of a batch changed to every value — too: it never reads a
    /// batch whose skeleton is not its own.
    #[test]
    fn a_template_reads_only_what_has_its_skeleton_and_reads_it_as_the_skeleton_reading() {
        let base = full_batch();
        let bytes = base.encode_to_vec();
        let (known, _) = skeleton_of(&bytes).unwrap();
        let mut template = BatchTemplate::default();
        assert_eq!(template.read(&bytes), None, "nothing learnt");
        assert!(template.learn(&bytes));
        assert!(template.is_learnt());

        let round = next_round(&base).encode_to_vec();
        assert_eq!(round.len(), bytes.len());
        let (skeleton, points) = skeleton_of(&round).unwrap();
        assert_eq!(skeleton, known);
        assert_eq!(template.read(&round), Some(&points));
        assert_eq!(template.read(&round).map(|b| b.sequence), Some(301));
        // And back: every number is rewritten.
        assert_eq!(template.read(&bytes), Some(&skeleton_of(&bytes).unwrap().1));

        let mut read = 0;
        let mut changed = bytes.clone();
        for at in 0..bytes.len() {
            for byte in 0..=255u8 {
                changed[at] = byte;
                if let Some(reading) = template.read(&changed) {
                    read += 1;
                    let (skeleton, points) = skeleton_of(&changed).expect("read as a skeleton");
                    assert_eq!(skeleton, known, "byte {at} as {byte:#04x}");
                    assert_eq!(reading, &points, "byte {at} as {byte:#04x}");
                }
            }
            changed[at] = bytes[at];
        }
        // The numbers' bytes (not their varints' last bytes, nor the stale ones) do read.
        assert!(read > 8 * 256, "{read} changed batches read");

        // Other lengths and other structures do not; a timestamp's varint one byte longer
        // keeps everything else (but the lengths around it) and is not read either.
        let mut longer = base.clone();
        longer.families[0].series[0].points[1].timestamp_ms = 1 << 40;
        assert_eq!(template.read(&longer.encode_to_vec()), None);
        let mut other = base.clone();
        other.symbols[1] = "uq".into();
        assert_eq!(other.encode_to_vec().len(), bytes.len());
        assert_eq!(template.read(&other.encode_to_vec()), None);

        template.forget();
        assert_eq!(template.read(&bytes), None, "forgotten");
        assert!(!template.learn(&[0x12, 0x05, b'a']), "unreadable");
        assert!(!template.is_learnt());
        assert!(template.learn(&[]), "an empty batch");
        assert!(template.read(&[]).is_some());
    }

    /// A varint of a given length reads as the reader reads it, and only at that length.
    #[test]
    fn varints_of_a_known_length_read_as_the_reader_reads_them() {
        let mut values: Vec<u64> = (0..64).map(|bit| 1u64 << bit).collect();
        values.extend((1..64).map(|bit| (1u64 << bit) - 1));
        values.extend([u64::MAX, 0, 1_700_000_000_000]);
        for value in values {
            for trailing in [&[][..], &[0xff; 9], &[0x00; 9]] {
                let mut bytes = vec![0x55];
                prost::encoding::encode_varint(value, &mut bytes);
                let len = bytes.len() - 1;
                bytes.extend_from_slice(trailing);
                for claimed in 1..=10u8 {
                    let read = template::varint_of_length(&bytes, 1, claimed);
                    let expected = (usize::from(claimed) == len).then_some(value);
                    assert_eq!(
                        read, expected,
                        "{value:#x} as {claimed} bytes, then {trailing:02x?}"
                    );
                }
            }
        }
        // Padded encodings read as the reader reads them; past 64 bits they do not read.
        assert_eq!(
            template::varint_of_length(&[0x81, 0x80, 0x00], 0, 3),
            Some(1)
        );
        let too_long = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(template::varint_of_length(&too_long, 0, 10), None);
    }

    #[test]
    fn bytes_compare_equal_exactly_when_they_are() {
        let a: Vec<u8> = (0..80).collect();
        for len in 0..a.len() {
            assert!(template::same_bytes(&a[..len], &a[..len]));
            for at in 0..len {
                let mut b = a[..len].to_vec();
                b[at] ^= 0x40;
                assert!(
                    !template::same_bytes(&a[..len], &b),
                    "{len} bytes, {at} differs"
                );
            }
        }
        assert!(!template::same_bytes(&a[..3], &a[..4]));
    }

    /// Varints of every length read back, whatever follows them (the eight-byte load must
    /// not take the next field's bytes), and ones past 64 bits are refused.
    #[test]
    fn varints_of_every_length_read_back() {
        let mut values: Vec<u64> = (0..64).map(|bit| 1u64 << bit).collect();
        values.extend((1..64).map(|bit| (1u64 << bit) - 1));
        values.extend([u64::MAX, 1_700_000_000_000, 0x7f, 0x80, 0x3fff, 0x4000]);
        for value in values {
            for trailing in [&[][..], &[0xff; 9], &[0x00; 9], &[0x01]] {
                let mut bytes = Vec::new();
                prost::encoding::encode_varint(value, &mut bytes);
                let len = bytes.len();
                bytes.extend_from_slice(trailing);
                let mut input = Input(&bytes);
                assert_eq!(
                    input.varint(),
                    Some(value),
                    "{value:#x} then {trailing:02x?}"
                );
                assert_eq!(input.0.len(), bytes.len() - len);
            }
        }
        // Non-minimal encodings read as prost reads them.
        let mut padded = Input(&[0x81, 0x80, 0x80, 0x00, 0x05]);
        assert_eq!(padded.varint(), Some(1));
        assert_eq!(padded.0, &[0x05]);
        let too_long = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(Input(&too_long).varint(), None);
        assert_eq!(Input(&[0x80; 8]).varint(), None, "unterminated");
    }
}

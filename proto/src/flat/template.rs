//! [`BatchTemplate`]: a batch read once, against which a later batch that differs from it only
//! in its numbers is read without parsing it.
//!
//! An agent's next round is usually its last one byte for byte, but for the sequence and the
//! points' timestamps and values: the same symbols, labels and series, in the same order,
//! and (timestamps in milliseconds taking six bytes for the next century) the same length.
//! Reading its skeleton ([`FlatBatch::parse_skeleton`]) still decodes every key and length
//! and copies the labels, most of a relaying aggregator's reading. A template keeps the
//! bytes of a batch read in full and where each of its numbers (its *holes*) lies; a batch
//! of the same length whose bytes between the holes are equal to the template's, and whose
//! holes hold numbers of the same wire type and length, is read the same way field by field
//! — a protobuf reader reaches every hole in the same state and leaves it at the same
//! offset — so it has the template's skeleton, and only its holes need reading.

use super::{FlatBatch, Input, Reader, StoredValue};

/// Where one number of a batch lies in its bytes, and what it is.
#[derive(Clone, Copy, Debug)]
pub(super) struct Hole {
    /// Offset of the number's first byte (after its field's key).
    pub(super) at: u32,
    /// The point (or, for [`HoleKind::QuantileValue`] and [`HoleKind::BucketCount`], the
    /// pair) it belongs to, as the batch's arrays number them.
    pub(super) index: u32,
    /// Its length in bytes: 8 for a fixed64, 1 to 10 for a varint.
    pub(super) len: u8,
    pub(super) kind: HoleKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HoleKind {
    /// The batch's sequence (varint).
    Sequence,
    /// A point's timestamp (varint).
    Timestamp,
    /// A number point's value (fixed64).
    Number,
    /// A summary's or histogram's count (varint).
    Count,
    /// A summary's or histogram's sum (fixed64).
    Sum,
    /// A quantile's value (fixed64).
    QuantileValue,
    /// A bucket's cumulative count (varint).
    BucketCount,
}

impl HoleKind {
    pub(super) fn is_varint(self) -> bool {
        matches!(
            self,
            HoleKind::Sequence | HoleKind::Timestamp | HoleKind::Count | HoleKind::BucketCount
        )
    }
}

/// The bytes of a batch that was read in full, and where its numbers are; see the module
/// documentation.
///
/// Like a skeleton, a template only says that a batch reads like the one it was learnt from:
/// learn it from a batch that passed whatever the caller checks of labels and structure.
/// It costs the batch's bytes, 12 bytes per number and the batch's points as read: about
/// 115 bytes per series of one number point with Flink-like labels (35 of them the bytes),
/// and up to about 20 times the batch's size for one of nothing but bare points.
#[derive(Debug, Default)]
pub struct BatchTemplate {
    bytes: Vec<u8>,
    holes: Vec<Hole>,
    /// The points-only reading (as [`FlatBatch::parse_skeleton`] gives) of the last batch
    /// read through this template: its structure is the learnt batch's, its numbers are
    /// rewritten by every [`BatchTemplate::read`].
    batch: FlatBatch<'static>,
    learnt: bool,
}

impl BatchTemplate {
    /// Learns `bytes` as the template, or forgets the template and returns `false` where
    /// [`FlatBatch::parse_skeleton`] refuses them. Like that reading it does not check
    /// symbols or labels (invalid UTF-8 passes): learn only bytes that were read and checked
    /// in full, or whose skeleton is one that was.
    pub fn learn(&mut self, bytes: &[u8]) -> bool {
        self.forget();
        if u32::try_from(bytes.len()).is_err() {
            return false;
        }
        let mut reader = Reader::new(bytes, false);
        reader.holes = Some(&mut self.holes);
        if reader.parse(bytes).is_none() {
            self.holes.clear();
            return false;
        }
        self.batch = reader.batch.into_points_only();
        // Kept for many rounds: without the spare capacity the reading grew.
        self.batch.shrink_to_fit();
        self.holes.shrink_to_fit();
        self.bytes.shrink_to(bytes.len());
        self.bytes.extend_from_slice(bytes);
        self.learnt = true;
        true
    }

    /// Forgets the template: nothing is read through it until the next
    /// [`BatchTemplate::learn`]. Its buffers are kept.
    pub fn forget(&mut self) {
        self.learnt = false;
        self.bytes.clear();
        self.holes.clear();
    }

    pub fn is_learnt(&self) -> bool {
        self.learnt
    }

    /// Reads `bytes` through the template: `Some` with its points-only reading (as
    /// [`FlatBatch::parse_skeleton`] would give it, and with the template's skeleton) when
    /// they are the template's but for the numbers in its holes; `None` when anything else
    /// differs, and the caller reads them the usual way.
    pub fn read(&mut self, bytes: &[u8]) -> Option<&FlatBatch<'static>> {
        if !self.learnt || bytes.len() != self.bytes.len() {
            return None;
        }
        let mut from = 0;
        for hole in &self.holes {
            let at = hole.at as usize;
            let end = at + usize::from(hole.len);
            if !same_bytes(bytes.get(from..at)?, self.bytes.get(from..at)?) {
                return None;
            }
            let number = if hole.kind.is_varint() {
                varint_of_length(bytes, at, hole.len)?
            } else {
                u64::from_le_bytes(*bytes.get(at..end)?.first_chunk::<8>()?)
            };
            // A failed read leaves some numbers of this batch in the reading: harmless, since
            // the reading is only handed out whole and every hole is rewritten by each read.
            set_number(&mut self.batch, *hole, number)?;
            from = end;
        }
        same_bytes(bytes.get(from..)?, self.bytes.get(from..)?).then_some(&self.batch)
    }

    /// The reading [`BatchTemplate::read`] last gave (after a `None`, a mix of two batches'
    /// numbers).
    pub fn last_read(&self) -> &FlatBatch<'static> {
        &self.batch
    }

    /// Heap bytes held (for caches that count what they keep).
    pub fn heap_bytes(&self) -> usize {
        self.bytes.capacity() + self.holes.capacity() * size_of::<Hole>() + self.batch.heap_bytes()
    }
}

/// Writes a hole's number where [`Reader`] put it when it read the template's batch.
fn set_number(batch: &mut FlatBatch<'static>, hole: Hole, number: u64) -> Option<()> {
    let index = hole.index as usize;
    match hole.kind {
        HoleKind::Sequence => batch.sequence = number,
        HoleKind::Timestamp => batch.points.get_mut(index)?.timestamp_ms = number as i64,
        HoleKind::Number => batch.points.get_mut(index)?.value = Some(StoredValue::Number(number)),
        HoleKind::Count | HoleKind::Sum => match &mut batch.points.get_mut(index)?.value {
            Some(StoredValue::Summary { count, sum, .. })
            | Some(StoredValue::Histogram { count, sum, .. }) => {
                *if hole.kind == HoleKind::Count {
                    count
                } else {
                    sum
                } = number;
            }
            _ => return None,
        },
        HoleKind::QuantileValue | HoleKind::BucketCount => batch.pairs.get_mut(index)?[1] = number,
    }
    Some(())
}

/// The varint at `at` if it takes exactly `len` bytes (any other length would send a reader
/// on from elsewhere). Timestamps, most of the varints read, take six: read from one load,
/// its continuation bits checked all at once.
pub(super) fn varint_of_length(bytes: &[u8], at: usize, len: u8) -> Option<u64> {
    let len = usize::from(len);
    if (1..=8).contains(&len)
        && let Some(chunk) = bytes.get(at..).and_then(|rest| rest.first_chunk::<8>())
    {
        let word = u64::from_le_bytes(*chunk);
        let mine = match len {
            8 => u64::MAX,
            _ => (1u64 << (8 * len)) - 1,
        };
        // Every byte but the last has its high bit set, and the last does not.
        let continued = 0x8080_8080_8080_8080 & (mine >> 8);
        if word & 0x8080_8080_8080_8080 & mine != continued {
            return None;
        }
        // Byte k's low seven bits go to bits 7k..7k+6.
        let bits = word & mine;
        return Some((0..8).fold(0u64, |value, k| value | ((bits >> k) & (0x7f << (7 * k)))));
    }
    // Nine or ten bytes, or too near the end for one load.
    let mut input = Input(bytes.get(at..)?);
    let number = input.varint()?;
    (bytes.len() - input.0.len() == at + len).then_some(number)
}

/// Whether two runs of bytes of one length are equal. The runs between holes are mostly a
/// few bytes (keys and lengths, a series' label list), where a call to `memcmp` costs more
/// than comparing them a word at a time in place.
pub(super) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a.len() > 64 {
        return a == b;
    }
    if a.len() < 8 {
        return a.iter().zip(b).all(|(x, y)| x == y);
    }
    let (mut x, mut y) = (a, b);
    while let (Some((wx, rx)), Some((wy, ry))) =
        (x.split_first_chunk::<8>(), y.split_first_chunk::<8>())
    {
        if wx != wy {
            return false;
        }
        (x, y) = (rx, ry);
    }
    // The last (overlapping) word covers what is left.
    a.last_chunk::<8>() == b.last_chunk::<8>()
}

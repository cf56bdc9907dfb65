//! Encoded label sets of recently sent batches, so a batch shaped like one seen before skips
//! the remote-write encoder's per-series work.
//!
//! An agent sends the same series every round, in the same order and with the same symbol
//! table; only timestamps and values change. For every series the encoder would otherwise
//! collect the labels from the symbol table, sort them, write them as protobuf and hash that
//! encoding (a quarter of a relaying aggregator's CPU time). This cache remembers, per batch
//! *shape* — everything in a batch except timestamps and values — the encoded labels and hash
//! of each sample the encoder emitted for it, in order. A later batch of the same shape
//! replays them and only adds its own timestamps and values.
//!
//! A shape's key is the batch's *skeleton* ([`FlatBatch::parse_skeleton`]): the batch without
//! its sequence, timestamps and values, read without decoding its symbols or labels. It holds
//! every input the label encoding depends on: the symbol table's strings, the common labels,
//! each family's name, type and help, each series' label indices, and each point's kind with its
//! quantiles or bucket bounds (which decide the `quantile`/`le` series and whether `+Inf` is
//! added). Stale points change a shape, since a stale summary or histogram emits only `_sum`
//! and `_count`. A batch that hits the cache is read only that far: its symbols and labels
//! are never decoded or checked, because they are byte for byte those of the batch that was
//! read and checked in full when its shape was recorded. A shape is found by a hash of its
//! key and then compared byte for byte, so a hash collision only costs a miss.
//!
//! [`FlatBatch::parse_skeleton`]: picket_proto::v1::FlatBatch::parse_skeleton
//!
//! Reading the skeleton still decodes every key and length of the batch and copies its
//! labels. So each shape also keeps its last batch as a [`BatchTemplate`] (the bytes, and
//! where the numbers lie), and a batch is first read through the templates of the shapes
//! its source (the queue's shard key: the agent) last sent ([`LabelCache::read_known`]): one
//! that is a template's batch byte for byte but for its numbers has that shape's skeleton,
//! and only its numbers are read. The template counts in the shape's size.
//!
//! Memory is bounded by `limit_bytes` (the lane's share of the sink's `label_cache_bytes`).
//! Once a shape does not fit in what is left, the cache is *full*: it keeps the shapes it
//! has, which go on hitting, and stops caching new ones, so the batches it has no room for
//! cost what they cost without a cache, plus building and looking up their key. (A shape that
//! does not fit in a cache at most an eighth used is only remembered as too large, and the
//! cache stays open to smaller ones.) It does not evict to make room: agents send their
//! batches in turn, and a cache evicting the least recently used shape for the next one would,
//! once the fleet's shapes outgrow it, evict each shape just before its agent's next round and
//! never hit. Instead, while it refuses shapes, it sweeps out those unused for [`IDLE`]
//! (agents that left, series sets that changed) once per [`SWEEP_INTERVAL`], and tries again.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault};
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use picket_proto::v1::{BatchTemplate, FlatBatch};

use super::encode::Prehashed;

/// Default `label_cache_bytes`. A Flink-like series costs about 450 bytes
/// here (its seven labels encoded as sent, its share of the key, and about 115 bytes of
/// template), so this holds the label sets of about 150,000 series.
pub const DEFAULT_BYTES: u64 = 64 << 20;

/// A shape unused this long is swept out of a full cache: agents send a round every few
/// seconds to a minute, so it belongs to an agent that left or to a series set since changed.
pub const IDLE: Duration = Duration::from_secs(600);

/// How often a full cache looks for idle shapes, at most.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Bytes of one recorded sample besides its labels: the end of its labels and their hash.
const SAMPLE_BYTES: usize = size_of::<(u32, u64)>();

/// Memory of a shape besides its contents: its place in the map, the shared labels' counts,
/// its template's box, and about what the allocator keeps with its allocations (three, and
/// the template's box and up to four arrays).
const SHAPE_OVERHEAD: usize =
    size_of::<(u64, Shape)>() + 2 * size_of::<usize>() + size_of::<BatchTemplate>() + 8 * 16;

/// Shapes remembered as too large to cache, at most (then forgotten, to be tried again).
const TOO_LARGE_KEPT: usize = 1024;

/// What the encoder emitted for one batch shape.
pub(super) struct Shape {
    key: Box<[u8]>,
    last_used: Instant,
    /// While recording: the most bytes it may take, and whether it went past them (then
    /// recording stopped and the shape is not cached).
    room: usize,
    overflowed: bool,
    /// The labels of every emitted sample, encoded as `TimeSeries.labels` fields, back to back:
    /// written to `recording` while the shape is recorded, then shared with the requests that
    /// replay it (a request's series refer to their labels here instead of copying them).
    recording: Vec<u8>,
    labels: Arc<[u8]>,
    /// Per emitted sample, in order: the end of its labels in `labels` and their hash.
    samples: Vec<(u32, u64)>,
    /// The last batch of this shape from the source that last sent one, through which that
    /// source's next batch is read ([`LabelCache::read_known`]). Boxed: a shape being
    /// recorded moves around the encoder.
    template: Box<BatchTemplate>,
    /// When a template last did not fit in the cache: the shape is kept without one, and
    /// its batches are not learnt again for [`SWEEP_INTERVAL`] (each try costs a reading).
    template_refused_at: Option<Instant>,
}

impl Shape {
    /// Where in [`Shape::labels`] the encoded labels of the `n`-th sample emitted for this
    /// shape are, and their hash.
    pub(super) fn sample(&self, n: usize) -> Option<(std::ops::Range<usize>, u64)> {
        let &(end, hash) = self.samples.get(n)?;
        let start = match n {
            0 => 0,
            _ => self.samples[n - 1].0,
        };
        Some((start as usize..end as usize, hash))
    }

    /// The encoded labels of every sample of a cached shape.
    pub(super) fn labels(&self) -> &Arc<[u8]> {
        &self.labels
    }

    /// An empty shape, to record what the encoder emits for a batch, in at most `room`
    /// bytes (from [`Lookup::Record`]).
    pub(super) fn new(room: usize) -> Self {
        Shape {
            key: Box::default(),
            last_used: Instant::now(),
            room,
            overflowed: false,
            recording: Vec::new(),
            labels: Arc::default(),
            samples: Vec::new(),
            template: Box::default(),
            template_refused_at: None,
        }
    }

    /// The points of the batch [`LabelCache::read_known`] just read through this shape.
    pub(super) fn template_reading(&self) -> &FlatBatch<'static> {
        self.template.last_read()
    }

    /// Samples recorded.
    pub(super) fn len(&self) -> usize {
        self.samples.len()
    }

    /// Records the next emitted sample's encoded labels and hash, unless that takes the
    /// shape past its room (or its 32-bit offsets past 4 GiB): then recording stops there,
    /// and the shape will not be cached.
    pub(super) fn record(&mut self, labels: &[u8], hash: u64) {
        if self.overflowed {
            return;
        }
        let after = self.recording.len() + labels.len();
        let end = u32::try_from(after).ok();
        match end {
            Some(end) if after + (self.samples.len() + 1) * SAMPLE_BYTES <= self.room => {
                self.recording.extend_from_slice(labels);
                self.samples.push((end, hash));
            }
            _ => {
                self.overflowed = true;
                self.recording = Vec::new();
                self.samples = Vec::new();
            }
        }
    }

    fn bytes(&self) -> usize {
        SHAPE_OVERHEAD
            + self.key.len()
            + self.labels.len()
            + self.samples.len() * SAMPLE_BYTES
            + self.template.heap_bytes()
    }
}

/// The cache one lane of a remote-write sink keeps across its requests.
pub struct LabelCache {
    shapes: HashMap<u64, Shape, BuildHasherDefault<Prehashed>>,
    /// Bytes of `shapes` ([`Shape::bytes`]), and the most they may hold.
    bytes: usize,
    limit_bytes: usize,
    /// Set when a shape did not fit in what was left: no new shapes are cached until a
    /// sweep makes room.
    full: bool,
    /// Hashes of shapes too large for the cache even while it had room, so they are not
    /// recorded again every round; cleared by each sweep.
    too_large: HashSet<u64, BuildHasherDefault<Prehashed>>,
    last_sweep: Instant,
    /// Added to the clock (tests move time forward with it).
    clock_offset: Duration,
    /// Keys for the shape hashes, and for the label hashes the encoder's series table uses:
    /// cached label hashes are only valid with the keys they were made with.
    keys: RandomState,
    /// The key of the batch being encoded, reused from batch to batch.
    key: Vec<u8>,
    /// Per source (the queue's shard key: the agent), the hashes of the shapes its last
    /// batches had, most recent first: its next batch is read through their templates
    /// first. (An agent whose rounds are split into several batches sends batches of
    /// several shapes in turn.) Not counted in `bytes`: at most four hashes per agent that
    /// sent to this lane, pruned with the shapes a sweep drops.
    by_source: HashMap<u64, SourceShapes, RandomState>,
    /// Batches looked up, those whose shape was found, and those whose shape was cached.
    batches: u64,
    hits: u64,
    cached: u64,
    /// Batches whose shape was recorded (cached or not).
    recordings: u64,
    /// Batches whose shape was found by their source's template, without their skeleton.
    template_hits: u64,
}

impl Default for LabelCache {
    fn default() -> Self {
        LabelCache::new(DEFAULT_BYTES)
    }
}

impl LabelCache {
    /// A cache of at most `limit_bytes` of shapes.
    pub fn new(limit_bytes: u64) -> Self {
        LabelCache {
            shapes: HashMap::default(),
            bytes: 0,
            limit_bytes: usize::try_from(limit_bytes).unwrap_or(usize::MAX),
            full: false,
            too_large: HashSet::default(),
            last_sweep: Instant::now(),
            clock_offset: Duration::ZERO,
            keys: RandomState::default(),
            key: Vec::new(),
            by_source: HashMap::default(),
            batches: 0,
            hits: 0,
            cached: 0,
            recordings: 0,
            template_hits: 0,
        }
    }

    pub(super) fn keys(&self) -> RandomState {
        self.keys.clone()
    }

    /// Batches so far whose shape was found.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Batches so far whose shape was found by their source's template (also in
    /// [`LabelCache::hits`]).
    pub fn template_hits(&self) -> u64 {
        self.template_hits
    }

    /// Batches looked up so far.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Batches so far whose shape was cached after they were encoded.
    pub fn cached(&self) -> u64 {
        self.cached
    }

    /// The most bytes of shapes it holds.
    #[cfg(test)]
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    /// Bytes of the shapes' templates.
    #[cfg(test)]
    pub fn template_bytes(&self) -> usize {
        self.shapes.values().map(|s| s.template.heap_bytes()).sum()
    }

    /// Batches so far whose shape was recorded to be cached.
    #[cfg(test)]
    pub fn recordings(&self) -> u64 {
        self.recordings
    }

    /// Gives back the key buffer if one very large batch grew it (the cache's shapes are
    /// bounded; this scratch space is not).
    pub(super) fn trim(&mut self) {
        if self.key.capacity() > 1 << 20 {
            self.key = Vec::new();
        }
    }

    /// Bytes of shapes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Moves the cache's clock forward (tests of idle shapes).
    #[cfg(test)]
    pub fn advance_clock(&mut self, by: Duration) {
        self.clock_offset += by;
    }

    fn now(&self) -> Instant {
        Instant::now() + self.clock_offset
    }

    /// Where the next batch's skeleton is read, for [`LabelCache::look_up`].
    pub(super) fn key_mut(&mut self) -> &mut Vec<u8> {
        &mut self.key
    }

    /// The shape of `wire`, from `source`, if it reads through the template of the shape
    /// that source's last batch had (see [`BatchTemplate`]): then it has that shape's
    /// skeleton, its points are [`Shape::template_reading`], and neither its skeleton nor
    /// the shape's key need reading. `None` sends the caller to the skeleton.
    pub(super) fn read_known(&mut self, source: u64, wire: &[u8]) -> Option<&Shape> {
        let recent = self.by_source.get(&source)?;
        // A template refuses a batch of another length before reading it, so trying the
        // source's few recent shapes costs little.
        let hash = recent.hashes().find(|hash| {
            self.shapes
                .get_mut(hash)
                .is_some_and(|shape| shape.template.read(wire).is_some())
        })?;
        let now = self.now();
        self.remember(source, hash);
        let shape = self.shapes.get_mut(&hash)?;
        shape.last_used = now;
        self.batches += 1;
        self.hits += 1;
        self.template_hits += 1;
        Some(shape)
    }

    /// `source`'s latest batch had the shape `hash`.
    fn remember(&mut self, source: u64, hash: u64) {
        self.by_source.entry(source).or_default().push(hash);
    }

    /// The shape whose key (the batch's skeleton) was just read into [`LabelCache::key_mut`]:
    /// its hash, and what the encoder emitted for it last time if that is cached; if not,
    /// whether to record this batch's for [`LabelCache::insert`] (not while the cache is
    /// full). A shape found learns `wire`, from `source`, as its template (when it has room
    /// for it), so that source's next batch is read through it.
    pub(super) fn look_up(&mut self, source: u64, wire: &[u8]) -> Lookup<'_> {
        self.batches += 1;
        let hash = self.keys.hash_one(self.key.as_slice());
        let now = self.now();
        let refusing = self.full || !self.too_large.is_empty();
        if refusing && now.saturating_duration_since(self.last_sweep) >= SWEEP_INTERVAL {
            self.sweep(now);
        }
        match self.shapes.get_mut(&hash) {
            Some(shape) if *shape.key == *self.key => {
                self.hits += 1;
                shape.last_used = now;
                // Another source's batch, or one whose numbers changed length: its template
                // now. (Learnt from a batch of the shape's skeleton, which the shape's key
                // was read and checked from in full.)
                let refused_lately = shape
                    .template_refused_at
                    .is_some_and(|at| now.saturating_duration_since(at) < SWEEP_INTERVAL);
                if !refused_lately {
                    let before = shape.template.heap_bytes();
                    let learnt = shape.template.learn(wire);
                    let after = shape.template.heap_bytes();
                    if !learnt || self.bytes - before + after > self.limit_bytes {
                        *shape.template = BatchTemplate::default();
                        shape.template_refused_at = learnt.then_some(now);
                        self.bytes -= before;
                    } else {
                        self.bytes = self.bytes - before + after;
                        self.by_source.entry(source).or_default().push(hash);
                    }
                }
                Lookup::Found(shape)
            }
            _ if self.full || self.too_large.contains(&hash) => Lookup::Skip,
            _ => {
                self.recordings += 1;
                Lookup::Record {
                    hash,
                    room: self
                        .limit_bytes
                        .saturating_sub(self.bytes)
                        .saturating_sub(self.key.len() + SHAPE_OVERHEAD),
                }
            }
        }
    }

    /// Keeps what the encoder emitted for the batch last given to [`LabelCache::look_up`],
    /// `wire` from `source`, if it fit in the room it was given. If not: a shape that did not
    /// fit in a cache all but empty (at most an eighth used) is remembered as too large, and
    /// otherwise the cache is full; either way until the next sweep. `wire` becomes the
    /// shape's template, which counts in its size; a shape that fits only without it is kept
    /// without it.
    pub(super) fn insert(&mut self, hash: u64, mut shape: Shape, source: u64, wire: &[u8]) {
        if shape.overflowed {
            self.refuse(hash);
            return;
        }
        shape.key = self.key.as_slice().into();
        shape.last_used = self.now();
        // Kept for many rounds: without the spare capacity growth left (up to as much again).
        shape.labels = Arc::from(std::mem::take(&mut shape.recording));
        shape.samples.shrink_to_fit();
        // (The batch was read in full, so it can be learnt.)
        let replaced = self.shapes.get(&hash).map_or(0, Shape::bytes);
        let learnt = shape.template.learn(wire);
        if learnt && self.bytes - replaced + shape.bytes() > self.limit_bytes {
            *shape.template = BatchTemplate::default();
            shape.template_refused_at = Some(shape.last_used);
        }
        let bytes = shape.bytes();
        // A shape with this hash is another one (the caller looked this one up and missed):
        // the newer one takes its place.
        if self.bytes - replaced + bytes > self.limit_bytes {
            self.refuse(hash);
            return;
        }
        self.bytes = self.bytes - replaced + bytes;
        if shape.template.is_learnt() {
            self.remember(source, hash);
        }
        self.shapes.insert(hash, shape);
        self.cached += 1;
    }

    /// A shape that did not fit: with the cache all but empty it is too large for it, and
    /// is remembered so; otherwise the cache is full.
    fn refuse(&mut self, hash: u64) {
        if self.bytes <= self.limit_bytes / 8 {
            if self.too_large.len() >= TOO_LARGE_KEPT {
                self.too_large.clear();
            }
            self.too_large.insert(hash);
        } else {
            self.full = true;
        }
    }

    /// Drops shapes unused for [`IDLE`], and tries again what was refused: the cache takes
    /// new shapes until one does not fit (at worst one batch recorded in vain per sweep).
    fn sweep(&mut self, now: Instant) {
        self.last_sweep = now;
        self.too_large.clear();
        self.full = false;
        let before = self.shapes.len();
        self.shapes
            .retain(|_, shape| now.saturating_duration_since(shape.last_used) < IDLE);
        if self.shapes.len() < before {
            self.bytes = self.shapes.values().map(Shape::bytes).sum();
            let shapes = &self.shapes;
            self.by_source.retain(|_, recent| {
                recent.retain(|hash| shapes.contains_key(hash));
                !recent.is_empty()
            });
        }
    }
}

/// The shapes of a source's latest batches, most recent first.
#[derive(Default)]
struct SourceShapes {
    hashes: [u64; Self::KEPT],
    len: usize,
}

impl SourceShapes {
    /// Shapes remembered per source: enough for an agent whose rounds are split into a few
    /// batches, few enough that a batch of a new shape is not tried against many.
    const KEPT: usize = 4;

    fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.hashes[..self.len].iter().copied()
    }

    /// Puts `hash` first (moving it up if it is there, else pushing out the oldest).
    fn push(&mut self, hash: u64) {
        let found = self.hashes().position(|h| h == hash);
        let at = found.unwrap_or_else(|| {
            self.len = (self.len + 1).min(Self::KEPT);
            self.len - 1
        });
        self.hashes.copy_within(..at, 1);
        self.hashes[0] = hash;
    }

    fn retain(&mut self, keep: impl Fn(&u64) -> bool) {
        let mut kept = 0;
        for i in 0..self.len {
            if keep(&self.hashes[i]) {
                self.hashes[kept] = self.hashes[i];
                kept += 1;
            }
        }
        self.len = kept;
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What [`LabelCache::look_up`] found for a batch.
pub(super) enum Lookup<'c> {
    /// Its shape is cached.
    Found(&'c Shape),
    /// Not cached: record what the encoder emits, in at most `room` bytes, and
    /// [`LabelCache::insert`] it with this hash.
    Record { hash: u64, room: usize },
    /// Not cached, and not to be: the cache is full, or the shape is too large for it.
    Skip,
}

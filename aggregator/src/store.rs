//! The latest sample of every live series, served at `/metrics`.
//!
//! A series leaves the store when its agent sends a stale marker for it (the source stopped
//! reporting it) or when nothing updated it for `exposition.series_ttl`, so dead agents and
//! finished Flink jobs do not linger. An older sample never replaces a newer one, which keeps
//! the store right when an agent resends batches after a reconnect.
//!
//! Batches from agents are applied as read in place ([`LatestStore::apply_flat`]), without
//! building a label set per series: that was a fifth of the aggregator's time per relayed
//! sample. Each series is keyed by its labels encoded into one byte string ([`SeriesKey`]),
//! which is one allocation per stored series and is built in a reused buffer for lookups.
//!
//! Even so, building each series' key and looking it up in a map of every series (a CPU
//! cache miss nearly every time) was two fifths of an aggregator's CPU. So a series' entry
//! stays in one slot while the series lives, and applying a batch in full leaves a
//! [`StoreRoute`]: the slot of each of its points. An agent's next round with the same
//! skeleton has the same series in the same order, and [`LatestStore::apply_points`] puts
//! its values straight into those slots; a slot's generation (advanced when it is freed)
//! tells when a route would lead to a series other than the one it was made for.
//!
//! With `exposition.enabled = false` the store keeps nothing: an aggregator that only relays
//! to databases then spends neither the memory nor the hash-map lookup per sample, which
//! misses the CPU cache for nearly every sample of a large fleet.

use std::borrow::Cow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use foldhash::HashMap;
use picket_core::codec;
use picket_core::model::{Family, Labels, MetricType, Point, Value};
use picket_proto::v1::{FlatBatch, FlatFamily, FlatValue};

/// A series' label set as the store keys it: the pairs sorted by name, each written as
/// varint length and bytes of the name, then of the value. Lengths make it injective (a
/// value may hold any byte), and two label sets are equal exactly when their keys are.
type SeriesKey = Box<[u8]>;

struct Entry {
    timestamp_ms: i64,
    value: Value,
    updated: Instant,
}

struct FamilyEntry {
    kind: MetricType,
    help: String,
    /// Each series' slot in [`Families::slots`].
    series: HashMap<SeriesKey, u32>,
}

/// What the store's lock guards: the families, and their series' entries in slots that
/// stay where they are while the series lives, so a [`StoreRoute`] can find them again.
#[derive(Default)]
struct Families {
    by_name: HashMap<String, FamilyEntry>,
    slots: Vec<Slot>,
    /// Slots without a series, to be reused.
    free: Vec<u32>,
    /// Counts the times the store forgot everything (turned off), so routes from before
    /// cannot find slots numbered the same since.
    resets: u64,
}

struct Slot {
    entry: Option<Entry>,
    /// Advanced each time the slot is freed: a route to the slot's earlier series no longer
    /// matches it.
    generation: u32,
}

/// Where a batch's series are in the store, point by point in the batch's order, as the last
/// full application of a batch found them ([`LatestStore::apply_flat`]). An agent's next
/// batch of the same skeleton has the same series in the same order, so its values can go
/// straight to those slots ([`LatestStore::apply_points`]) without building a key or looking
/// one up per series (two fifths of an aggregator's CPU with the store on: docs/performance.md).
#[derive(Debug, Default)]
pub struct StoreRoute {
    resets: u64,
    /// Per point: its series' slot and the slot's generation then; `None` for a point the
    /// store did not keep (a stale marker, an older sample of a series not stored).
    slots: Vec<Option<(u32, u32)>>,
}

pub struct LatestStore {
    ttl: Mutex<Duration>,
    enabled: AtomicBool,
    families: Mutex<Families>,
}

impl LatestStore {
    pub fn new(ttl: Duration) -> Self {
        LatestStore {
            ttl: Mutex::new(ttl),
            enabled: AtomicBool::new(true),
            families: Mutex::new(Families::default()),
        }
    }

    pub fn set_ttl(&self, ttl: Duration) {
        *lock(&self.ttl) = ttl;
    }

    /// Whether the store keeps series; turning it off forgets every series it has.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
        if !enabled {
            let mut store = lock(&self.families);
            let resets = store.resets + 1;
            *store = Families {
                resets,
                ..Families::default()
            };
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Applies every point of `families` (nothing, when the store is off).
    pub fn apply(&self, families: &[Family]) {
        if !self.is_enabled() {
            return;
        }
        let now = Instant::now();
        let mut key = Vec::new();
        let mut store = lock(&self.families);
        for family in families {
            for point in &family.points {
                key.clear();
                append_key(point.labels.iter(), &mut key);
                let value = point.value.clone();
                store.apply_point(
                    &family.name,
                    family.kind,
                    &family.help,
                    &key,
                    point.timestamp_ms,
                    value,
                    now,
                );
            }
        }
        store.drop_empty_families();
    }

    /// [`LatestStore::apply`] for a batch read in place, which `codec::validate_flat_batch`
    /// has accepted; the store then holds what applying its decoding would. Each series'
    /// labels (the batch's common labels and its own) are sorted as borrowed strings and
    /// encoded into one buffer for the whole batch, so a series already stored costs no
    /// allocation (a summary's or histogram's value still does). `route` learns where the
    /// batch's series are, for [`LatestStore::apply_points`].
    pub fn apply_flat(&self, batch: &FlatBatch, route: &mut StoreRoute) {
        route.slots.clear();
        if !self.is_enabled() {
            return;
        }
        let symbols = batch.symbols();
        // Keys and values first, outside the lock that other streams' batches and `/metrics`
        // wait on: under it only the lookups run.
        let mut keys = Vec::new();
        let mut key_ends = Vec::new();
        let mut values = Vec::new();
        let mut common = Vec::new();
        pairs_of(symbols, batch.common_labels(), &mut common);
        let mut labels: Vec<(&str, &str)> = Vec::new();
        for wire_family in batch.families() {
            let Some((_, kind, _)) = family_header(symbols, wire_family) else {
                continue;
            };
            for series in batch.series(wire_family) {
                labels.clone_from(&common);
                pairs_of(symbols, batch.labels(series), &mut labels);
                // Names are unique within a validated label set, so the order is total.
                labels.sort_unstable_by(|a, b| a.0.cmp(b.0));
                append_key(labels.iter().copied(), &mut keys);
                key_ends.push(keys.len());
                for point in batch.points(series) {
                    values.push(codec::point_value(batch, kind, point).ok());
                }
            }
        }

        let (mut key_ends, mut values) = (key_ends.into_iter(), values.into_iter());
        let mut key_start = 0;
        let now = Instant::now();
        let mut store = lock(&self.families);
        route.resets = store.resets;
        // The same walk as above, so the n-th series takes the n-th key.
        for wire_family in batch.families() {
            let Some((name, kind, help)) = family_header(symbols, wire_family) else {
                // Only for what validation refuses: the points stay unrouted.
                route.slots.extend(
                    batch
                        .series(wire_family)
                        .iter()
                        .flat_map(|s| batch.points(s))
                        .map(|_| None),
                );
                continue;
            };
            for series in batch.series(wire_family) {
                let Some(key_end) = key_ends.next() else {
                    return;
                };
                let key = keys.get(key_start..key_end).unwrap_or_default();
                key_start = key_end;
                for point in batch.points(series) {
                    let slot = match values.next() {
                        Some(Some(value)) => {
                            store.apply_point(name, kind, help, key, point.timestamp_ms, value, now)
                        }
                        _ => None,
                    };
                    route.slots.push(slot);
                }
            }
        }
        store.drop_empty_families();
    }

    /// Applies a batch read by `FlatBatch::parse_skeleton` (or through a `BatchTemplate`)
    /// whose skeleton is that of the batch `route` was made from, by the route: each value
    /// goes to its series' slot, as applying the batch in full would. Its points must have
    /// passed `codec::validate_points` (ingest checks them before): they are not checked
    /// again. Returns `false`, having applied nothing, where the route cannot be followed: a
    /// series it leads to has left the store (or the store was off since), or the batch has
    /// a stale marker or a point the route did not store (removals and new series need the
    /// labels). Apply the batch in full then.
    ///
    /// Families' help texts are left as they are: the batch's are those of the batch the
    /// route came from, which applied them (another source sending the same family with
    /// another help text keeps its text until this stream's next full application).
    pub fn apply_points(&self, points: &FlatBatch, route: &StoreRoute) -> bool {
        if !self.is_enabled() {
            return true;
        }
        // Outside the lock: every point routed and none stale, and the values of summaries
        // and histograms built (they allocate). Numbers, nearly every point, are written
        // under the lock straight from the batch: building and moving a `Value` for each
        // was most of this function's time.
        let mut built = Vec::new();
        let mut count = 0;
        for family in points.families() {
            let Some(kind) = codec::metric_type(family.r#type) else {
                return false;
            };
            for series in points.series(family) {
                for point in points.points(series) {
                    match point.value() {
                        Some(FlatValue::Number(_)) => {}
                        Some(FlatValue::Stale) | None => return false,
                        Some(_) => match codec::point_value(points, kind, point) {
                            Ok(value) => built.push(value),
                            Err(_) => return false,
                        },
                    }
                    count += 1;
                }
            }
        }
        if count != route.slots.len() || route.slots.iter().any(Option::is_none) {
            return false;
        }
        let now = Instant::now();
        let mut store = lock(&self.families);
        let valid = store.resets == route.resets
            && route.slots.iter().flatten().all(|&(slot, generation)| {
                store
                    .slots
                    .get(slot as usize)
                    .is_some_and(|s| s.generation == generation && s.entry.is_some())
            });
        if !valid {
            return false;
        }
        let mut slots = route.slots.iter().flatten();
        let mut built = built.into_iter();
        for family in points.families() {
            for series in points.series(family) {
                for point in points.points(series) {
                    let number = match point.value() {
                        Some(FlatValue::Number(v)) => Some(v),
                        _ => None,
                    };
                    // Taken in order, whether or not it is applied.
                    let value = match number {
                        Some(v) => Value::Number(v),
                        None => match built.next() {
                            Some(value) => value,
                            None => continue,
                        },
                    };
                    let entry = slots
                        .next()
                        .and_then(|&(slot, _)| store.slots.get_mut(slot as usize))
                        .and_then(|slot| slot.entry.as_mut());
                    let Some(entry) = entry else { continue };
                    if entry.timestamp_ms > point.timestamp_ms {
                        continue;
                    }
                    match (&mut entry.value, number) {
                        (Value::Number(stored), Some(v)) => *stored = v,
                        (stored, _) => *stored = value,
                    }
                    entry.timestamp_ms = point.timestamp_ms;
                    entry.updated = now;
                }
            }
        }
        true
    }

    /// Removes series not updated within the TTL.
    pub fn expire(&self) {
        let ttl = *lock(&self.ttl);
        let mut store = lock(&self.families);
        let Families {
            by_name,
            slots,
            free,
            ..
        } = &mut *store;
        for family in by_name.values_mut() {
            family.series.retain(|_, &mut slot| {
                let live = slots[slot as usize]
                    .entry
                    .as_ref()
                    .is_some_and(|e| e.updated.elapsed() < ttl);
                if !live {
                    release(slots, free, slot);
                }
                live
            });
        }
        store.drop_empty_families();
    }

    pub fn series_count(&self) -> usize {
        lock(&self.families)
            .by_name
            .values()
            .map(|f| f.series.len())
            .sum()
    }

    /// A snapshot of every live series, families and series sorted for stable output.
    pub fn snapshot(&self) -> Vec<Family> {
        let ttl = *lock(&self.ttl);
        let store = lock(&self.families);
        let mut names: Vec<&String> = store.by_name.keys().collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let entry = &store.by_name[name];
            let mut family = Family::new(name.as_str(), entry.kind, entry.help.as_str());
            let mut series: Vec<(Labels, &Entry)> = entry
                .series
                .iter()
                .filter_map(|(key, &slot)| Some((key, store.slots[slot as usize].entry.as_ref()?)))
                .filter(|(_, e)| e.updated.elapsed() < ttl)
                .filter_map(|(key, e)| {
                    let labels = decode_key(key);
                    debug_assert!(labels.is_some(), "a key the store did not write: {key:?}");
                    Some((labels?, e))
                })
                .collect();
            series.sort_by(|a, b| a.0.cmp(&b.0));
            family.points = series
                .into_iter()
                .map(|(labels, e)| Point {
                    labels,
                    timestamp_ms: e.timestamp_ms,
                    value: e.value.clone(),
                })
                .collect();
            if !family.points.is_empty() {
                out.push(family);
            }
        }
        out
    }
}

fn symbol<'b>(symbols: &'b [Cow<'_, str>], index: u32) -> Option<&'b str> {
    symbols.get(index as usize).map(|s| &**s)
}

/// Appends the label pairs that `indices` (name, value, name, …) stand for.
fn pairs_of<'b>(symbols: &'b [Cow<'_, str>], indices: &[u32], into: &mut Vec<(&'b str, &'b str)>) {
    for pair in indices.chunks_exact(2) {
        // A validated batch has every index; skipping is only a guard.
        if let (Some(name), Some(value)) = (symbol(symbols, pair[0]), symbol(symbols, pair[1])) {
            into.push((name, value));
        }
    }
}

/// A wire family's name, type and help; `None` for what validation refuses (an unknown type
/// or a name outside the symbol table).
fn family_header<'b>(
    symbols: &'b [Cow<'_, str>],
    family: &FlatFamily,
) -> Option<(&'b str, MetricType, &'b str)> {
    let name = symbol(symbols, family.name)?;
    let kind = codec::metric_type(family.r#type)?;
    Some((name, kind, symbol(symbols, family.help).unwrap_or("")))
}

/// Appends the [`SeriesKey`] of `pairs` (sorted by name) to `key`.
fn append_key<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>, key: &mut Vec<u8>) {
    for (name, value) in pairs {
        for text in [name, value] {
            // Nearly every name and value is shorter than 128 bytes: one length byte, and
            // none of the general varint loop (a few % of the relay's profile otherwise).
            match u8::try_from(text.len()) {
                Ok(len) if len < 0x80 => key.push(len),
                _ => prost::encoding::encode_varint(text.len() as u64, key),
            }
            key.extend_from_slice(text.as_bytes());
        }
    }
}

/// The label set a [`SeriesKey`] stands for; `None` only for bytes that [`append_key`] did
/// not write.
fn decode_key(mut key: &[u8]) -> Option<Labels> {
    let mut labels = Labels::new();
    while !key.is_empty() {
        let name = take_text(&mut key)?;
        let value = take_text(&mut key)?;
        labels.insert(name, value);
    }
    Some(labels)
}

/// One length-prefixed string off the front of a [`SeriesKey`].
fn take_text<'k>(key: &mut &'k [u8]) -> Option<&'k str> {
    let len = usize::try_from(prost::encoding::decode_varint(key).ok()?).ok()?;
    let (bytes, rest) = key.split_at_checked(len)?;
    *key = rest;
    std::str::from_utf8(bytes).ok()
}

impl Families {
    /// The entry for a family, created when new. A family whose type changed loses its
    /// series; a non-empty help replaces the one stored.
    fn family(&mut self, name: &str, kind: MetricType, help: &str) -> &mut FamilyEntry {
        if !self.by_name.contains_key(name) {
            self.by_name.insert(
                name.to_owned(),
                FamilyEntry {
                    kind,
                    help: help.to_owned(),
                    series: HashMap::default(),
                },
            );
        }
        let Families {
            by_name,
            slots,
            free,
            ..
        } = self;
        let entry = by_name
            .get_mut(name)
            .unwrap_or_else(|| unreachable!("inserted just above"));
        if entry.kind != kind {
            // Sources disagree on the type (e.g. a Flink upgrade changed it): the newest
            // wins, and series of the old type go, since mixing types breaks exposition.
            entry.kind = kind;
            for (_, slot) in entry.series.drain() {
                release(slots, free, slot);
            }
        }
        if !help.is_empty() && entry.help != help {
            help.clone_into(&mut entry.help);
        }
        entry
    }

    /// Applies one point to the series `key` of family `name`. Returns the series' slot and
    /// its generation if the store holds the series afterwards.
    #[allow(clippy::too_many_arguments)]
    fn apply_point(
        &mut self,
        name: &str,
        kind: MetricType,
        help: &str,
        key: &[u8],
        timestamp_ms: i64,
        value: Value,
        now: Instant,
    ) -> Option<(u32, u32)> {
        self.family(name, kind, help);
        let Families {
            by_name,
            slots,
            free,
            ..
        } = self;
        let series = &mut by_name.get_mut(name)?.series;
        let existing = series.get(key).copied();
        match existing {
            Some(slot) => {
                let held = &mut slots[slot as usize];
                let generation = held.generation;
                match &mut held.entry {
                    Some(entry) if entry.timestamp_ms > timestamp_ms => {}
                    _ if value == Value::Stale => {
                        series.remove(key);
                        release(slots, free, slot);
                        return None;
                    }
                    Some(entry) => {
                        entry.timestamp_ms = timestamp_ms;
                        entry.value = value;
                        entry.updated = now;
                    }
                    None => {}
                }
                Some((slot, generation))
            }
            None if value == Value::Stale => None,
            None => {
                let entry = Some(Entry {
                    timestamp_ms,
                    value,
                    updated: now,
                });
                let slot = match free.pop() {
                    Some(slot) => {
                        slots[slot as usize].entry = entry;
                        slot
                    }
                    None => {
                        // Four billion series would need hundreds of GiB first.
                        let slot = u32::try_from(slots.len()).ok()?;
                        slots.push(Slot {
                            entry,
                            generation: 0,
                        });
                        slot
                    }
                };
                series.insert(key.into(), slot);
                Some((slot, slots[slot as usize].generation))
            }
        }
    }

    fn drop_empty_families(&mut self) {
        self.by_name.retain(|_, f| !f.series.is_empty());
    }
}

/// Frees a slot whose series left the store.
fn release(slots: &mut [Slot], free: &mut Vec<u32>, slot: u32) {
    if let Some(held) = slots.get_mut(slot as usize) {
        held.entry = None;
        held.generation = held.generation.wrapping_add(1);
        free.push(slot);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(labels: &[(&str, &str)], ts: i64, v: Value) -> Family {
        let mut f = Family::new("g", MetricType::Gauge, "help");
        f.points.push(Point {
            labels: Labels::from_pairs(labels.iter().copied()),
            timestamp_ms: ts,
            value: v,
        });
        f
    }

    fn values(store: &LatestStore) -> Vec<(String, i64)> {
        store
            .snapshot()
            .into_iter()
            .flat_map(|f| f.points)
            .map(|p| (p.labels.to_string(), p.timestamp_ms))
            .collect()
    }

    #[test]
    fn keeps_newest_and_ignores_older_resends() {
        let s = LatestStore::new(Duration::from_secs(60));
        s.apply(&[gauge(&[("a", "1")], 20, Value::Number(2.0))]);
        s.apply(&[gauge(&[("a", "1")], 10, Value::Number(1.0))]);
        assert_eq!(values(&s), vec![("{a=\"1\"}".to_owned(), 20)]);
    }

    #[test]
    fn stale_marker_removes_series() {
        let s = LatestStore::new(Duration::from_secs(60));
        s.apply(&[gauge(&[("a", "1")], 10, Value::Number(1.0))]);
        s.apply(&[gauge(&[("a", "2")], 10, Value::Number(1.0))]);
        s.apply(&[gauge(&[("a", "1")], 20, Value::Stale)]);
        assert_eq!(values(&s), vec![("{a=\"2\"}".to_owned(), 10)]);
        assert_eq!(s.series_count(), 1);
    }

    #[test]
    fn series_expire_after_ttl() {
        let s = LatestStore::new(Duration::from_millis(20));
        s.apply(&[gauge(&[("a", "1")], 10, Value::Number(1.0))]);
        assert_eq!(s.series_count(), 1);
        std::thread::sleep(Duration::from_millis(40));
        assert!(s.snapshot().is_empty());
        s.expire();
        assert_eq!(s.series_count(), 0);
    }

    #[test]
    fn a_disabled_store_keeps_nothing_and_forgets_what_it_had() {
        let s = LatestStore::new(Duration::from_secs(60));
        s.apply(&[gauge(&[("a", "1")], 10, Value::Number(1.0))]);
        assert_eq!(s.series_count(), 1);
        s.set_enabled(false);
        assert_eq!(s.series_count(), 0);
        s.apply(&[gauge(&[("a", "2")], 20, Value::Number(2.0))]);
        assert_eq!(s.series_count(), 0);
        assert!(s.snapshot().is_empty());
        s.set_enabled(true);
        s.apply(&[gauge(&[("a", "2")], 30, Value::Number(3.0))]);
        let kept = values(&s);
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(kept[0].1, 30);
    }

    /// A batch as an agent sends it: `families` under `common` labels, encoded.
    fn wire(common: &[(&str, &str)], families: &[Family], sequence: u64) -> Vec<u8> {
        use prost::Message;
        let mut encoder =
            picket_core::codec::BatchEncoder::new(&Labels::from_pairs(common.iter().copied()));
        for family in families {
            encoder.push(family);
        }
        encoder.finish(sequence).encode_to_vec()
    }

    fn family(name: &str, kind: MetricType, points: Vec<(Labels, i64, Value)>) -> Family {
        crate::test_support::family(name, kind, &format!("{name} help"), points)
    }

    #[test]
    fn a_batch_read_in_place_is_stored_as_its_decoding() {
        use crate::test_support::labels;
        let summary = Value::Summary(picket_core::model::Summary {
            count: 3,
            sum: 1.5,
            quantiles: vec![(0.5, 0.25), (0.99, f64::NAN)],
        });
        let histogram = Value::Histogram(picket_core::model::Histogram {
            count: 4,
            sum: 9.0,
            buckets: vec![(1.0, 1), (f64::INFINITY, 4)],
        });
        // Common labels sort between and around the series' own ("instance" after "host",
        // "agent" first), values hold separators, escapes and non-ASCII text, and later
        // batches resend older samples, mark series stale and change a family's type.
        let common = [("instance", "pi-7"), ("agent", "a\"b")];
        let batches = [
            vec![
                family(
                    "flink_taskmanager_Status_JVM_CPU_Load",
                    MetricType::Gauge,
                    vec![
                        (
                            labels(&[("host", "tm-1"), ("job", "x")]),
                            10,
                            Value::Number(0.5),
                        ),
                        (
                            labels(&[("host", "tm-1\0"), ("job", "x")]),
                            10,
                            Value::Number(-0.0),
                        ),
                        (
                            labels(&[("zone", "é\u{0}1"), ("z", "")]),
                            10,
                            Value::Number(f64::NAN),
                        ),
                        (labels(&[]), 10, Value::Number(1.0)),
                    ],
                ),
                family(
                    "latency",
                    MetricType::Summary,
                    vec![(labels(&[("op", "map")]), 10, summary)],
                ),
                family(
                    "sizes",
                    MetricType::Histogram,
                    vec![(labels(&[("op", "map")]), 10, histogram)],
                ),
                family(
                    "records_total",
                    MetricType::Counter,
                    vec![
                        (labels(&[("op", "map")]), 10, Value::Number(5.0)),
                        (labels(&[("op", "map")]), 20, Value::Number(6.0)),
                        // Older, within the same batch: does not replace the newer one.
                        (labels(&[("op", "map")]), 15, Value::Number(7.0)),
                    ],
                ),
            ],
            vec![
                family(
                    "flink_taskmanager_Status_JVM_CPU_Load",
                    MetricType::Gauge,
                    vec![
                        (
                            labels(&[("host", "tm-1"), ("job", "x")]),
                            5,
                            Value::Number(9.0),
                        ),
                        (
                            labels(&[("host", "tm-1\0"), ("job", "x")]),
                            30,
                            Value::Stale,
                        ),
                        (labels(&[]), 30, Value::Number(2.0)),
                    ],
                ),
                family(
                    "latency",
                    MetricType::Gauge,
                    vec![(labels(&[("op", "map")]), 30, Value::Number(1.0))],
                ),
                {
                    // No help this time: the stored one stays.
                    let mut family = family(
                        "records_total",
                        MetricType::Counter,
                        vec![(labels(&[("op", "map")]), 30, Value::Number(8.0))],
                    );
                    family.help.clear();
                    family
                },
            ],
        ];
        let from_decoding = LatestStore::new(Duration::from_secs(60));
        let read_in_place = LatestStore::new(Duration::from_secs(60));
        for (sequence, families) in (1..).zip(&batches) {
            let bytes = wire(&common, families, sequence);
            let batch = picket_proto::v1::FlatBatch::parse(&bytes).expect("the agent's encoding");
            picket_core::codec::validate_flat_batch(&batch).unwrap();
            from_decoding.apply(
                &picket_core::codec::decode_flat_batch(&batch)
                    .unwrap()
                    .families,
            );
            read_in_place.apply_flat(&batch, &mut StoreRoute::default());
            // Debug output compares NaN values too (`PartialEq` would not).
            let (expected, got) = (from_decoding.snapshot(), read_in_place.snapshot());
            assert_eq!(
                format!("{got:?}"),
                format!("{expected:?}"),
                "after batch {sequence}"
            );
            assert_eq!(read_in_place.series_count(), from_decoding.series_count());
            let records = got.iter().find(|f| f.name == "records_total");
            let records = records.expect("records_total stored");
            assert_eq!(records.help, "records_total help");
            let expected = if sequence == 1 { (20, 6.0) } else { (30, 8.0) };
            let point = &records.points[0];
            assert_eq!(
                (point.timestamp_ms, point.value.clone()),
                (expected.0, Value::Number(expected.1))
            );
        }
        // Both readings key a series alike (the relabelling path applies decoded families to
        // the same store): the last batch again, each store taking it the other way, adds no
        // series.
        let (last, count) = (wire(&common, &batches[1], 3), read_in_place.series_count());
        let batch = picket_proto::v1::FlatBatch::parse(&last).expect("the agent's encoding");
        read_in_place.apply(
            &picket_core::codec::decode_flat_batch(&batch)
                .unwrap()
                .families,
        );
        from_decoding.apply_flat(&batch, &mut StoreRoute::default());
        assert_eq!(read_in_place.series_count(), count);
        assert_eq!(from_decoding.series_count(), count);
        // The figures the batches imply, so the comparisons above cannot pass on two empty
        // or equally wrong stores.
        let stored = values(&read_in_place);
        assert_eq!(stored.len(), 6, "{stored:?}");
        assert!(
            stored.contains(&(
                "{agent=\"a\\\"b\",host=\"tm-1\",instance=\"pi-7\",job=\"x\"}".to_owned(),
                10
            )),
            "{stored:?}"
        );
        assert!(
            stored.contains(&("{agent=\"a\\\"b\",instance=\"pi-7\"}".to_owned(), 30)),
            "{stored:?}"
        );
        let kinds: Vec<_> = read_in_place
            .snapshot()
            .iter()
            .map(|f| (f.name.clone(), f.kind))
            .collect();
        assert!(
            kinds.contains(&("latency".to_owned(), MetricType::Gauge)),
            "{kinds:?}"
        );
    }

    #[test]
    fn series_keys_tell_label_sets_apart_and_give_them_back() {
        let sets = [
            Labels::new(),
            Labels::from_pairs([("a", "")]),
            Labels::from_pairs([("a", "b")]),
            Labels::from_pairs([("a", "b"), ("c", "")]),
            Labels::from_pairs([("a", "b\u{1}c")]),
            Labels::from_pairs([("a", "\u{1}"), ("b", "c")]),
            Labels::from_pairs([("ab", "c")]),
            Labels::from_pairs([("a", "bc")]),
            Labels::from_pairs([("a", &"x".repeat(300))]),
        ];
        // Lengths around each varint step (one, two and three bytes).
        let long = [127, 128, 255, 256, 16_383, 16_384]
            .map(|len| Labels::from_pairs([("a".repeat(len.min(200)), "v".repeat(len))]));
        let sets: Vec<&Labels> = sets.iter().chain(&long).collect();
        let mut keys = std::collections::HashSet::new();
        for &labels in &sets {
            let mut key = Vec::new();
            append_key(labels.iter(), &mut key);
            assert_eq!(decode_key(&key).as_ref(), Some(labels));
            assert!(keys.insert(key), "{labels} shares its key with another set");
        }
        // Bytes the encoder did not write are refused, not misread.
        for bad in [&[5u8, b'a'][..], &[1, b'a'], &[1, 0xff, 0], &[0x80]] {
            assert_eq!(decode_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_series_is_one_series_whatever_order_its_labels_come_in() {
        use picket_proto::v1;
        use prost::Message;
        // Symbols: "", "m", "z", "1", "a", "2"; the agent sorts labels, but a batch need not.
        let batch = |labels: Vec<u32>, common: Vec<u32>, timestamp_ms| {
            v1::Batch {
                sequence: 1,
                symbols: ["", "m", "z", "1", "a", "2"].map(str::to_owned).to_vec(),
                common_labels: common,
                families: vec![v1::Family {
                    name: 1,
                    r#type: v1::MetricType::Gauge as i32,
                    help: 0,
                    series: vec![v1::Series {
                        labels,
                        points: vec![v1::Point {
                            timestamp_ms,
                            value: Some(v1::point::Value::Number(1.0)),
                        }],
                    }],
                }],
            }
            .encode_to_vec()
        };
        let store = LatestStore::new(Duration::from_secs(60));
        for (labels, common, timestamp_ms) in [
            (vec![2, 3, 4, 5], vec![], 10),
            (vec![4, 5, 2, 3], vec![], 20),
            (vec![4, 5], vec![2, 3], 30),
            (vec![2, 3], vec![4, 5], 40),
        ] {
            let bytes = batch(labels, common, timestamp_ms);
            let flat = picket_proto::v1::FlatBatch::parse(&bytes).expect("prost's encoding");
            picket_core::codec::validate_flat_batch(&flat).unwrap();
            store.apply_flat(&flat, &mut StoreRoute::default());
            if timestamp_ms == 40 {
                store.apply(
                    &picket_core::codec::decode_flat_batch(&flat)
                        .unwrap()
                        .families,
                );
            }
        }
        assert_eq!(values(&store), vec![("{a=\"2\",z=\"1\"}".to_owned(), 40)]);
    }

    /// One agent's round as read by the skeleton reading, with its bytes.
    fn round(families: &[Family], sequence: u64) -> Vec<u8> {
        wire(&[("instance", "pi-1")], families, sequence)
    }

    fn gauges(ts: i64, values: [f64; 3]) -> Vec<Family> {
        use crate::test_support::labels;
        let summary = Value::Summary(picket_core::model::Summary {
            count: ts as u64,
            sum: values[0],
            quantiles: vec![(0.5, values[1])],
        });
        vec![
            family(
                "load",
                MetricType::Gauge,
                vec![
                    (labels(&[("cpu", "0")]), ts, Value::Number(values[0])),
                    (labels(&[("cpu", "1")]), ts, Value::Number(values[1])),
                ],
            ),
            family(
                "latency",
                MetricType::Summary,
                vec![(labels(&[("op", "map")]), ts, summary)],
            ),
            family(
                "records",
                MetricType::Counter,
                vec![(labels(&[]), ts, Value::Number(values[2]))],
            ),
        ]
    }

    fn points(bytes: &[u8]) -> picket_proto::v1::FlatBatch<'_> {
        picket_proto::v1::FlatBatch::parse_skeleton(bytes, &mut Vec::new()).expect("skeleton")
    }

    fn full(bytes: &[u8]) -> picket_proto::v1::FlatBatch<'_> {
        picket_proto::v1::FlatBatch::parse(bytes).expect("the agent's encoding")
    }

    /// Later rounds applied by the route leave the store as applying them in full does,
    /// older resends included.
    #[test]
    fn a_route_applies_later_rounds_as_the_full_way_does() {
        let by_route = LatestStore::new(Duration::from_secs(60));
        let in_full = LatestStore::new(Duration::from_secs(60));
        let mut route = StoreRoute::default();
        let first = round(&gauges(10, [1.0, 2.0, 3.0]), 1);
        by_route.apply_flat(&full(&first), &mut route);
        in_full.apply_flat(&full(&first), &mut StoreRoute::default());
        assert_eq!(route.slots.len(), 4);
        for (sequence, ts, values) in [
            (2, 20, [4.0, f64::NAN, 6.0]),
            (3, 15, [7.0, 8.0, 9.0]),
            (4, 30, [-1.0, 0.0, 1.0]),
        ] {
            let bytes = round(&gauges(ts, values), sequence);
            assert!(
                by_route.apply_points(&points(&bytes), &route),
                "round {sequence}"
            );
            in_full.apply_flat(&full(&bytes), &mut StoreRoute::default());
            let (expected, got) = (in_full.snapshot(), by_route.snapshot());
            assert_eq!(
                format!("{got:?}"),
                format!("{expected:?}"),
                "round {sequence}"
            );
        }
        let load = by_route.snapshot();
        let load = &load.iter().find(|f| f.name == "load").unwrap().points[0];
        assert_eq!(
            (load.timestamp_ms, load.value.clone()),
            (30, Value::Number(-1.0))
        );
    }

    /// A route is refused, and nothing of the batch applied, once a series it leads to has
    /// left the store, even when another series took its slot since; when the batch carries
    /// a stale marker; and after the store was turned off and on. The full way then routes
    /// again.
    #[test]
    fn a_route_is_refused_once_it_may_lead_elsewhere() {
        let store = LatestStore::new(Duration::from_secs(60));
        let mut route = StoreRoute::default();
        let first = round(&gauges(10, [1.0, 2.0, 3.0]), 1);
        store.apply_flat(&full(&first), &mut route);
        let before = format!("{:?}", store.snapshot());

        // Another source's stale marker removes `load{cpu="1"}`; a new series reuses its slot.
        let gone = vec![family(
            "load",
            MetricType::Gauge,
            vec![(
                crate::test_support::labels(&[("cpu", "1"), ("instance", "pi-1")]),
                11,
                Value::Stale,
            )],
        )];
        store.apply(&gone);
        let newcomer = vec![family(
            "other",
            MetricType::Gauge,
            vec![(
                crate::test_support::labels(&[("x", "y")]),
                11,
                Value::Number(42.0),
            )],
        )];
        store.apply(&newcomer);
        assert_eq!(store.series_count(), 4, "a slot was freed and taken again");
        let second = round(&gauges(20, [4.0, 5.0, 6.0]), 2);
        let snapshot = format!("{:?}", store.snapshot());
        assert!(!store.apply_points(&points(&second), &route));
        assert_eq!(
            format!("{:?}", store.snapshot()),
            snapshot,
            "nothing applied"
        );
        assert_ne!(snapshot, before);
        let other = store.snapshot();
        let other = &other.iter().find(|f| f.name == "other").unwrap().points[0];
        assert_eq!(other.value, Value::Number(42.0), "the newcomer untouched");

        // The full way routes again, and the route then holds.
        store.apply_flat(&full(&second), &mut route);
        let third = round(&gauges(30, [7.0, 8.0, 9.0]), 3);
        assert!(store.apply_points(&points(&third), &route));

        // A stale marker in the batch needs the full way (it removes a series).
        let mut stale = gauges(40, [1.0, 1.0, 1.0]);
        stale[0].points[0].value = Value::Stale;
        let stale = round(&stale, 4);
        let snapshot = format!("{:?}", store.snapshot());
        assert!(!store.apply_points(&points(&stale), &route));
        assert_eq!(
            format!("{:?}", store.snapshot()),
            snapshot,
            "nothing applied"
        );

        // Off and on again: the old route leads nowhere.
        store.set_enabled(false);
        assert!(
            store.apply_points(&points(&third), &route),
            "nothing to do while off"
        );
        store.set_enabled(true);
        store.apply(&gauges(5, [0.0; 3]));
        assert!(!store.apply_points(&points(&third), &route));
    }
}

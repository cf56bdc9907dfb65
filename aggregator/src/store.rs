//! The latest sample of every live series, served at `/metrics`.
//!
//! A series leaves the store when its agent sends a stale marker for it (the source stopped
//! reporting it) or when nothing updated it for `exposition.series_ttl`, so dead agents and
//! finished Flink jobs do not linger. An older sample never replaces a newer one, which keeps
//! the store right when an agent resends batches after a reconnect.
//!
//! With `exposition.enabled = false` the store keeps nothing: an aggregator that only relays
//! to databases then spends neither the memory (one label set per series) nor the hash-map
//! lookup per sample, which misses the CPU cache for nearly every sample of a large fleet.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use foldhash::HashMap;
use picket_core::model::{Family, Labels, MetricType, Point, Value};

struct Entry {
    timestamp_ms: i64,
    value: Value,
    updated: Instant,
}

struct FamilyEntry {
    kind: MetricType,
    help: String,
    series: HashMap<Labels, Entry>,
}

pub struct LatestStore {
    ttl: Mutex<Duration>,
    enabled: AtomicBool,
    families: Mutex<HashMap<String, FamilyEntry>>,
}

impl LatestStore {
    pub fn new(ttl: Duration) -> Self {
        LatestStore {
            ttl: Mutex::new(ttl),
            enabled: AtomicBool::new(true),
            families: Mutex::new(HashMap::default()),
        }
    }

    pub fn set_ttl(&self, ttl: Duration) {
        *lock(&self.ttl) = ttl;
    }

    /// Whether the store keeps series; turning it off forgets every series it has.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
        if !enabled {
            lock(&self.families).clear();
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
        let mut store = lock(&self.families);
        for family in families {
            let entry = store
                .entry(family.name.clone())
                .or_insert_with(|| FamilyEntry {
                    kind: family.kind,
                    help: family.help.clone(),
                    series: HashMap::default(),
                });
            if entry.kind != family.kind {
                // Sources disagree on the type (e.g. a Flink upgrade changed it): the newest
                // wins, and series of the old type go, since mixing types breaks exposition.
                entry.kind = family.kind;
                entry.series.clear();
            }
            if !family.help.is_empty() {
                entry.help.clone_from(&family.help);
            }
            for point in &family.points {
                apply_point(&mut entry.series, point, now);
            }
        }
        store.retain(|_, f| !f.series.is_empty());
    }

    /// Removes series not updated within the TTL.
    pub fn expire(&self) {
        let ttl = *lock(&self.ttl);
        let mut store = lock(&self.families);
        for family in store.values_mut() {
            family.series.retain(|_, e| e.updated.elapsed() < ttl);
        }
        store.retain(|_, f| !f.series.is_empty());
    }

    pub fn series_count(&self) -> usize {
        lock(&self.families).values().map(|f| f.series.len()).sum()
    }

    /// A snapshot of every live series, families and series sorted for stable output.
    pub fn snapshot(&self) -> Vec<Family> {
        let ttl = *lock(&self.ttl);
        let store = lock(&self.families);
        let mut names: Vec<&String> = store.keys().collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let entry = &store[name];
            let mut family = Family::new(name.as_str(), entry.kind, entry.help.as_str());
            let mut series: Vec<(&Labels, &Entry)> = entry
                .series
                .iter()
                .filter(|(_, e)| e.updated.elapsed() < ttl)
                .collect();
            series.sort_by(|a, b| a.0.cmp(b.0));
            family.points = series
                .into_iter()
                .map(|(labels, e)| Point {
                    labels: labels.clone(),
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

fn apply_point(series: &mut HashMap<Labels, Entry>, point: &Point, now: Instant) {
    match series.get_mut(&point.labels) {
        Some(existing) if existing.timestamp_ms > point.timestamp_ms => {}
        Some(_) if point.value == Value::Stale => {
            series.remove(&point.labels);
        }
        Some(existing) => {
            existing.timestamp_ms = point.timestamp_ms;
            existing.value = point.value.clone();
            existing.updated = now;
        }
        None if point.value == Value::Stale => {}
        None => {
            series.insert(
                point.labels.clone(),
                Entry {
                    timestamp_ms: point.timestamp_ms,
                    value: point.value.clone(),
                    updated: now,
                },
            );
        }
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
}

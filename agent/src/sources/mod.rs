//! Metric sources the agent collects from each round.
//!
//! One source is built in: `internal` (the agent's own counters); everything else comes from
//! plugins. [`StalenessTracker`] turns series that disappear
//! between rounds (an unplugged disk, a finished Flink job) into stale markers, so downstream
//! systems drop them at once instead of waiting for a timeout.

pub mod internal;

use std::collections::HashSet;

use picket_core::model::{Family, Labels, Point, Value};

/// Remembers which series a source reported last round.
#[derive(Default)]
pub struct StalenessTracker {
    last: HashSet<(String, Labels)>,
}

impl StalenessTracker {
    /// Appends a stale point at `timestamp_ms` for every series reported last round but not in
    /// `families`, then remembers this round's series.
    pub fn mark(&mut self, families: &mut Vec<Family>, timestamp_ms: i64) {
        let mut current = HashSet::with_capacity(self.last.len());
        for family in families.iter() {
            for point in &family.points {
                current.insert((family.name.clone(), point.labels.clone()));
            }
        }
        let mut index: std::collections::HashMap<String, usize> = families
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect();
        for (name, labels) in self.last.difference(&current) {
            let point = Point {
                labels: labels.clone(),
                timestamp_ms,
                value: Value::Stale,
            };
            match index.get(name) {
                Some(&i) => families[i].points.push(point),
                None => {
                    // The whole family vanished; its type does not matter for a stale marker.
                    let mut family =
                        Family::new(name.clone(), picket_core::model::MetricType::Untyped, "");
                    family.points.push(point);
                    index.insert(name.clone(), families.len());
                    families.push(family);
                }
            }
        }
        self.last = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use picket_core::model::MetricType;

    #[test]
    fn vanished_series_get_a_stale_marker_once() {
        let mut tracker = StalenessTracker::default();
        let round = |devices: &[&str]| {
            let mut f = Family::new("rx_bytes_total", MetricType::Counter, "");
            for d in devices {
                f.push(Labels::from_pairs([("device", *d)]), 1, 1.0);
            }
            vec![f]
        };
        let mut first = round(&["eth0", "wlan0"]);
        tracker.mark(&mut first, 1);
        assert_eq!(first[0].points.len(), 2);

        let mut second = round(&["eth0"]);
        tracker.mark(&mut second, 2);
        let stale: Vec<_> = second[0]
            .points
            .iter()
            .filter(|p| p.value == Value::Stale)
            .collect();
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].labels.get("device"), Some("wlan0"));
        assert_eq!(stale[0].timestamp_ms, 2);

        let mut third = round(&["eth0"]);
        tracker.mark(&mut third, 3);
        assert!(third[0].points.iter().all(|p| p.value != Value::Stale));

        let mut gone: Vec<Family> = Vec::new();
        tracker.mark(&mut gone, 4);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].points[0].value, Value::Stale);
    }
}

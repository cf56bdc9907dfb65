//! Builders shared by the unit tests of several components.

use picket_core::model::{Family, Labels, MetricType, Point, Value};

/// A label set from literal pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    Labels::from_pairs(pairs.iter().copied())
}

/// A family with `help` and one point per (labels, timestamp, value).
pub fn family(
    name: &str,
    kind: MetricType,
    help: &str,
    points: Vec<(Labels, i64, Value)>,
) -> Family {
    let mut family = Family::new(name, kind, help);
    family.points = points
        .into_iter()
        .map(|(labels, timestamp_ms, value)| Point {
            labels,
            timestamp_ms,
            value,
        })
        .collect();
    family
}

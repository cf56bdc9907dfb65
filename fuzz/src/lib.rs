//! Helpers shared by the fuzz targets: splitting one input into parts, and the checks of what
//! the parsers promise about their output. A broken promise panics, which libFuzzer reports as
//! a crash like any other.

use std::collections::HashSet;

use picket_core::model::{self, is_valid_label_name, is_valid_metric_name};
use picket_plugin_sdk::types as sdk;

/// Splits `data` at each `separator`, at most `max` parts (the last one keeps the rest).
pub fn split<'a>(data: &'a [u8], separator: &[u8], max: usize) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < max {
        let Some(at) = rest
            .windows(separator.len())
            .position(|window| window == separator)
        else {
            break;
        };
        parts.push(&rest[..at]);
        rest = &rest[at + separator.len()..];
    }
    parts.push(rest);
    parts
}

/// The first line of `data` (without its `\n`) and the rest.
pub fn first_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[]),
    }
}

/// What a plugin's families must be for the agent to take them (`agent/src/plugins/convert.rs`):
/// valid metric and label names, no label twice, and values its model can hold.
pub fn check_plugin_families(families: &[sdk::Family]) {
    for family in families {
        assert!(
            is_valid_metric_name(&family.name),
            "bad family name {:?}",
            family.name
        );
        for sample in &family.samples {
            let mut seen = HashSet::new();
            for label in &sample.labels {
                assert!(
                    is_valid_label_name(&label.name),
                    "{}: bad label name {:?}",
                    family.name,
                    label.name
                );
                assert!(
                    seen.insert(label.name.as_str()),
                    "{}: label {} twice",
                    family.name,
                    label.name
                );
            }
            check_plugin_value(&family.name, family.kind, &sample.value);
        }
    }
}

fn check_plugin_value(name: &str, kind: sdk::MetricKind, value: &sdk::Value) {
    match value {
        sdk::Value::Number(_) => assert!(
            !matches!(kind, sdk::MetricKind::Summary | sdk::MetricKind::Histogram),
            "{name}: a number in a {kind:?} family"
        ),
        sdk::Value::Summary(summary) => {
            assert_eq!(kind, sdk::MetricKind::Summary, "{name}");
            for q in &summary.quantiles {
                assert!(
                    (0.0..=1.0).contains(&q.quantile),
                    "{name}: quantile {}",
                    q.quantile
                );
            }
        }
        sdk::Value::Histogram(histogram) => {
            assert_eq!(kind, sdk::MetricKind::Histogram, "{name}");
            for pair in histogram.buckets.windows(2) {
                assert!(
                    pair[0].upper_bound < pair[1].upper_bound,
                    "{name}: bucket bounds not increasing: {histogram:?}"
                );
                assert!(
                    pair[0].cumulative_count <= pair[1].cumulative_count,
                    "{name}: bucket counts decrease: {histogram:?}"
                );
            }
            for bucket in &histogram.buckets {
                assert!(!bucket.upper_bound.is_nan(), "{name}: NaN bound");
                assert!(
                    bucket.cumulative_count <= histogram.count,
                    "{name}: bucket above the count: {histogram:?}"
                );
            }
        }
    }
}

/// What the sinks and the wire codec expect of model families: valid names, label names that
/// are valid and not reserved (`__`), and values of the family's type.
pub fn check_model_families(families: &[model::Family]) {
    for family in families {
        assert!(
            is_valid_metric_name(&family.name),
            "bad family name {:?}",
            family.name
        );
        for point in &family.points {
            for (name, _) in point.labels.iter() {
                assert!(
                    is_valid_label_name(name) && !name.starts_with("__"),
                    "{}: bad label name {name:?}",
                    family.name
                );
            }
            if let Err(why) = point.value.check(family.kind) {
                panic!("{}{}: {why}", family.name, point.labels);
            }
        }
    }
}

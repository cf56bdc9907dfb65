//! Per-sink routing and relabelling: which series a sink receives, and the labels it adds or
//! removes on the way.
//!
//! Applied before a batch enters the sink's queue, so a sink never stores what it will not
//! send. Patterns are regular expressions matched against the whole name or value (as in
//! Prometheus relabelling: `flink_.*` does not match `xflink_a`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use picket_core::model::{Family, Labels, is_valid_label_name};
use regex::Regex;
use serde::{Deserialize, Deserializer};

/// A regular expression that must match the whole string.
#[derive(Debug, Clone)]
pub struct Pattern(Regex);

impl Pattern {
    pub fn new(source: &str) -> Result<Pattern, regex::Error> {
        Regex::new(&format!("^(?:{source})$")).map(Pattern)
    }

    pub fn matches(&self, text: &str) -> bool {
        self.0.is_match(text)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = String::deserialize(deserializer)?;
        Pattern::new(&source).map_err(|e| {
            serde::de::Error::custom(format!("invalid regular expression {source:?}: {e}"))
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Only metrics whose name matches one of these (all when empty).
    pub keep_metrics: Vec<Pattern>,
    /// Metrics whose name matches one of these are not sent.
    pub drop_metrics: Vec<Pattern>,
    /// Only series where every listed label matches (a missing label counts as "").
    pub keep_if: BTreeMap<String, Pattern>,
    /// Series where any listed label matches are not sent.
    pub drop_if: BTreeMap<String, Pattern>,
    /// Labels removed from every series.
    pub drop_labels: Vec<String>,
    /// Labels added to every series that does not already have them (Prometheus'
    /// `external_labels`: a series' own value wins).
    pub external_labels: BTreeMap<String, String>,
}

impl RoutingConfig {
    /// A label name in `external_labels` or `drop_labels` that no sink could accept.
    pub fn invalid_label(&self) -> Option<&str> {
        self.external_labels
            .keys()
            .chain(&self.drop_labels)
            .map(String::as_str)
            .find(|name| !is_valid_label_name(name) || name.starts_with("__"))
    }

    /// No rules: the sink receives every sample unchanged.
    pub fn is_identity(&self) -> bool {
        self.keep_metrics.is_empty()
            && self.drop_metrics.is_empty()
            && self.keep_if.is_empty()
            && self.drop_if.is_empty()
            && self.drop_labels.is_empty()
            && self.external_labels.is_empty()
    }

    fn wants_metric(&self, name: &str) -> bool {
        (self.keep_metrics.is_empty() || self.keep_metrics.iter().any(|p| p.matches(name)))
            && !self.drop_metrics.iter().any(|p| p.matches(name))
    }

    fn wants_series(&self, labels: &Labels) -> bool {
        self.keep_if
            .iter()
            .all(|(name, p)| p.matches(labels.get(name).unwrap_or("")))
            && !self
                .drop_if
                .iter()
                .any(|(name, p)| p.matches(labels.get(name).unwrap_or("")))
    }

    fn relabel(&self, labels: &Labels) -> Labels {
        let mut out = Labels::new();
        for (name, value) in labels.iter() {
            if !self.drop_labels.iter().any(|d| d == name) {
                out.insert(name, value);
            }
        }
        for (name, value) in &self.external_labels {
            if !out.contains(name) {
                out.insert(name.as_str(), value.as_str());
            }
        }
        out
    }

    /// The part of `families` this sink receives, relabelled, and the samples filtered out.
    pub fn apply<'a>(&self, families: &'a [Family]) -> (Cow<'a, [Family]>, usize) {
        if self.is_identity() {
            return (Cow::Borrowed(families), 0);
        }
        let mut filtered = 0;
        let mut out = Vec::with_capacity(families.len());
        for family in families {
            if !self.wants_metric(&family.name) {
                filtered += family.sample_count();
                continue;
            }
            let mut kept = Family::new(family.name.clone(), family.kind, family.help.clone());
            for point in &family.points {
                if !self.wants_series(&point.labels) {
                    filtered += point.value.sample_count();
                    continue;
                }
                let mut point = point.clone();
                point.labels = self.relabel(&point.labels);
                kept.points.push(point);
            }
            if !kept.points.is_empty() {
                out.push(kept);
            }
        }
        (Cow::Owned(out), filtered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use picket_core::model::MetricType;

    fn family(name: &str, series: &[&[(&str, &str)]]) -> Family {
        let mut f = Family::new(name, MetricType::Gauge, "");
        for labels in series {
            f.push(Labels::from_pairs(labels.iter().copied()), 1, 1.0);
        }
        f
    }

    fn routing(toml_text: &str) -> RoutingConfig {
        picket_core::config::parse("r.toml", toml_text).unwrap()
    }

    #[test]
    fn keep_and_drop_by_name_match_whole_names() {
        let r = routing("keep_metrics = [\"flink_.*\"]\ndrop_metrics = [\"flink_jvm_.*\"]\n");
        let input = [
            family("flink_x", &[&[]]),
            family("xflink_x", &[&[]]),
            family("flink_jvm_heap", &[&[]]),
        ];
        let (out, filtered) = r.apply(&input);
        let names: Vec<_> = out.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["flink_x"]);
        assert_eq!(filtered, 2);
    }

    #[test]
    fn label_conditions_and_relabelling() {
        let r = routing(
            r#"
drop_labels = ["task_attempt_id"]
[keep_if]
job_name = ".+"
[drop_if]
instance = "test-.*"
[external_labels]
datacenter = "dc1"
job_name = "never-overrides"
"#,
        );
        let input = [family(
            "m",
            &[
                &[
                    ("job_name", "etl"),
                    ("instance", "pi-1"),
                    ("task_attempt_id", "a"),
                ],
                &[("instance", "pi-2")],
                &[("job_name", "etl"), ("instance", "test-1")],
            ],
        )];
        let (out, filtered) = r.apply(&input);
        assert_eq!(filtered, 2);
        assert_eq!(out[0].points.len(), 1);
        let labels: Vec<_> = out[0].points[0].labels.iter().collect();
        assert_eq!(
            labels,
            [
                ("datacenter", "dc1"),
                ("instance", "pi-1"),
                ("job_name", "etl")
            ]
        );
    }

    #[test]
    fn no_routing_borrows_the_input() {
        let input = [family("m", &[&[]])];
        let (out, _) = RoutingConfig::default().apply(&input);
        assert!(matches!(out, Cow::Borrowed(_)));
    }

    #[test]
    fn bad_patterns_and_label_names_are_reported() {
        let e = picket_core::config::parse::<RoutingConfig>("r.toml", "keep_metrics = [\"(\"]\n")
            .unwrap_err();
        assert!(e.message.contains("invalid regular expression"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(1));
        let r = routing("[external_labels]\n\"bad-name\" = \"x\"\n");
        assert_eq!(r.invalid_label(), Some("bad-name"));
    }
}

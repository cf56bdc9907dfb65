//! Small builders so a collector reads as a list of metrics rather than record literals.

use crate::types::{Family, Label, MetricKind, Sample, Value};

/// Builds one metric family.
pub struct FamilyBuilder {
    family: Family,
}

impl FamilyBuilder {
    pub fn new(name: &str, kind: MetricKind, help: &str) -> Self {
        FamilyBuilder {
            family: Family {
                name: name.to_owned(),
                kind,
                help: help.to_owned(),
                samples: Vec::new(),
            },
        }
    }

    pub fn gauge(name: &str, help: &str) -> Self {
        Self::new(name, MetricKind::Gauge, help)
    }

    pub fn counter(name: &str, help: &str) -> Self {
        Self::new(name, MetricKind::Counter, help)
    }

    /// Adds a numeric sample stamped by the agent at collection time.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.push(labels, Value::Number(value), None)
    }

    /// Adds a sample of any value kind, with the source's own timestamp if it has one.
    pub fn push(
        &mut self,
        labels: &[(&str, &str)],
        value: Value,
        timestamp_ms: Option<i64>,
    ) -> &mut Self {
        self.family.samples.push(Sample {
            labels: labels
                .iter()
                .map(|(name, value)| Label {
                    name: (*name).to_owned(),
                    value: (*value).to_owned(),
                })
                .collect(),
            value,
            timestamp_ms,
        });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.family.samples.is_empty()
    }

    pub fn build(self) -> Family {
        self.family
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_samples_with_labels() {
        let mut f = FamilyBuilder::counter("x_total", "help");
        f.sample(&[("a", "1")], 2.0).sample(&[], 3.0);
        let f = f.build();
        assert_eq!(f.samples.len(), 2);
        assert_eq!(f.samples[0].labels[0].name, "a");
        assert!(matches!(f.samples[1].value, Value::Number(v) if v == 3.0));
    }
}

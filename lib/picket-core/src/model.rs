//! The metric model shared by collectors, the wire codec and exposition.
//!
//! It follows the Prometheus data model closely because that is what every source Picket reads
//! (hosts, Flink's reporters and REST API) and every sink it writes maps onto: a family has a
//! name, a type and help text; each point is one labelled sample at a millisecond timestamp.
//! Flink exports its histograms as summaries (quantiles 0, .5, .75, .95, .98, .99, .999, 1 and
//! a count), so summaries are first-class rather than folded into gauges.

use std::fmt;

/// Prometheus metric type of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricType {
    Untyped,
    Gauge,
    Counter,
    Summary,
    Histogram,
}

impl MetricType {
    /// The word used in a `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::Untyped => "untyped",
            MetricType::Gauge => "gauge",
            MetricType::Counter => "counter",
            MetricType::Summary => "summary",
            MetricType::Histogram => "histogram",
        }
    }
}

/// A label set, kept sorted by name with unique names so equal sets compare and hash equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub fn new() -> Self {
        Labels(Vec::new())
    }

    /// Builds a set from pairs; a later pair with the same name replaces an earlier one.
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut labels = Labels::new();
        for (name, value) in pairs {
            labels.insert(name, value);
        }
        labels
    }

    /// Sets `name` to `value`, replacing any previous value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.0.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (name, value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Labels {
    /// `{a="1",b="2"}`, the Prometheus selector form (values not escaped; for logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (n, v)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{n}={v:?}")?;
        }
        f.write_str("}")
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub sum: f64,
    /// `(quantile, value)` pairs, quantile in `[0, 1]`.
    pub quantiles: Vec<(f64, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub count: u64,
    pub sum: f64,
    /// `(upper_bound, cumulative_count)` pairs with increasing bounds.
    pub buckets: Vec<(f64, u64)>,
}

/// The value of one point.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Gauge, counter or untyped sample.
    Number(f64),
    Summary(Summary),
    Histogram(Histogram),
    /// The series stopped being reported at this point's timestamp.
    Stale,
}

impl Value {
    /// Whether this value may appear in a family of `kind`, with the invariants the wire
    /// decoder enforces (quantiles in [0, 1]; bucket bounds increasing, counts non-decreasing
    /// and within the total). Sources check their output with this so one bad value cannot
    /// get a whole batch rejected downstream.
    pub fn check(&self, kind: MetricType) -> Result<(), &'static str> {
        match (self, kind) {
            (Value::Stale, _) => Ok(()),
            (Value::Number(_), MetricType::Untyped | MetricType::Gauge | MetricType::Counter) => {
                Ok(())
            }
            (Value::Summary(s), MetricType::Summary) => {
                if s.quantiles.iter().all(|(q, _)| (0.0..=1.0).contains(q)) {
                    Ok(())
                } else {
                    Err("summary quantile outside [0, 1]")
                }
            }
            (Value::Histogram(h), MetricType::Histogram) => {
                let ordered = h
                    .buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
                let within = h.buckets.iter().all(|b| b.1 <= h.count && !b.0.is_nan());
                if ordered && within {
                    Ok(())
                } else {
                    Err("histogram buckets out of order or above the count")
                }
            }
            _ => Err("value kind does not match the family's type"),
        }
    }

    /// How many Prometheus samples this value expands to (a summary is its quantiles plus
    /// `_sum` and `_count`). Stale markers count as one: each removes one series.
    pub fn sample_count(&self) -> usize {
        match self {
            Value::Number(_) | Value::Stale => 1,
            Value::Summary(s) => s.quantiles.len() + 2,
            Value::Histogram(h) => h.buckets.len() + 3,
        }
    }
}

/// One labelled sample at a point in time.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub labels: Labels,
    pub timestamp_ms: i64,
    pub value: Value,
}

/// A metric family: name, type, help and its points.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: MetricType,
    pub help: String,
    pub points: Vec<Point>,
}

impl Family {
    pub fn new(name: impl Into<String>, kind: MetricType, help: impl Into<String>) -> Self {
        Family {
            name: name.into(),
            kind,
            help: help.into(),
            points: Vec::new(),
        }
    }

    /// Adds a numeric point.
    pub fn push(&mut self, labels: Labels, timestamp_ms: i64, value: f64) {
        self.points.push(Point {
            labels,
            timestamp_ms,
            value: Value::Number(value),
        });
    }

    pub fn sample_count(&self) -> usize {
        self.points.iter().map(|p| p.value.sample_count()).sum()
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`, the Prometheus metric name syntax.
pub fn is_valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, the Prometheus label name syntax.
pub fn is_valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_sorted_and_unique() {
        let labels = Labels::from_pairs([("b", "2"), ("a", "1"), ("b", "3")]);
        let pairs: Vec<_> = labels.iter().collect();
        assert_eq!(pairs, vec![("a", "1"), ("b", "3")]);
        assert_eq!(labels.get("b"), Some("3"));
        assert_eq!(labels.get("c"), None);
    }

    #[test]
    fn name_syntax() {
        assert!(is_valid_metric_name("flink_jobmanager_numRunningJobs"));
        assert!(is_valid_metric_name("a:b_c"));
        assert!(!is_valid_metric_name("1abc"));
        assert!(!is_valid_metric_name(""));
        assert!(!is_valid_metric_name("a-b"));
        assert!(is_valid_label_name("_x1"));
        assert!(!is_valid_label_name("a:b"));
    }

    #[test]
    fn sample_counts_expand_summaries_and_histograms() {
        let s = Value::Summary(Summary {
            count: 3,
            sum: 1.0,
            quantiles: vec![(0.5, 1.0), (0.99, 2.0)],
        });
        assert_eq!(s.sample_count(), 4);
        let h = Value::Histogram(Histogram {
            count: 3,
            sum: 1.0,
            buckets: vec![(1.0, 1), (2.0, 3)],
        });
        assert_eq!(h.sample_count(), 5);
    }
}

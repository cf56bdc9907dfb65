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
///
/// All names and values live in one text buffer, with the end offsets of each pair beside it:
/// a series' labels are two allocations, not two per label. The aggregator builds, hashes and
/// keeps one label set per sample and per live series, so this is most of its CPU per sample
/// and memory per series (docs/performance.md).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Labels {
    /// name₀ value₀ name₁ value₁ … without separators.
    text: String,
    /// Per pair: (end of its name, end of its value) in `text`.
    ends: Vec<(usize, usize)>,
}

impl Labels {
    pub fn new() -> Self {
        Labels::default()
    }

    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut labels = Labels::new();
        for (name, value) in pairs {
            labels.insert(name, value);
        }
        labels
    }

    fn start_of(&self, i: usize) -> usize {
        if i == 0 { 0 } else { self.ends[i - 1].1 }
    }

    fn pair(&self, i: usize) -> (&str, &str) {
        let (name_end, value_end) = self.ends[i];
        let start = self.start_of(i);
        (&self.text[start..name_end], &self.text[name_end..value_end])
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        let mut low = 0;
        let mut high = self.ends.len();
        while low < high {
            let mid = (low + high) / 2;
            match self.pair(mid).0.cmp(name) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(low)
    }

    /// Sets `name` to `value`, replacing any value it had.
    pub fn insert(&mut self, name: impl AsRef<str>, value: impl AsRef<str>) {
        let (name, value) = (name.as_ref(), value.as_ref());
        let (at, growth) = match self.find(name) {
            Ok(i) => {
                let (name_end, value_end) = self.ends[i];
                self.text.replace_range(name_end..value_end, value);
                self.ends[i].1 = name_end + value.len();
                (
                    i + 1,
                    value.len() as isize - (value_end - name_end) as isize,
                )
            }
            Err(i) => {
                let start = self.start_of(i);
                self.text.insert_str(start, value);
                self.text.insert_str(start, name);
                let name_end = start + name.len();
                self.ends.insert(i, (name_end, name_end + value.len()));
                (i + 1, (name.len() + value.len()) as isize)
            }
        };
        for end in &mut self.ends[at..] {
            end.0 = end.0.wrapping_add_signed(growth);
            end.1 = end.1.wrapping_add_signed(growth);
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.find(name).ok().map(|i| self.pair(i).1)
    }

    /// Makes room for `pairs` more labels holding `bytes` more bytes of names and values, so
    /// building a label set label by label does not reallocate.
    pub fn reserve(&mut self, pairs: usize, bytes: usize) {
        self.ends.reserve(pairs);
        self.text.reserve(bytes);
    }

    /// A copy with room for `pairs` more labels of `bytes` more bytes (see [`Labels::reserve`]).
    pub fn clone_with_room(&self, pairs: usize, bytes: usize) -> Labels {
        let mut text = String::with_capacity(self.text.len() + bytes);
        text.push_str(&self.text);
        let mut ends = Vec::with_capacity(self.ends.len() + pairs);
        ends.extend_from_slice(&self.ends);
        Labels { text, ends }
    }

    /// Bytes of all names and values together.
    pub fn byte_len(&self) -> usize {
        self.text.len()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        (0..self.ends.len()).map(|i| self.pair(i))
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// Pair by pair, names then values: the order of a sorted list of pairs.
impl Ord for Labels {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.iter().cmp(other.iter())
    }
}

impl PartialOrd for Labels {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
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
    fn labels_match_a_sorted_map_through_inserts_and_replacements() {
        // Names and values of every length, inserted in a scrambled order, some replaced by
        // longer, shorter and empty values: the packed buffer must keep each pair intact.
        let mut labels = Labels::new();
        let mut reference = std::collections::BTreeMap::new();
        for step in 0..400usize {
            let name = format!("n{}", (step * 7919) % 37);
            let value = "v".repeat((step * 31) % 11);
            labels.insert(&name, &value);
            reference.insert(name, value);
            let pairs: Vec<(String, String)> = labels
                .iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect();
            let expected: Vec<(String, String)> = reference.clone().into_iter().collect();
            assert_eq!(pairs, expected, "after step {step}");
        }
        let rebuilt = Labels::from_pairs(reference.iter().rev());
        assert_eq!(rebuilt, labels);
        let mut hashes = std::collections::HashSet::new();
        hashes.insert(rebuilt);
        assert!(hashes.contains(&labels));
    }

    #[test]
    fn labels_order_pair_by_pair() {
        let ab = Labels::from_pairs([("a", "b")]);
        let a_then_b = Labels::from_pairs([("a", ""), ("b", "")]);
        let abc = Labels::from_pairs([("ab", "c")]);
        // As a sorted list of pairs: ("a","") < ("a","b") < ("ab","c").
        assert!(a_then_b < ab);
        assert!(ab < abc);
        assert_ne!(ab, Labels::from_pairs([("ab", "")]));
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

//! Plugin output → the agent's metric model, enforcing the per-collection caps.
//!
//! A plugin's output is outside input: names and labels are checked like any peer's, and a
//! collection over the series or byte cap is refused as a whole (the instance is restarted,
//! since a plugin that returns ten million series is broken, not busy).
//!
//! The output arrives as the WIT's flat tables (`output` in `plugin.wit`): records refer to
//! one text buffer by span and to their children by count. Spans may alias, so every string
//! is measured against the caps *before* it is copied, and each family, point and label is
//! charged what it costs in the agent's model (not only its text): what the agent allocates
//! stays within a small constant factor of `max_bytes` however the plugin arranges its
//! spans. A sample may carry at most [`MAX_PLUGIN_LABELS`] labels, so one plugin's output can
//! never make the aggregator refuse a batch shared with other plugins.

use picket_core::model::{
    Family, Histogram, Labels, MetricType, Point, Summary, Value, is_valid_label_name,
    is_valid_metric_name,
};

use super::bindings::picket::plugin::types as wit;

/// Labels a plugin may put on one sample: the wire limit less room for the agent's
/// `instance` and a generous set of configured common labels.
pub const MAX_PLUGIN_LABELS: usize = picket_core::codec::MAX_LABELS_PER_SERIES - 32;

/// What the model costs per item beyond its text, charged against `max_bytes`.
const FAMILY_COST: usize = std::mem::size_of::<Family>();
const POINT_COST: usize = std::mem::size_of::<Point>();
/// A label is a pair of heap strings in a sorted vector.
const LABEL_COST: usize = std::mem::size_of::<(String, String)>() + 32;

/// Plugin text quoted in an error: bounded, so a megabyte-long bad name cannot end up in
/// every log line.
fn quote(text: &str) -> String {
    super::host::sanitize(text.get(..text.floor_char_boundary(128)).unwrap_or(""))
}

/// Caps on what one collection may return.
#[derive(Debug, Clone, Copy)]
pub struct OutputLimits {
    pub max_series: usize,
    pub max_bytes: usize,
    pub max_label_value_bytes: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OutputError {
    #[error("returned more than {0} series and families in one collection")]
    TooManySeries(usize),
    #[error("returned more than {0} bytes in one collection")]
    TooManyBytes(usize),
    #[error("metric name {0:?} is invalid (expected [a-zA-Z_:][a-zA-Z0-9_:]*)")]
    BadName(String),
    #[error("metric {metric}: label name {label:?} is invalid or reserved")]
    BadLabel { metric: String, label: String },
    #[error("metric {metric}: label {label} is {len} bytes long, over the {max}-byte cap")]
    LabelTooLong {
        metric: String,
        label: String,
        len: usize,
        max: usize,
    },
    #[error("metric {metric}: label {label} appears twice")]
    DuplicateLabel { metric: String, label: String },
    #[error("metric {metric}: label `instance` is set by the agent")]
    InstanceLabel { metric: String },
    #[error("metric {metric}: {reason}")]
    BadValue {
        metric: String,
        reason: &'static str,
    },
    #[error(
        "malformed output tables: {0} (plugins built with the SDK never produce this; a hand-written plugin must follow `output` in plugin.wit)"
    )]
    Malformed(&'static str),
    #[error("a sample carries {0} labels, more than the {MAX_PLUGIN_LABELS} a plugin may set")]
    TooManyLabels(u32),
}

/// Running totals checked against the limits as the output is read.
struct Budget {
    limits: OutputLimits,
    series: usize,
    bytes: usize,
}

impl Budget {
    fn add_series(&mut self) -> Result<(), OutputError> {
        self.series += 1;
        if self.series > self.limits.max_series {
            return Err(OutputError::TooManySeries(self.limits.max_series));
        }
        Ok(())
    }

    fn add_bytes(&mut self, n: usize) -> Result<(), OutputError> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > self.limits.max_bytes {
            return Err(OutputError::TooManyBytes(self.limits.max_bytes));
        }
        Ok(())
    }
}

/// Next `count` entries of `list` after `cursor`, advancing it.
fn take<'a, T>(
    list: &'a [T],
    cursor: &mut usize,
    count: u32,
    what: &'static str,
) -> Result<&'a [T], OutputError> {
    let end = cursor
        .checked_add(count as usize)
        .filter(|end| *end <= list.len())
        .ok_or(OutputError::Malformed(what))?;
    let entries = &list[*cursor..end];
    *cursor = end;
    Ok(entries)
}

/// The text a span points at, without copying it.
fn text(output: &wit::Output, span: wit::Span) -> Result<&str, OutputError> {
    let start = span.start as usize;
    start
        .checked_add(span.len as usize)
        .and_then(|end| output.text.get(start..end))
        .ok_or(OutputError::Malformed(
            "a span is outside the text or splits a character",
        ))
}

/// Converts a collection, stamping samples without their own timestamp with `now_ms`.
pub fn families(
    output: &wit::Output,
    now_ms: i64,
    limits: OutputLimits,
) -> Result<Vec<Family>, OutputError> {
    let mut budget = Budget {
        limits,
        series: 0,
        bytes: 0,
    };
    let (mut next_sample, mut next_label, mut next_quantile, mut next_bucket) = (0, 0, 0, 0);
    let mut out = Vec::new();
    for f in &output.families {
        let name = text(output, f.name)?;
        let help = text(output, f.help)?;
        // Families count towards the caps too, so empty families cannot be used to smuggle
        // unbounded names and help texts past them.
        budget.add_series()?;
        budget.add_bytes(FAMILY_COST + name.len() + help.len())?;
        if !is_valid_metric_name(name) {
            return Err(OutputError::BadName(quote(name)));
        }
        let kind = match f.kind {
            wit::MetricKind::Untyped => MetricType::Untyped,
            wit::MetricKind::Gauge => MetricType::Gauge,
            wit::MetricKind::Counter => MetricType::Counter,
            wit::MetricKind::Summary => MetricType::Summary,
            wit::MetricKind::Histogram => MetricType::Histogram,
        };
        let mut family = Family::new(name.to_owned(), kind, help.to_owned());
        let samples = take(
            &output.samples,
            &mut next_sample,
            f.samples,
            "a family claims more samples than the list holds",
        )?;
        for s in samples {
            budget.add_series()?;
            budget.add_bytes(POINT_COST)?;
            if s.labels as usize > MAX_PLUGIN_LABELS {
                return Err(OutputError::TooManyLabels(s.labels));
            }
            let labels = take(
                &output.labels,
                &mut next_label,
                s.labels,
                "a sample claims more labels than the list holds",
            )?;
            let labels = convert_labels(output, labels, &family.name, &mut budget)?;
            let value = match s.value {
                wit::Value::Number(v) => Value::Number(v),
                wit::Value::Summary(a) => {
                    budget.add_bytes((a.entries as usize).saturating_mul(16))?;
                    let quantiles = take(
                        &output.quantiles,
                        &mut next_quantile,
                        a.entries,
                        "a summary claims more quantiles than the list holds",
                    )?;
                    Value::Summary(Summary {
                        count: a.count,
                        sum: a.sum,
                        quantiles: quantiles.iter().map(|q| (q.quantile, q.value)).collect(),
                    })
                }
                wit::Value::Histogram(a) => {
                    budget.add_bytes((a.entries as usize).saturating_mul(16))?;
                    let buckets = take(
                        &output.buckets,
                        &mut next_bucket,
                        a.entries,
                        "a histogram claims more buckets than the list holds",
                    )?;
                    Value::Histogram(Histogram {
                        count: a.count,
                        sum: a.sum,
                        buckets: buckets
                            .iter()
                            .map(|b| (b.upper_bound, b.cumulative_count))
                            .collect(),
                    })
                }
            };
            value.check(kind).map_err(|reason| OutputError::BadValue {
                metric: family.name.clone(),
                reason,
            })?;
            family.points.push(Point {
                labels,
                timestamp_ms: s.timestamp_ms.filter(|t| *t > 0).unwrap_or(now_ms),
                value,
            });
        }
        out.push(family);
    }
    let all_used = next_sample == output.samples.len()
        && next_label == output.labels.len()
        && next_quantile == output.quantiles.len()
        && next_bucket == output.buckets.len();
    if !all_used {
        return Err(OutputError::Malformed(
            "the counts do not add up to the lengths of the lists",
        ));
    }
    Ok(out)
}

fn convert_labels(
    output: &wit::Output,
    labels: &[wit::Label],
    metric: &str,
    budget: &mut Budget,
) -> Result<Labels, OutputError> {
    let mut converted = Labels::new();
    for l in labels {
        let name = text(output, l.name)?;
        let value = text(output, l.value)?;
        // Measured before anything is copied: aliased spans cannot inflate the copy.
        budget.add_bytes(LABEL_COST + name.len() + value.len())?;
        if !is_valid_label_name(name) || name.starts_with("__") {
            return Err(OutputError::BadLabel {
                metric: metric.to_owned(),
                label: quote(name),
            });
        }
        if name == "instance" {
            return Err(OutputError::InstanceLabel {
                metric: metric.to_owned(),
            });
        }
        if value.len() > budget.limits.max_label_value_bytes {
            return Err(OutputError::LabelTooLong {
                metric: metric.to_owned(),
                label: quote(name),
                len: value.len(),
                max: budget.limits.max_label_value_bytes,
            });
        }
        if converted.contains(name) {
            return Err(OutputError::DuplicateLabel {
                metric: metric.to_owned(),
                label: quote(name),
            });
        }
        converted.insert(name, value);
    }
    Ok(converted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> OutputLimits {
        OutputLimits {
            max_series: 3,
            max_bytes: 1000,
            max_label_value_bytes: 10,
        }
    }

    /// Builds flat output by hand, as a hostile or hand-written plugin could.
    #[derive(Default)]
    struct Tables {
        text: String,
        families: Vec<wit::Family>,
        samples: Vec<wit::Sample>,
        labels: Vec<wit::Label>,
        quantiles: Vec<wit::Quantile>,
    }

    impl Tables {
        fn span(&mut self, s: &str) -> wit::Span {
            let span = wit::Span {
                start: self.text.len() as u32,
                len: s.len() as u32,
            };
            self.text.push_str(s);
            span
        }

        fn family(&mut self, name: &str, help: &str, samples: u32) -> &mut Self {
            let (name, help) = (self.span(name), self.span(help));
            self.families.push(wit::Family {
                name,
                kind: wit::MetricKind::Gauge,
                help,
                samples,
            });
            self
        }

        fn sample(&mut self, labels: u32, value: wit::Value) -> &mut Self {
            self.samples.push(wit::Sample {
                labels,
                value,
                timestamp_ms: None,
            });
            self
        }

        fn output(&self) -> wit::Output {
            wit::Output {
                text: self.text.clone(),
                families: self.families.clone(),
                samples: self.samples.clone(),
                labels: self.labels.clone(),
                quantiles: self.quantiles.clone(),
                buckets: Vec::new(),
            }
        }
    }

    #[test]
    fn empty_families_count_towards_the_caps() {
        let mut t = Tables::default();
        for i in 0..4 {
            t.family(&format!("f{i}"), "", 0);
        }
        assert_eq!(
            families(&t.output(), 1, limits()),
            Err(OutputError::TooManySeries(3))
        );
        let mut t = Tables::default();
        t.family("f", &"h".repeat(2000), 0);
        assert_eq!(
            families(&t.output(), 1, limits()),
            Err(OutputError::TooManyBytes(1000))
        );
    }

    #[test]
    fn values_must_match_the_family_type() {
        let mut t = Tables::default();
        t.family("g", "", 1).sample(
            0,
            wit::Value::Summary(wit::Aggregate {
                count: 1,
                sum: 1.0,
                entries: 0,
            }),
        );
        let out = families(&t.output(), 1, limits());
        assert!(matches!(out, Err(OutputError::BadValue { .. })), "{out:?}");
        let mut t = Tables::default();
        t.family("g", "", 1).sample(0, wit::Value::Number(2.0));
        let ok = families(&t.output(), 7, limits()).unwrap();
        assert_eq!(ok[0].points[0].timestamp_ms, 7);
    }

    #[test]
    fn aliased_spans_are_measured_before_they_are_copied() {
        // One 900-byte value referenced by many labels: each reference counts in full.
        let mut t = Tables::default();
        let big = t.span(&"v".repeat(900));
        let names: Vec<_> = (0..2).map(|i| t.span(&format!("l{i}"))).collect();
        t.family("g", "", 1).sample(2, wit::Value::Number(1.0));
        for name in names {
            t.labels.push(wit::Label { name, value: big });
        }
        let generous = OutputLimits {
            max_label_value_bytes: 1000,
            ..limits()
        };
        assert_eq!(
            families(&t.output(), 1, generous),
            Err(OutputError::TooManyBytes(1000))
        );
    }

    #[test]
    fn a_sample_cannot_carry_more_labels_than_a_batch_allows() {
        let mut t = Tables::default();
        t.family("g", "", 1)
            .sample(MAX_PLUGIN_LABELS as u32 + 1, wit::Value::Number(1.0));
        let generous = OutputLimits {
            max_bytes: 1 << 20,
            ..limits()
        };
        assert_eq!(
            families(&t.output(), 1, generous),
            Err(OutputError::TooManyLabels(MAX_PLUGIN_LABELS as u32 + 1))
        );
    }

    #[test]
    fn counts_and_spans_must_fit_the_tables() {
        let mut t = Tables::default();
        t.family("g", "", 2).sample(0, wit::Value::Number(1.0));
        assert!(matches!(
            families(&t.output(), 1, limits()),
            Err(OutputError::Malformed(_))
        ));
        let mut t = Tables::default();
        t.family("g", "", 0).sample(0, wit::Value::Number(1.0));
        assert!(matches!(
            families(&t.output(), 1, limits()),
            Err(OutputError::Malformed(_))
        ));
        let mut t = Tables::default();
        t.family("g", "", 0);
        t.families[0].name = wit::Span {
            start: u32::MAX,
            len: u32::MAX,
        };
        assert!(matches!(
            families(&t.output(), 1, limits()),
            Err(OutputError::Malformed(_))
        ));
        // A span that splits a multi-byte character.
        let mut t = Tables::default();
        t.family("é", "", 0);
        t.families[0].name.len = 1;
        assert!(matches!(
            families(&t.output(), 1, limits()),
            Err(OutputError::Malformed(_))
        ));
    }
}

//! Plugin output → the agent's metric model, enforcing the per-collection caps.
//!
//! A plugin's output is outside input: names and labels are checked like any peer's, and a
//! collection over the series or byte cap is refused as a whole (the instance is restarted,
//! since a plugin that returns ten million series is broken, not busy).

use picket_core::model::{
    Family, Histogram, Labels, MetricType, Point, Summary, Value, is_valid_label_name,
    is_valid_metric_name,
};

use super::bindings::picket::plugin::types as wit;

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
}

/// Converts a collection, stamping samples without their own timestamp with `now_ms`.
pub fn families(
    output: Vec<wit::Family>,
    now_ms: i64,
    limits: OutputLimits,
) -> Result<Vec<Family>, OutputError> {
    let mut series = 0usize;
    let mut bytes = 0usize;
    let mut out = Vec::with_capacity(output.len());
    for f in output {
        if !is_valid_metric_name(&f.name) {
            return Err(OutputError::BadName(f.name));
        }
        let kind = match f.kind {
            wit::MetricKind::Untyped => MetricType::Untyped,
            wit::MetricKind::Gauge => MetricType::Gauge,
            wit::MetricKind::Counter => MetricType::Counter,
            wit::MetricKind::Summary => MetricType::Summary,
            wit::MetricKind::Histogram => MetricType::Histogram,
        };
        // Families count towards the caps too, so empty families cannot be used to smuggle
        // unbounded names and help texts past them.
        series += 1;
        bytes += f.name.len() + f.help.len();
        if series > limits.max_series {
            return Err(OutputError::TooManySeries(limits.max_series));
        }
        if bytes > limits.max_bytes {
            return Err(OutputError::TooManyBytes(limits.max_bytes));
        }
        let mut family = Family::new(f.name, kind, f.help);
        for s in f.samples {
            series += 1;
            if series > limits.max_series {
                return Err(OutputError::TooManySeries(limits.max_series));
            }
            let mut labels = Labels::new();
            for l in s.labels {
                bytes += l.name.len() + l.value.len();
                if !is_valid_label_name(&l.name) || l.name.starts_with("__") {
                    return Err(OutputError::BadLabel {
                        metric: family.name,
                        label: l.name,
                    });
                }
                if l.name == "instance" {
                    return Err(OutputError::InstanceLabel {
                        metric: family.name,
                    });
                }
                if l.value.len() > limits.max_label_value_bytes {
                    return Err(OutputError::LabelTooLong {
                        metric: family.name,
                        label: l.name,
                        len: l.value.len(),
                        max: limits.max_label_value_bytes,
                    });
                }
                if labels.contains(&l.name) {
                    return Err(OutputError::DuplicateLabel {
                        metric: family.name,
                        label: l.name,
                    });
                }
                labels.insert(l.name, l.value);
            }
            let value = match s.value {
                wit::Value::Number(v) => Value::Number(v),
                wit::Value::Summary(x) => {
                    bytes += x.quantiles.len() * 16;
                    Value::Summary(Summary {
                        count: x.count,
                        sum: x.sum,
                        quantiles: x
                            .quantiles
                            .into_iter()
                            .map(|q| (q.quantile, q.value))
                            .collect(),
                    })
                }
                wit::Value::Histogram(x) => {
                    bytes += x.buckets.len() * 16;
                    Value::Histogram(Histogram {
                        count: x.count,
                        sum: x.sum,
                        buckets: x
                            .buckets
                            .into_iter()
                            .map(|b| (b.upper_bound, b.cumulative_count))
                            .collect(),
                    })
                }
            };
            value.check(kind).map_err(|reason| OutputError::BadValue {
                metric: family.name.clone(),
                reason,
            })?;
            bytes += 16;
            if bytes > limits.max_bytes {
                return Err(OutputError::TooManyBytes(limits.max_bytes));
            }
            family.points.push(Point {
                labels,
                timestamp_ms: s.timestamp_ms.filter(|t| *t > 0).unwrap_or(now_ms),
                value,
            });
        }
        out.push(family);
    }
    Ok(out)
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

    fn family(name: &str, help: &str, samples: Vec<wit::Sample>) -> wit::Family {
        wit::Family {
            name: name.into(),
            kind: wit::MetricKind::Gauge,
            help: help.into(),
            samples,
        }
    }

    fn sample(value: wit::Value) -> wit::Sample {
        wit::Sample {
            labels: vec![],
            value,
            timestamp_ms: None,
        }
    }

    #[test]
    fn empty_families_count_towards_the_caps() {
        let many = (0..4)
            .map(|i| family(&format!("f{i}"), "", vec![]))
            .collect();
        assert_eq!(
            families(many, 1, limits()),
            Err(OutputError::TooManySeries(3))
        );
        let long_help = vec![family("f", &"h".repeat(2000), vec![])];
        assert_eq!(
            families(long_help, 1, limits()),
            Err(OutputError::TooManyBytes(1000))
        );
    }

    #[test]
    fn values_must_match_the_family_type() {
        let summary = wit::Value::Summary(wit::Summary {
            count: 1,
            sum: 1.0,
            quantiles: vec![],
        });
        let out = families(vec![family("g", "", vec![sample(summary)])], 1, limits());
        assert!(matches!(out, Err(OutputError::BadValue { .. })), "{out:?}");
        let ok = families(
            vec![family("g", "", vec![sample(wit::Value::Number(2.0))])],
            7,
            limits(),
        )
        .unwrap();
        assert_eq!(ok[0].points[0].timestamp_ms, 7);
    }
}

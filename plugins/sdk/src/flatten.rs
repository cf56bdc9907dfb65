//! Nested families → the WIT's flat `output` tables (one text buffer, lists of fixed-size
//! records that refer to text by span and to their children by count).

use std::collections::HashMap;

use crate::bindings::picket::plugin::types as wit;
use crate::types::{Family, Value};

/// Flattens one collection. Identical strings are stored once, so repeated label names and
/// values cost a span each rather than a copy.
pub fn flatten(families: &[Family]) -> Result<wit::Output, String> {
    let mut out = Flattener::default();
    for family in families {
        out.family(family)?;
    }
    Ok(out.output)
}

struct Flattener {
    output: wit::Output,
    spans: HashMap<String, wit::Span>,
}

impl Default for Flattener {
    fn default() -> Self {
        Flattener {
            output: wit::Output {
                text: String::new(),
                families: Vec::new(),
                samples: Vec::new(),
                labels: Vec::new(),
                quantiles: Vec::new(),
                buckets: Vec::new(),
            },
            spans: HashMap::new(),
        }
    }
}

fn count(n: usize, what: &str) -> Result<u32, String> {
    u32::try_from(n).map_err(|_| format!("too many {what} in one collection ({n})"))
}

impl Flattener {
    fn span(&mut self, text: &str) -> Result<wit::Span, String> {
        if let Some(span) = self.spans.get(text) {
            return Ok(*span);
        }
        let span = wit::Span {
            start: count(self.output.text.len(), "bytes of text")?,
            len: count(text.len(), "bytes in one string")?,
        };
        self.output.text.push_str(text);
        self.spans.insert(text.to_owned(), span);
        Ok(span)
    }

    fn family(&mut self, family: &Family) -> Result<(), String> {
        let name = self.span(&family.name)?;
        let help = self.span(&family.help)?;
        self.output.families.push(wit::Family {
            name,
            kind: family.kind,
            help,
            samples: count(family.samples.len(), "samples in one family")?,
        });
        for sample in &family.samples {
            for label in &sample.labels {
                let name = self.span(&label.name)?;
                let value = self.span(&label.value)?;
                self.output.labels.push(wit::Label { name, value });
            }
            let value = match &sample.value {
                Value::Number(v) => wit::Value::Number(*v),
                Value::Summary(s) => {
                    self.output
                        .quantiles
                        .extend(s.quantiles.iter().map(|q| wit::Quantile {
                            quantile: q.quantile,
                            value: q.value,
                        }));
                    wit::Value::Summary(wit::Aggregate {
                        count: s.count,
                        sum: s.sum,
                        entries: count(s.quantiles.len(), "quantiles")?,
                    })
                }
                Value::Histogram(h) => {
                    self.output
                        .buckets
                        .extend(h.buckets.iter().map(|b| wit::Bucket {
                            upper_bound: b.upper_bound,
                            cumulative_count: b.cumulative_count,
                        }));
                    wit::Value::Histogram(wit::Aggregate {
                        count: h.count,
                        sum: h.sum,
                        entries: count(h.buckets.len(), "buckets")?,
                    })
                }
            };
            self.output.samples.push(wit::Sample {
                labels: count(sample.labels.len(), "labels")?,
                value,
                timestamp_ms: sample.timestamp_ms,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::FamilyBuilder;
    use crate::types::{Bucket, Histogram};

    fn text(output: &wit::Output, span: wit::Span) -> &str {
        &output.text[span.start as usize..][..span.len as usize]
    }

    #[test]
    fn repeated_strings_are_stored_once_and_counts_add_up() {
        let mut cpu = FamilyBuilder::counter("cpu_seconds_total", "CPU time.");
        cpu.sample(&[("cpu", "0"), ("mode", "idle")], 1.0)
            .sample(&[("cpu", "1"), ("mode", "idle")], 2.0);
        let mut h = FamilyBuilder::new("lat", MetricKind::Histogram, "");
        h.push(
            &[],
            Value::Histogram(Histogram {
                count: 3,
                sum: 1.5,
                buckets: vec![
                    Bucket {
                        upper_bound: 1.0,
                        cumulative_count: 2,
                    },
                    Bucket {
                        upper_bound: f64::INFINITY,
                        cumulative_count: 3,
                    },
                ],
            }),
            Some(5),
        );
        let out = flatten(&[cpu.build(), h.build()]).unwrap();
        assert_eq!(out.families.len(), 2);
        assert_eq!(out.families[0].samples + out.families[1].samples, 3);
        assert_eq!(out.labels.len(), 4);
        assert_eq!(out.buckets.len(), 2);
        // "cpu", "mode" and "idle" appear twice in the input but once in the text.
        assert_eq!(out.text.matches("idle").count(), 1);
        assert_eq!(text(&out, out.labels[2].name), "cpu");
        assert_eq!(text(&out, out.labels[2].value), "1");
        assert_eq!(out.samples[2].timestamp_ms, Some(5));
    }

    use crate::types::MetricKind;
}

//! Prometheus text exposition format 0.0.4.
//!
//! Used by `picket-agent once` and by the aggregator's `/metrics`. Lines of one family are
//! written together under one `# HELP`/`# TYPE` header, as the format requires; summaries and
//! histograms expand to their `quantile`/`_bucket`, `_sum` and `_count` lines. Stale markers are
//! not samples and are skipped.

use std::fmt::Write;

use crate::model::{Family, Labels, Value};

/// The `Content-Type` of this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Appends `families` to `out`. Families sharing a name are merged under one header (the
/// first one's type and help win), so callers may pass points of one family in pieces.
pub fn write_families(out: &mut String, families: &[Family], with_timestamps: bool) {
    let mut order: Vec<&str> = Vec::new();
    let mut by_name: std::collections::HashMap<&str, Vec<&Family>> = Default::default();
    for family in families {
        by_name
            .entry(family.name.as_str())
            .or_insert_with(|| {
                order.push(family.name.as_str());
                Vec::new()
            })
            .push(family);
    }
    for name in order {
        let parts = &by_name[name];
        let head = parts[0];
        if parts
            .iter()
            .all(|f| f.points.iter().all(|p| p.value == Value::Stale))
        {
            continue;
        }
        if !head.help.is_empty() {
            let _ = writeln!(out, "# HELP {} {}", name, escape_help(&head.help));
        }
        let _ = writeln!(out, "# TYPE {} {}", name, head.kind.as_str());
        for family in parts {
            for point in &family.points {
                let ts = with_timestamps.then_some(point.timestamp_ms);
                write_value(out, name, &point.labels, &point.value, ts);
            }
        }
    }
}

fn write_value(out: &mut String, name: &str, labels: &Labels, value: &Value, ts: Option<i64>) {
    match value {
        Value::Stale => {}
        Value::Number(v) => write_line(out, name, "", labels, None, *v, ts),
        Value::Summary(s) => {
            for &(q, v) in &s.quantiles {
                write_line(out, name, "", labels, Some(("quantile", q)), v, ts);
            }
            write_line(out, name, "_sum", labels, None, s.sum, ts);
            write_line(out, name, "_count", labels, None, s.count as f64, ts);
        }
        Value::Histogram(h) => {
            let mut saw_inf = false;
            for &(le, count) in &h.buckets {
                saw_inf |= le == f64::INFINITY;
                write_line(
                    out,
                    name,
                    "_bucket",
                    labels,
                    Some(("le", le)),
                    count as f64,
                    ts,
                );
            }
            if !saw_inf {
                let inf = Some(("le", f64::INFINITY));
                write_line(out, name, "_bucket", labels, inf, h.count as f64, ts);
            }
            write_line(out, name, "_sum", labels, None, h.sum, ts);
            write_line(out, name, "_count", labels, None, h.count as f64, ts);
        }
    }
}

fn write_line(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &Labels,
    extra: Option<(&str, f64)>,
    value: f64,
    ts: Option<i64>,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || extra.is_some() {
        out.push('{');
        let mut first = true;
        for (n, v) in labels.iter() {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(n);
            out.push_str("=\"");
            escape_label_value_into(out, v);
            out.push('"');
        }
        if let Some((n, v)) = extra {
            if !first {
                out.push(',');
            }
            out.push_str(n);
            out.push_str("=\"");
            out.push_str(&format_float(v));
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&format_float(value));
    if let Some(ts) = ts {
        let _ = write!(out, " {ts}");
    }
    out.push('\n');
}

/// Formats a sample value the way Prometheus parsers accept: `NaN`, `+Inf`, `-Inf`, integers
/// without a fraction, and the shortest round-tripping form otherwise.
pub fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        // Debug gives the shortest representation that round-trips, with an exponent for very
        // large or small magnitudes (Display would print hundreds of digits for 1e300).
        format!("{v:?}")
    }
}

fn escape_label_value_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Histogram, MetricType, Point, Summary};

    #[test]
    fn formats_numbers_like_prometheus() {
        assert_eq!(format_float(1.0), "1");
        assert_eq!(format_float(-3.0), "-3");
        assert_eq!(format_float(0.25), "0.25");
        assert_eq!(format_float(1e300), "1e300");
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
    }

    #[test]
    fn writes_gauge_with_escaped_labels_and_timestamp() {
        let mut f = Family::new("temp_celsius", MetricType::Gauge, "Temp\nline \\ two");
        f.push(
            Labels::from_pairs([("sensor", "a \"b\"\\c\nd"), ("instance", "pi")]),
            1234,
            48.5,
        );
        let mut out = String::new();
        write_families(&mut out, &[f], true);
        assert_eq!(
            out,
            "# HELP temp_celsius Temp\\nline \\\\ two\n\
             # TYPE temp_celsius gauge\n\
             temp_celsius{instance=\"pi\",sensor=\"a \\\"b\\\"\\\\c\\nd\"} 48.5 1234\n"
        );
    }

    #[test]
    fn expands_summary_and_histogram_and_merges_split_families() {
        let mut s = Family::new("lat", MetricType::Summary, "");
        s.points.push(Point {
            labels: Labels::new(),
            timestamp_ms: 5,
            value: Value::Summary(Summary {
                count: 3,
                sum: 1.5,
                quantiles: vec![(0.5, 0.4), (0.999, 0.9)],
            }),
        });
        let mut h = Family::new("size", MetricType::Histogram, "");
        h.points.push(Point {
            labels: Labels::from_pairs([("x", "1")]),
            timestamp_ms: 5,
            value: Value::Histogram(Histogram {
                count: 4,
                sum: 10.0,
                buckets: vec![(1.0, 1), (5.0, 3)],
            }),
        });
        let mut g2 = Family::new("lat", MetricType::Summary, "");
        g2.points.push(Point {
            labels: Labels::from_pairs([("a", "b")]),
            timestamp_ms: 6,
            value: Value::Stale,
        });
        let mut out = String::new();
        write_families(&mut out, &[s, h, g2], false);
        assert_eq!(
            out,
            "# TYPE lat summary\n\
             lat{quantile=\"0.5\"} 0.4\n\
             lat{quantile=\"0.999\"} 0.9\n\
             lat_sum 1.5\n\
             lat_count 3\n\
             # TYPE size histogram\n\
             size_bucket{x=\"1\",le=\"1\"} 1\n\
             size_bucket{x=\"1\",le=\"5\"} 3\n\
             size_bucket{x=\"1\",le=\"+Inf\"} 4\n\
             size_sum{x=\"1\"} 10\n\
             size_count{x=\"1\"} 4\n"
        );
    }
}

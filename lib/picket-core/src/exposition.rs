//! Prometheus text exposition format 0.0.4 and OpenMetrics 1.0 text.
//!
//! Used by `picket-agent once` and by the aggregator's `/metrics`. Lines of one family are
//! written together under one `# HELP`/`# TYPE` header, as the format requires; summaries and
//! histograms expand to their `quantile`/`_bucket`, `_sum` and `_count` lines. Stale markers are
//! not samples and are skipped.

use std::fmt::Write;

use crate::model::{Family, Labels, MetricType, Value};

/// The `Content-Type` of this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4: millisecond timestamps, `untyped`.
    Text,
    /// OpenMetrics 1.0: second timestamps with a fraction, `unknown`, counters declared
    /// without their `_total` suffix, and a closing `# EOF` (written by [`finish`]).
    OpenMetrics,
}

impl Format {
    /// Picks the format an HTTP `Accept` header asks for (OpenMetrics when it is listed,
    /// as Prometheus does when it prefers it).
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// Ends an exposition: OpenMetrics requires `# EOF`.
pub fn finish(out: &mut String, format: Format) {
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
}

/// Appends `families` to `out` in Prometheus text 0.0.4. Families sharing a name are merged
/// under one header (the first one's type and help win), so callers may pass points of one
/// family in pieces.
pub fn write_families(out: &mut String, families: &[Family], with_timestamps: bool) {
    write_families_as(out, families, with_timestamps, Format::Text);
}

/// [`write_families`] in either format.
pub fn write_families_as(
    out: &mut String,
    families: &[Family],
    with_timestamps: bool,
    format: Format,
) {
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
        // OpenMetrics names a counter family without `_total` (its samples keep it). A
        // counter whose name lacks the suffix is declared `unknown` rather than renamed, so a
        // series is called the same in both formats.
        let (declared, kind) = match (format, head.kind) {
            (Format::Text, kind) => (name, kind.as_str()),
            (Format::OpenMetrics, MetricType::Counter) => match name.strip_suffix("_total") {
                Some(stem) => (stem, "counter"),
                None => (name, "unknown"),
            },
            (Format::OpenMetrics, MetricType::Untyped) => (name, "unknown"),
            (Format::OpenMetrics, kind) => (name, kind.as_str()),
        };
        if !head.help.is_empty() {
            let help = match format {
                Format::Text => escape_help(&head.help),
                Format::OpenMetrics => escape_help(&head.help).replace('"', "\\\""),
            };
            let _ = writeln!(out, "# HELP {declared} {help}");
        }
        let _ = writeln!(out, "# TYPE {declared} {kind}");
        for family in parts {
            for point in &family.points {
                let ts = with_timestamps.then_some(Timestamp(point.timestamp_ms, format));
                write_value(out, name, &point.labels, &point.value, ts);
            }
        }
    }
}

/// A sample timestamp and the format it is written in.
#[derive(Clone, Copy)]
struct Timestamp(i64, Format);

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            Format::Text => write!(f, "{}", self.0),
            // Shortest round-trip form of the seconds: exact to the millisecond.
            Format::OpenMetrics => write!(f, "{}", self.0 as f64 / 1000.0),
        }
    }
}

fn write_value(
    out: &mut String,
    name: &str,
    labels: &Labels,
    value: &Value,
    ts: Option<Timestamp>,
) {
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
    ts: Option<Timestamp>,
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
    fn openmetrics_declares_counters_without_total_and_ends_with_eof() {
        let mut counter = Family::new("requests_total", MetricType::Counter, "Say \"hi\".");
        counter.push(Labels::from_pairs([("a", "x")]), 1_700_000_000_123, 5.0);
        let mut odd = Family::new("restarts", MetricType::Counter, "");
        odd.push(Labels::new(), 1_700_000_000_000, 1.0);
        let mut untyped = Family::new("u", MetricType::Untyped, "");
        untyped.push(Labels::new(), 1_000, 2.0);
        let mut out = String::new();
        write_families_as(
            &mut out,
            &[counter, odd, untyped],
            true,
            Format::OpenMetrics,
        );
        finish(&mut out, Format::OpenMetrics);
        assert_eq!(
            out,
            "# HELP requests Say \\\"hi\\\".\n# TYPE requests counter\nrequests_total{a=\"x\"} 5 1700000000.123\n\
             # TYPE restarts unknown\nrestarts 1 1700000000\n\
             # TYPE u unknown\nu 2 1\n# EOF\n"
        );
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        assert_eq!(Format::negotiate(None), Format::Text);
    }

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

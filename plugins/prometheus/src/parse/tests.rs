use super::*;

fn text(body: &str) -> Parsed {
    parse_str(body, Format::Text).unwrap_or_else(|e| panic!("{e}"))
}

fn om(body: &str) -> Parsed {
    parse_str(body, Format::OpenMetrics).unwrap_or_else(|e| panic!("{e}"))
}

fn error(body: &str, format: Format) -> ParseError {
    match parse_str(body, format) {
        Ok(parsed) => panic!("expected an error, got {:?}", parsed.families),
        Err(e) => e,
    }
}

fn family<'a>(parsed: &'a Parsed, name: &str) -> &'a Family {
    parsed
        .families
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| {
            let names: Vec<&str> = parsed.families.iter().map(|f| f.name.as_str()).collect();
            panic!("no family {name} in {names:?}")
        })
}

fn names(parsed: &Parsed) -> Vec<&str> {
    parsed.families.iter().map(|f| f.name.as_str()).collect()
}

fn number(sample: &Sample) -> f64 {
    match sample.value {
        Value::Number(v) => v,
        ref other => panic!("not a number: {other:?}"),
    }
}

fn summary(sample: &Sample) -> &Summary {
    match &sample.value {
        Value::Summary(s) => s,
        other => panic!("not a summary: {other:?}"),
    }
}

fn histogram(sample: &Sample) -> &Histogram {
    match &sample.value {
        Value::Histogram(h) => h,
        other => panic!("not a histogram: {other:?}"),
    }
}

fn labels(sample: &Sample) -> Vec<(&str, &str)> {
    sample
        .labels
        .iter()
        .map(|l| (l.name.as_str(), l.value.as_str()))
        .collect()
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---- Format negotiation ----------------------------------------------------------------------

#[test]
fn the_content_type_picks_the_parser() {
    let cases = [
        (
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            Format::OpenMetrics,
        ),
        (
            Some("application/openmetrics-text;version=0.0.1"),
            Format::OpenMetrics,
        ),
        (Some("Application/OpenMetrics-Text"), Format::OpenMetrics),
        (
            Some("text/plain; version=0.0.4; charset=utf-8"),
            Format::Text,
        ),
        (Some("text/plain"), Format::Text),
        (Some("application/json"), Format::Text),
        (Some(""), Format::Text),
        (None, Format::Text),
    ];
    for (content_type, expected) in cases {
        assert_eq!(
            Format::from_content_type(content_type),
            expected,
            "{content_type:?}"
        );
    }
}

#[test]
fn the_accept_header_prefers_openmetrics_then_text() {
    let om = ACCEPT
        .find("application/openmetrics-text;version=1.0.0")
        .unwrap();
    let text = ACCEPT.find("text/plain;version=0.0.4").unwrap();
    assert!(om < text);
}

// ---- Plain samples ---------------------------------------------------------------------------

#[test]
fn reads_counters_gauges_and_untyped_with_help() {
    let p = text(
        "# HELP http_requests_total Requests served.\n\
         # TYPE http_requests_total counter\n\
         http_requests_total{method=\"post\",code=\"200\"} 1027 1395066363000\n\
         http_requests_total{method=\"post\",code=\"400\"}    3 1395066363000\n\
         # HELP temperature Degrees.\n\
         # TYPE temperature gauge\n\
         temperature 21.5\n\
         # TYPE legacy untyped\n\
         legacy 7\n\
         no_metadata_at_all{a=\"b\"} 1\n",
    );
    assert_eq!(
        names(&p),
        [
            "http_requests_total",
            "temperature",
            "legacy",
            "no_metadata_at_all"
        ]
    );
    let requests = family(&p, "http_requests_total");
    assert_eq!(requests.kind, MetricKind::Counter);
    assert_eq!(requests.help, "Requests served.");
    assert_eq!(requests.samples.len(), 2);
    assert_eq!(
        labels(&requests.samples[0]),
        [("method", "post"), ("code", "200")]
    );
    assert_eq!(number(&requests.samples[1]), 3.0);
    assert_eq!(requests.samples[0].timestamp_ms, Some(1_395_066_363_000));
    let temperature = family(&p, "temperature");
    assert_eq!(temperature.kind, MetricKind::Gauge);
    assert_eq!(number(&temperature.samples[0]), 21.5);
    assert_eq!(temperature.samples[0].timestamp_ms, None);
    assert_eq!(family(&p, "legacy").kind, MetricKind::Untyped);
    let bare = family(&p, "no_metadata_at_all");
    assert_eq!(bare.kind, MetricKind::Untyped);
    assert_eq!(bare.help, "");
    assert_eq!(p.series_count(), 5);
    assert!(p.invalid.is_empty());
}

#[test]
fn help_without_type_gives_an_untyped_family_with_help_and_help_may_come_late() {
    let p = text("# HELP a Only help.\na 1\nb 2\n# HELP b Help after the sample.\n");
    assert_eq!(family(&p, "a").kind, MetricKind::Untyped);
    assert_eq!(family(&p, "a").help, "Only help.");
    assert_eq!(family(&p, "b").help, "Help after the sample.");
}

#[test]
fn help_text_unescapes_backslash_newline_and_quote() {
    let p = text(
        "# HELP a Line one\\nline two, a backslash \\\\ and \\\"quotes\\\" and \\q kept\na 1\n",
    );
    assert_eq!(
        family(&p, "a").help,
        "Line one\nline two, a backslash \\ and \"quotes\" and \\q kept"
    );
    let p = text("# HELP b\nb 1\n# HELP c   \nc 1\n# HELP d ünïcödé 温度 ✓\nd 1\n");
    assert_eq!(family(&p, "b").help, "");
    assert_eq!(family(&p, "c").help, "");
    assert_eq!(family(&p, "d").help, "ünïcödé 温度 ✓");
}

#[test]
fn special_float_values() {
    let p = text(
        "a NaN\nb +Inf\nc -Inf\nd Inf\ne 1.5E9\nf -0\ng 1e-3\nh -9.223372036854776E18\n\
         i .5\nj +3\nk nan\n",
    );
    let value = |name: &str| number(&family(&p, name).samples[0]);
    assert!(value("a").is_nan());
    assert_eq!(value("b"), f64::INFINITY);
    assert_eq!(value("c"), f64::NEG_INFINITY);
    assert_eq!(value("d"), f64::INFINITY);
    assert_eq!(value("e"), 1.5e9);
    assert_eq!(value("f"), 0.0);
    assert_eq!(value("g"), 0.001);
    assert_eq!(value("h"), -9.223372036854776e18);
    assert_eq!(value("i"), 0.5);
    assert_eq!(value("j"), 3.0);
    assert!(value("k").is_nan());
}

#[test]
fn text_timestamps_are_milliseconds() {
    let p = text("a 1 1700000000123\nb 1 -5\nc 1\t\t1700000000000\n");
    assert_eq!(
        family(&p, "a").samples[0].timestamp_ms,
        Some(1_700_000_000_123)
    );
    assert_eq!(family(&p, "b").samples[0].timestamp_ms, Some(-5));
    assert_eq!(
        family(&p, "c").samples[0].timestamp_ms,
        Some(1_700_000_000_000)
    );
}

#[test]
fn openmetrics_timestamps_are_seconds_converted_exactly_to_milliseconds() {
    let p = om("a 1 1520879607.789\nb 1 1520879607\nc 1 1520879607.7\n\
         d 1 1520879607.78999\ne 1 1.5e9\nf 1 -1.5\ng 1 0.001\n# EOF\n");
    let ts = |name: &str| family(&p, name).samples[0].timestamp_ms;
    assert_eq!(ts("a"), Some(1_520_879_607_789));
    assert_eq!(ts("b"), Some(1_520_879_607_000));
    assert_eq!(ts("c"), Some(1_520_879_607_700));
    assert_eq!(
        ts("d"),
        Some(1_520_879_607_789),
        "sub-millisecond digits are dropped"
    );
    assert_eq!(ts("e"), Some(1_500_000_000_000));
    assert_eq!(ts("f"), Some(-1_500));
    assert_eq!(ts("g"), Some(1));
}

// ---- Labels ----------------------------------------------------------------------------------

#[test]
fn label_values_unescape_backslash_quote_and_newline() {
    let p = text(concat!(
        r#"a{path="C:\\Program Files\\x",quote="say \"hi\"",nl="one\ntwo",mixed="\\\"\n"} 1"#,
        "\n",
        r#"b{unknown="tab\there",trailing_backslash="end\\"} 2"#,
        "\n",
    ));
    assert_eq!(
        labels(&family(&p, "a").samples[0]),
        [
            ("path", r"C:\Program Files\x"),
            ("quote", r#"say "hi""#),
            ("nl", "one\ntwo"),
            ("mixed", "\\\"\n"),
        ]
    );
    assert_eq!(
        labels(&family(&p, "b").samples[0]),
        [("unknown", r"tab\there"), ("trailing_backslash", r"end\")],
        "unknown escapes are kept as written, like Prometheus"
    );
}

#[test]
fn label_values_may_hold_separators_comment_signs_and_utf8() {
    let p = text(concat!(
        r#"a{v="}{,=#  # {x=\"1\"}",e="",u="温度 ✓ émoji 🚀",w="\\🚀\"ü"} 1 # not an exemplar"#,
        "\n",
    ));
    assert_eq!(
        labels(&family(&p, "a").samples[0]),
        [
            ("v", r#"}{,=#  # {x="1"}"#),
            ("e", ""),
            ("u", "温度 ✓ émoji 🚀"),
            ("w", "\\🚀\"ü"),
        ]
    );
}

#[test]
fn trailing_commas_whitespace_and_empty_label_lists() {
    let p = text(concat!(
        "a{x=\"1\",} 1\n",
        "b{x=\"1\",y=\"2\",} 2\n",
        "c { x = \"1\" , y=\"2\" , } 3\n",
        "d{} 4\n",
        "e { } 5\n",
        "f\t{x=\"1\"}\t6\n",
        "g{x=\"1\"}7\n",
    ));
    assert_eq!(labels(&family(&p, "a").samples[0]), [("x", "1")]);
    assert_eq!(
        labels(&family(&p, "b").samples[0]),
        [("x", "1"), ("y", "2")]
    );
    assert_eq!(
        labels(&family(&p, "c").samples[0]),
        [("x", "1"), ("y", "2")]
    );
    assert!(family(&p, "d").samples[0].labels.is_empty());
    assert!(family(&p, "e").samples[0].labels.is_empty());
    assert_eq!(number(&family(&p, "f").samples[0]), 6.0);
    assert_eq!(number(&family(&p, "g").samples[0]), 7.0);
}

#[test]
fn metric_and_label_names_allow_colons_underscores_and_digits_where_valid() {
    let p = text("job:rate5m{_a1=\"x\",B_2=\"y\"} 1\n_leading 2\n:colon 3\n");
    assert_eq!(names(&p), ["job:rate5m", "_leading", ":colon"]);
    assert_eq!(
        labels(&p.families[0].samples[0]),
        [("_a1", "x"), ("B_2", "y")]
    );
}

// ---- Lines -----------------------------------------------------------------------------------

#[test]
fn blank_lines_comments_crlf_and_leading_whitespace_are_fine() {
    let p = text(
        "\r\n# A comment\r\n#\r\n   # indented comment\r\n\r\n# HELP a Help.\r\n\
         # TYPE a gauge\r\n  a{x=\"1\"} 1\r\n\t\r\nb 2 1000\r\n# EOF is a plain comment in text\r\n\
         # EOF\r\nc 3\r\n",
    );
    assert_eq!(names(&p), ["a", "b", "c"]);
    assert_eq!(family(&p, "a").help, "Help.");
    assert_eq!(labels(&family(&p, "a").samples[0]), [("x", "1")]);
    assert_eq!(family(&p, "b").samples[0].timestamp_ms, Some(1000));
}

#[test]
fn an_empty_text_body_has_no_families() {
    assert!(text("").families.is_empty());
    assert!(text("\n\n# only comments\n").families.is_empty());
}

#[test]
fn families_may_be_interleaved_and_keep_first_seen_order() {
    let p = text("# TYPE a gauge\na{x=\"1\"} 1\nb 2\na{x=\"2\"} 3\n# TYPE a gauge\na{x=\"3\"} 4\n");
    assert_eq!(names(&p), ["a", "b"]);
    assert_eq!(family(&p, "a").samples.len(), 3);
}

#[test]
fn declared_families_without_samples_are_left_out() {
    let p = text("# HELP a Nothing here.\n# TYPE a counter\nb 1\n");
    assert_eq!(names(&p), ["b"]);
}

// ---- Summaries and histograms ----------------------------------------------------------------

#[test]
fn summary_lines_group_into_one_value_per_label_set() {
    let p = text(
        "# HELP rpc_seconds RPC latency.\n\
         # TYPE rpc_seconds summary\n\
         rpc_seconds{service=\"a\",quantile=\"0.5\"} 0.01\n\
         rpc_seconds{service=\"a\",quantile=\"0.99\"} 0.2\n\
         rpc_seconds_sum{service=\"a\"} 17.5\n\
         rpc_seconds_count{service=\"a\"} 1000\n\
         rpc_seconds_count{service=\"b\"} 3\n\
         rpc_seconds{quantile=\"0.5\",service=\"b\"} 0.03\n\
         rpc_seconds_sum{service=\"b\"} 0.1\n",
    );
    let f = family(&p, "rpc_seconds");
    assert_eq!(f.kind, MetricKind::Summary);
    assert_eq!(f.help, "RPC latency.");
    assert_eq!(f.samples.len(), 2);
    assert_eq!(labels(&f.samples[0]), [("service", "a")]);
    let a = summary(&f.samples[0]);
    assert_eq!(a.count, 1000);
    assert_eq!(a.sum, 17.5);
    assert_eq!(
        a.quantiles,
        [
            Quantile {
                quantile: 0.5,
                value: 0.01
            },
            Quantile {
                quantile: 0.99,
                value: 0.2
            },
        ]
    );
    let b = summary(&f.samples[1]);
    assert_eq!((b.count, b.sum, b.quantiles.len()), (3, 0.1, 1));
    assert_eq!(names(&p), ["rpc_seconds"], "no stray _sum/_count families");
}

#[test]
fn summary_label_order_does_not_split_a_group() {
    let p = text(
        "# TYPE s summary\ns{a=\"1\",b=\"2\",quantile=\"0.5\"} 1\n\
         s_sum{b=\"2\",a=\"1\"} 2\ns_count{b=\"2\",a=\"1\"} 3\n",
    );
    let f = family(&p, "s");
    assert_eq!(f.samples.len(), 1);
    assert_eq!(summary(&f.samples[0]).count, 3);
    assert_eq!(labels(&f.samples[0]), [("a", "1"), ("b", "2")]);
}

#[test]
fn a_summary_without_sum_has_a_nan_sum_and_nan_quantiles_are_kept() {
    // Flink's reporter writes _count and quantiles only; an empty histogram's quantiles are NaN.
    let p = text("# TYPE s summary\ns_count 0\ns{quantile=\"0.5\"} NaN\n");
    let s = summary(&family(&p, "s").samples[0]);
    assert_eq!(s.count, 0);
    assert!(s.sum.is_nan());
    assert!(s.quantiles[0].value.is_nan());
}

#[test]
fn a_summary_with_only_sum_and_count_has_no_quantiles() {
    let p = text("# TYPE s summary\ns_sum 5\ns_count 2\n");
    let s = summary(&family(&p, "s").samples[0]);
    assert_eq!((s.count, s.sum), (2, 5.0));
    assert!(s.quantiles.is_empty());
}

#[test]
fn histogram_lines_group_into_one_value_per_label_set_with_sorted_buckets() {
    let p = text(
        "# HELP http_seconds Latency.\n\
         # TYPE http_seconds histogram\n\
         http_seconds_bucket{path=\"/\",le=\"0.1\"} 5\n\
         http_seconds_bucket{path=\"/\",le=\"+Inf\"} 9\n\
         http_seconds_bucket{path=\"/\",le=\"0.5\"} 8\n\
         http_seconds_sum{path=\"/\"} 2.5\n\
         http_seconds_count{path=\"/\"} 9\n\
         http_seconds_bucket{path=\"/x\",le=\"1\"} 1\n\
         http_seconds_bucket{path=\"/x\",le=\"+Inf\"} 2\n\
         http_seconds_count{path=\"/x\"} 2\n\
         http_seconds_sum{path=\"/x\"} 0.7\n",
    );
    let f = family(&p, "http_seconds");
    assert_eq!(f.kind, MetricKind::Histogram);
    assert_eq!(f.help, "Latency.");
    assert_eq!(f.samples.len(), 2);
    assert_eq!(labels(&f.samples[0]), [("path", "/")]);
    let h = histogram(&f.samples[0]);
    assert_eq!((h.count, h.sum), (9, 2.5));
    assert_eq!(
        h.buckets,
        [
            Bucket {
                upper_bound: 0.1,
                cumulative_count: 5
            },
            Bucket {
                upper_bound: 0.5,
                cumulative_count: 8
            },
            Bucket {
                upper_bound: f64::INFINITY,
                cumulative_count: 9
            },
        ]
    );
    assert_eq!(histogram(&f.samples[1]).count, 2);
    assert_eq!(names(&p), ["http_seconds"]);
    assert!(p.invalid.is_empty());
}

#[test]
fn a_histogram_without_count_takes_it_from_the_inf_bucket_and_without_sum_is_nan() {
    let p = text("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 4\n");
    let h = histogram(&family(&p, "h").samples[0]);
    assert_eq!(h.count, 4);
    assert!(h.sum.is_nan());
}

#[test]
fn a_histogram_without_an_inf_bucket_gets_one_from_its_count() {
    let p = text(
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"2\"} 3\nh_count 4\nh_sum 5\n# TYPE g histogram\ng_count 2\ng_sum 1\n",
    );
    let h = histogram(&family(&p, "h").samples[0]);
    assert_eq!(h.buckets.len(), 3);
    assert_eq!(
        h.buckets[2],
        Bucket {
            upper_bound: f64::INFINITY,
            cumulative_count: 4
        }
    );
    let g = histogram(&family(&p, "g").samples[0]);
    assert_eq!(
        g.buckets,
        [Bucket {
            upper_bound: f64::INFINITY,
            cumulative_count: 2
        }]
    );
}

#[test]
fn float_counts_are_rounded_to_whole_counts() {
    let p = text(
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1.0\nh_bucket{le=\"+Inf\"} 1.2E7\nh_count 1.2E7\nh_sum 3\n",
    );
    let h = histogram(&family(&p, "h").samples[0]);
    assert_eq!(h.count, 12_000_000);
    assert_eq!(h.buckets[0].cumulative_count, 1);
}

#[test]
fn a_group_takes_the_first_timestamp_it_sees() {
    let p = text("# TYPE s summary\ns_sum 1\ns_count 1 1000\ns{quantile=\"1\"} 1 2000\n");
    assert_eq!(family(&p, "s").samples[0].timestamp_ms, Some(1000));
}

#[test]
fn unrepresentable_series_are_left_out_and_reported_while_their_family_stays() {
    let p = text(concat!(
        "# TYPE h histogram\n",
        "h_bucket{s=\"ok\",le=\"1\"} 1\n",
        "h_bucket{s=\"ok\",le=\"+Inf\"} 2\n",
        "h_count{s=\"ok\"} 2\n",
        "h_bucket{s=\"decreasing\",le=\"1\"} 5\n",
        "h_bucket{s=\"decreasing\",le=\"2\"} 3\n",
        "h_count{s=\"decreasing\"} 5\n",
        "h_bucket{s=\"above\",le=\"+Inf\"} 5\n",
        "h_count{s=\"above\"} 4\n",
        "h_bucket{s=\"dup\",le=\"1\"} 1\n",
        "h_bucket{s=\"dup\",le=\"1.0\"} 1\n",
        "h_count{s=\"dup\"} 1\n",
        "h_bucket{s=\"badle\",le=\"one\"} 1\n",
        "h_bucket{s=\"nanle\",le=\"NaN\"} 1\n",
        "h_bucket{s=\"nole\"} 1\n",
        "h_bucket{s=\"negative\",le=\"+Inf\"} -1\n",
        "h_sum{s=\"nocount\"} 1\n",
        "h_count{s=\"nancount\"} NaN\n",
        "h{s=\"bare\"} 1\n",
        "# TYPE s summary\n",
        "s{q=\"none\"} 1\n",
        "s_count{q=\"none\"} 1\n",
        "s{q=\"bad\",quantile=\"high\"} 1\n",
        "s{q=\"range\",quantile=\"1.5\"} 1\n",
        "s_count{q=\"range\"} 1\n",
        "s{q=\"nocount\",quantile=\"0.5\"} 1\n",
        "s{q=\"ok\",quantile=\"0.5\"} 1\n",
        "s_count{q=\"ok\"} 1\n",
        "s_count{q=\"infcount\"} +Inf\n",
    ));
    let h = family(&p, "h");
    assert_eq!(h.samples.len(), 1);
    assert_eq!(labels(&h.samples[0]), [("s", "ok")]);
    let s = family(&p, "s");
    assert_eq!(s.samples.len(), 1);
    assert_eq!(labels(&s.samples[0]), [("q", "ok")]);
    // NaN never equals itself, so the NaN count (line 18) is checked on its own below.
    let reasons: Vec<(usize, &str, &Unrepresentable)> = p
        .invalid
        .iter()
        .filter(|i| i.line != 18)
        .map(|i| (i.line, i.series.as_str(), &i.reason))
        .collect();
    use Unrepresentable as U;
    assert_eq!(
        reasons,
        [
            (5, r#"h{s="decreasing"}"#, &U::DecreasingBuckets),
            (8, r#"h{s="above"}"#, &U::BucketAboveCount),
            (10, r#"h{s="dup"}"#, &U::DuplicateBucket(1.0)),
            (13, r#"h{s="badle"}"#, &U::BadLe("one".into())),
            (14, r#"h{s="nanle"}"#, &U::BadLe("NaN".into())),
            (15, r#"h{s="nole"}"#, &U::NoLeLabel),
            (16, r#"h{s="negative"}"#, &U::BadCount(-1.0)),
            (17, r#"h{s="nocount"}"#, &U::NoCountOrInfBucket),
            (19, r#"h{s="bare"}"#, &U::HistogramSampleWithoutSuffix),
            (21, r#"s{q="none"}"#, &U::NoQuantileLabel),
            (23, r#"s{q="bad"}"#, &U::BadQuantile("high".into())),
            (24, r#"s{q="range"}"#, &U::QuantileOutOfRange(1.5)),
            (26, r#"s{q="nocount"}"#, &U::NoCount),
            (29, r#"s{q="infcount"}"#, &U::BadCount(f64::INFINITY)),
        ]
    );
    let nan_count = p
        .invalid
        .iter()
        .find(|i| i.series == r#"h{s="nancount"}"#)
        .unwrap();
    assert!(matches!(nan_count.reason, U::BadCount(c) if c.is_nan()));
    assert_eq!(
        p.invalid[0].to_string(),
        r#"line 5: h{s="decreasing"}: bucket counts decrease as the bound grows"#
    );
}

#[test]
fn samples_near_a_typed_family_that_do_not_fit_it_are_their_own_families() {
    let p = text(
        "# TYPE g gauge\ng 1\ng_sum 2\ng_total 3\n# TYPE c counter\nc_total 4\nc_bucket 5\n\
         # TYPE s summary\ns_bucket 6\ns_created 7\n",
    );
    assert_eq!(
        names(&p),
        [
            "g",
            "g_sum",
            "g_total",
            "c_total",
            "c_bucket",
            "s_bucket",
            "s_created"
        ]
    );
    assert_eq!(family(&p, "g_sum").kind, MetricKind::Untyped);
    assert_eq!(family(&p, "c_total").kind, MetricKind::Counter);
    assert_eq!(
        family(&p, "s_created").kind,
        MetricKind::Untyped,
        "text keeps _created"
    );
}

// ---- OpenMetrics -----------------------------------------------------------------------------

#[test]
fn openmetrics_counters_keep_the_total_suffix_and_drop_created() {
    let p = om("# TYPE requests counter\n\
         # UNIT requests requests\n\
         # HELP requests Requests served.\n\
         requests_total{path=\"/\"} 10 1700000000.5 # {trace_id=\"abc\"} 1.0 1700000000.1\n\
         requests_created{path=\"/\"} 1600000000.25\n\
         # EOF\n");
    assert_eq!(names(&p), ["requests_total"]);
    let f = family(&p, "requests_total");
    assert_eq!(f.kind, MetricKind::Counter);
    assert_eq!(f.help, "Requests served.");
    assert_eq!(f.samples.len(), 1);
    assert_eq!(number(&f.samples[0]), 10.0);
    assert_eq!(f.samples[0].timestamp_ms, Some(1_700_000_000_500));
}

#[test]
fn openmetrics_histograms_and_summaries_ignore_created() {
    let p = om("# TYPE h histogram\n\
         h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2 # {id=\"x\"} 0.4\n\
         h_count 2\nh_sum 1.5\nh_created 1600000000\n\
         # TYPE s summary\ns{quantile=\"0.9\"} 3\ns_count 5\ns_sum 9\ns_created 1600000000\n\
         # EOF\n");
    assert_eq!(names(&p), ["h", "s"]);
    assert_eq!(histogram(&family(&p, "h").samples[0]).count, 2);
    assert_eq!(summary(&family(&p, "s").samples[0]).count, 5);
}

#[test]
fn openmetrics_gauge_histograms_become_gauge_families() {
    let p = om("# TYPE queue gaugehistogram\n\
         queue_bucket{le=\"1\"} 3\nqueue_bucket{le=\"+Inf\"} 5\nqueue_gcount 5\nqueue_gsum 9.5\n\
         # EOF\n");
    assert_eq!(names(&p), ["queue_bucket", "queue_gcount", "queue_gsum"]);
    assert!(p.families.iter().all(|f| f.kind == MetricKind::Gauge));
    assert_eq!(
        labels(&family(&p, "queue_bucket").samples[1]),
        [("le", "+Inf")]
    );
    assert_eq!(number(&family(&p, "queue_gsum").samples[0]), 9.5);
}

#[test]
fn openmetrics_info_stateset_and_unknown() {
    let p = om(
        "# TYPE build info\n# HELP build Build data.\nbuild_info{version=\"1.2\"} 1\n\
         # TYPE mode stateset\nmode{mode=\"a\"} 1\nmode{mode=\"b\"} 0\n\
         # TYPE other unknown\nother 3\n# EOF\n",
    );
    assert_eq!(names(&p), ["build_info", "mode", "other"]);
    assert_eq!(family(&p, "build_info").kind, MetricKind::Gauge);
    assert_eq!(family(&p, "build_info").help, "Build data.");
    assert_eq!(family(&p, "mode").kind, MetricKind::Gauge);
    assert_eq!(family(&p, "mode").samples.len(), 2);
    assert_eq!(family(&p, "other").kind, MetricKind::Untyped);
}

#[test]
fn openmetrics_needs_eof_and_nothing_after_it() {
    let e = error("a 1\nb 2\n", Format::OpenMetrics);
    assert_eq!((e.line, &e.problem), (2, &Problem::MissingEof));
    assert!(e.to_string().contains("truncated"), "{e}");
    let e = error("", Format::OpenMetrics);
    assert_eq!(e.problem, Problem::MissingEof);
    let e = error("a 1\n# EOF\nb 2\n", Format::OpenMetrics);
    assert_eq!(
        (e.line, &e.problem),
        (3, &Problem::ContentAfterEof { eof_line: 2 })
    );
    // Blank lines after EOF, CRLF and a missing final newline are fine.
    assert_eq!(om("a 1\r\n# EOF\r\n\r\n").families.len(), 1);
    assert_eq!(om("a 1\n# EOF").families.len(), 1);
    assert_eq!(om("# EOF\n").families.len(), 0);
}

#[test]
fn openmetrics_escaped_help_and_labels() {
    let p = om("# HELP a A \\\"quoted\\\" help\\nover two lines.\n\
         a{x=\"\\\"q\\\" \\\\ \\n\"} 1\n# EOF\n");
    assert_eq!(family(&p, "a").help, "A \"quoted\" help\nover two lines.");
    assert_eq!(labels(&family(&p, "a").samples[0]), [("x", "\"q\" \\ \n")]);
}

// ---- Errors ----------------------------------------------------------------------------------

/// Found with the fuzz targets' binaries on long lines (`prometheus_exposition`,
/// `pushgateway_push`): the duplicate check made a line's labels quadratic, 24 s for one
/// 500 KB line of 50,000 labels, so a 16 MB push could keep the aggregator busy for hours.
#[test]
fn a_sample_carries_at_most_max_labels() {
    let line = |n: usize| {
        let labels: Vec<String> = (0..n).map(|i| format!("a{i}=\"v\"")).collect();
        format!("m{{{}}} 1\n", labels.join(","))
    };
    let p = text(&line(MAX_LABELS));
    assert_eq!(p.families[0].samples[0].labels.len(), MAX_LABELS);
    let e = error(&line(MAX_LABELS + 1), Format::Text);
    assert_eq!((e.line, e.problem), (1, Problem::TooManyLabels));
    // Refused at the 129th label, before the rest is read.
    let e = error(&line(20_000), Format::OpenMetrics);
    assert_eq!(e.problem, Problem::TooManyLabels);
    assert!(e.to_string().contains("more than 128 labels"), "{e}");
}

#[test]
fn malformed_lines_fail_with_their_line_number_and_problem() {
    use Problem as P;
    let cases: Vec<(&str, P)> = vec![
        ("1abc 1", P::BadMetricName("1abc".into())),
        ("foo-bar 1", P::BadMetricName("foo-bar".into())),
        ("foo.bar{a=\"1\"} 1", P::BadMetricName("foo.bar".into())),
        (
            "{\"foo.bar\",a=\"1\"} 1",
            P::QuotedName("{\"foo.bar\",a=\"1\"}".into()),
        ),
        ("foo{1a=\"x\"} 1", P::BadLabelName("1a".into())),
        ("foo{a-b=\"x\"} 1", P::BadLabelName("a-b".into())),
        ("foo{\"a.b\"=\"x\"} 1", P::QuotedName("\"a.b\"".into())),
        ("foo{,} 1", P::BadLabelName(",".into())),
        ("foo{a=\"1\",,b=\"2\"} 1", P::BadLabelName(",".into())),
        ("foo{a \"x\"} 1", P::ExpectedEquals { label: "a".into() }),
        ("foo{a=x} 1", P::ExpectedQuote { label: "a".into() }),
        (
            "foo{a=\"x} 1",
            P::UnterminatedLabelValue { label: "a".into() },
        ),
        (
            "foo{a=\"x\\\"} 1",
            P::UnterminatedLabelValue { label: "a".into() },
        ),
        (
            "foo{a=\"x\\",
            P::UnterminatedLabelValue { label: "a".into() },
        ),
        ("foo{a=\"x\"", P::UnterminatedLabels),
        ("foo{a=\"x\",", P::UnterminatedLabels),
        ("foo{", P::UnterminatedLabels),
        (
            "foo{a=\"x\" b=\"y\"} 1",
            P::ExpectedCommaOrBrace { label: "a".into() },
        ),
        ("foo{a=\"x\",a=\"y\"} 1", P::DuplicateLabel("a".into())),
        ("foo", P::MissingValue),
        ("foo{a=\"x\"}", P::MissingValue),
        ("foo{a=\"x\"}   ", P::MissingValue),
        ("foo one", P::BadValue("one".into())),
        ("foo 1,5", P::BadValue("1,5".into())),
        (
            "foo 1 1.5",
            P::BadTimestamp {
                text: "1.5".into(),
                format: Format::Text,
            },
        ),
        (
            "foo 1 99999999999999999999",
            P::BadTimestamp {
                text: "99999999999999999999".into(),
                format: Format::Text,
            },
        ),
        ("foo 1 2 3", P::TrailingText("3".into())),
        ("# HELP", P::MissingName { keyword: "HELP" }),
        ("# TYPE   ", P::MissingName { keyword: "TYPE" }),
        ("# HELP 9x help", P::BadMetricName("9x".into())),
        ("# TYPE foo", P::MissingType { name: "foo".into() }),
        ("# TYPE foo counters", P::UnknownType("counters".into())),
        ("# TYPE foo counter extra", P::TrailingText("extra".into())),
    ];
    for (bad_line, problem) in cases {
        let body = format!("# HELP ok Fine.\nok 1\n\n{bad_line}\nlater 2\n");
        let e = error(&body, Format::Text);
        assert_eq!(e.line, 4, "{bad_line}: {e}");
        assert_eq!(e.problem, problem, "{bad_line}: {e}");
        assert_eq!(e.excerpt, bad_line, "{bad_line}");
    }
}

#[test]
fn openmetrics_timestamps_must_be_numbers() {
    let e = error("a 1 soon\n# EOF\n", Format::OpenMetrics);
    assert_eq!(
        e.problem,
        Problem::BadTimestamp {
            text: "soon".into(),
            format: Format::OpenMetrics
        }
    );
    assert!(e.to_string().contains("seconds"), "{e}");
    let e = error("a 1 NaN\n# EOF\n", Format::OpenMetrics);
    assert_eq!(e.line, 1);
    let e = error("a 1 1e300\n# EOF\n", Format::OpenMetrics);
    assert_eq!(e.line, 1);
}

#[test]
fn contradictory_or_late_type_lines_fail() {
    let e = error("# TYPE a counter\na 1\n# TYPE a gauge\n", Format::Text);
    assert_eq!(e.line, 3);
    assert_eq!(
        e.problem,
        Problem::ConflictingType {
            name: "a".into(),
            earlier: DeclaredKind::Counter,
            now: DeclaredKind::Gauge,
        }
    );
    assert_eq!(
        e.to_string(),
        "line 3: # TYPE a gauge contradicts the earlier # TYPE a counter: `# TYPE a gauge`"
    );
    let e = error("a 1\n# TYPE a gauge\n", Format::Text);
    assert_eq!(
        (e.line, e.problem),
        (2, Problem::TypeAfterSamples { name: "a".into() })
    );
    let e = error("# HELP a Help.\na 1\n# TYPE a gauge\n", Format::Text);
    assert_eq!(
        (e.line, e.problem),
        (3, Problem::TypeAfterSamples { name: "a".into() })
    );
}

#[test]
fn a_body_that_is_not_utf8_fails_on_the_line_with_the_bad_byte() {
    let mut body = b"# TYPE a gauge\na 1\nb{x=\"".to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(b"\"} 1\nc 1\n");
    let e = parse(&body, Format::Text).unwrap_err();
    assert_eq!(e.line, 3);
    assert_eq!(e.problem, Problem::NotUtf8);
    assert!(e.excerpt.starts_with("b{x=\""), "{}", e.excerpt);
    let e = parse(&[0xc3], Format::Text).unwrap_err();
    assert_eq!(e.line, 1);
}

#[test]
fn errors_read_well_and_quote_a_bounded_excerpt() {
    let e = error("a 1\nfoo{a=x} 1\n", Format::Text);
    assert_eq!(
        e.to_string(),
        "line 2: expected '\"' to open the value of label a: `foo{a=x} 1`"
    );
    let long = format!("foo{{a=\"{}\" 1", "ü".repeat(500));
    let e = error(&long, Format::Text);
    assert_eq!(e.excerpt.chars().count(), EXCERPT_CHARS + 1);
    assert!(e.excerpt.ends_with('…'));
}

/// Every prefix and many byte-level mutations of a rich exposition: the parser must return
/// (either way) and never panic.
#[test]
fn no_input_makes_the_parser_panic() {
    let rich = "# HELP a Help \\\\ \\n.\n# TYPE a histogram\na_bucket{x=\"1\",le=\"0.5\"} 1 1000\n\
        a_bucket{x=\"1\",le=\"+Inf\"} 2\na_count{x=\"1\"} 2\na_sum{x=\"1\"} 0.7\n\
        # TYPE s summary\ns{quantile=\"0.5\",y=\"é\\\"\\n\"} NaN\ns_count 3\n\
        # TYPE c counter\nc_total{z=\"🚀\",} -Inf # {t=\"1\"} 1 1.5\nc_created 1.5\n# EOF\n";
    for format in [Format::Text, Format::OpenMetrics] {
        for end in 0..=rich.len() {
            let _ = parse(&rich.as_bytes()[..end], format);
        }
    }
    // A small deterministic generator (xorshift) is enough to shake the byte-level paths.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet = b"{}\",=\\#\n\r\t aZ_:09.+-eE\xff\xc3";
    for _ in 0..3000 {
        let mut body = rich.as_bytes().to_vec();
        for _ in 0..(next() % 6 + 1) {
            let position = (next() as usize) % body.len();
            let byte = alphabet[(next() as usize) % alphabet.len()];
            match next() % 3 {
                0 => body[position] = byte,
                1 => body.insert(position, byte),
                _ => {
                    body.remove(position);
                }
            }
        }
        for format in [Format::Text, Format::OpenMetrics] {
            let _ = parse(&body, format);
        }
    }
}

// ---- Real-world fixtures ---------------------------------------------------------------------

/// Recorded from prometheus-node-exporter 1.5.0 (Debian) on a loopback port.
#[test]
fn node_exporter_fixture() {
    let p = parse(&fixture("node-exporter.txt"), Format::Text).unwrap();
    assert_eq!(p.families.len(), 283);
    assert_eq!(p.series_count(), 501);
    assert!(p.invalid.is_empty(), "{:?}", p.invalid);
    let kinds = |kind: MetricKind| p.families.iter().filter(|f| f.kind == kind).count();
    assert_eq!(kinds(MetricKind::Counter), 60);
    assert_eq!(kinds(MetricKind::Gauge), 175);
    assert_eq!(kinds(MetricKind::Untyped), 47);
    assert_eq!(kinds(MetricKind::Summary), 1);
    assert_eq!(number(&family(&p, "node_load1").samples[0]), 0.69);
    assert_eq!(
        number(&family(&p, "node_memory_MemTotal_bytes").samples[0]),
        2.5276510208e10
    );
    let cpu = family(&p, "node_cpu_seconds_total");
    assert_eq!(cpu.kind, MetricKind::Counter);
    assert_eq!(cpu.help, "Seconds the CPUs spent in each mode.");
    assert_eq!(cpu.samples.len(), 16);
    assert_eq!(labels(&cpu.samples[0]), [("cpu", "0"), ("mode", "idle")]);
    assert_eq!(number(&cpu.samples[0]), 1855.65);
    let gc = family(&p, "go_gc_duration_seconds");
    assert_eq!(gc.kind, MetricKind::Summary);
    let gc = summary(&gc.samples[0]);
    assert_eq!(gc.quantiles.len(), 5);
    assert_eq!(gc.quantiles[4].quantile, 1.0);
    assert_eq!((gc.count, gc.sum), (0, 0.0));
    let os = family(&p, "node_os_info");
    assert!(labels(&os.samples[0]).contains(&("pretty_name", "Debian GNU/Linux 12 (bookworm)")));
    assert!(labels(&os.samples[0]).contains(&("build_id", "")));
    assert_eq!(
        labels(&family(&p, "node_uname_info").samples[0])[5],
        ("version", "#1 SMP PREEMPT_DYNAMIC @0")
    );
}

/// In the shape of Flink's PrometheusReporter: everything a gauge, `(scope: ...)` help,
/// trailing commas, Java number formatting, latency histograms as summaries without `_sum`.
#[test]
fn flink_taskmanager_fixture() {
    let p = parse(&fixture("flink-taskmanager.txt"), Format::Text).unwrap();
    assert_eq!(p.families.len(), 33);
    assert_eq!(p.series_count(), 106);
    assert!(p.invalid.is_empty(), "{:?}", p.invalid);
    assert!(
        p.families
            .iter()
            .filter(|f| !f.name.ends_with("_latency"))
            .all(|f| f.kind == MetricKind::Gauge)
    );
    let heap = family(&p, "flink_taskmanager_Status_JVM_Memory_Heap_Used");
    assert_eq!(
        heap.help,
        "Used (scope: taskmanager_Status_JVM_Memory_Heap)"
    );
    assert_eq!(number(&heap.samples[0]), 268_435_456.0);
    assert_eq!(
        labels(&heap.samples[0]),
        [("host", "flink_tm_1"), ("tm_id", "172_18_0_5:38123_6f3a2b")]
    );
    let records = family(&p, "flink_taskmanager_job_task_operator_numRecordsIn");
    assert_eq!(records.samples.len(), 10);
    let first = labels(&records.samples[0]);
    assert_eq!(first.len(), 11);
    assert!(first.contains(&("operator_name", "Source:_Kafka_orders")));
    assert!(first.contains(&("task_name", "Source:_Kafka_orders_->_Map_->_Filter")));
    assert!(first.contains(&("subtask_index", "0")));
    assert_eq!(number(&records.samples[0]), 3000.0);
    let watermark = family(
        &p,
        "flink_taskmanager_job_task_operator_currentInputWatermark",
    );
    assert_eq!(number(&watermark.samples[0]), -9.223372036854776e18);
    assert_eq!(number(&watermark.samples[2]), 1.700000123456e12);
    let latency = family(
        &p,
        "flink_taskmanager_job_latency_source_id_operator_id_operator_subtask_index_latency",
    );
    assert_eq!(latency.kind, MetricKind::Summary);
    assert_eq!(latency.samples.len(), 2);
    assert!(
        !labels(&latency.samples[0])
            .iter()
            .any(|(name, _)| *name == "quantile")
    );
    let busy = summary(&latency.samples[0]);
    assert_eq!(busy.count, 128);
    assert!(busy.sum.is_nan());
    let quantiles: Vec<f64> = busy.quantiles.iter().map(|q| q.quantile).collect();
    assert_eq!(quantiles, [0.5, 0.75, 0.95, 0.98, 0.99, 0.999]);
    assert_eq!(busy.quantiles[5].value, 121.0);
    let idle = summary(&latency.samples[1]);
    assert_eq!(idle.count, 0);
    assert!(idle.quantiles.iter().all(|q| q.value.is_nan()));
}

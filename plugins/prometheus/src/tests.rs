//! The glue, with the host's `http::get` replaced by a table of canned answers.

use std::collections::HashMap;

use picket_plugin_sdk::types::{Sample, Value};

use super::*;

type Answer = Result<Response, HostError>;

/// Canned answers by URL (a refused connection for anything else), recording requests.
struct FakeHost {
    answers: HashMap<String, Answer>,
    requests: Vec<(String, Vec<(String, String)>)>,
}

impl FakeHost {
    fn new() -> FakeHost {
        FakeHost {
            answers: HashMap::new(),
            requests: Vec::new(),
        }
    }

    fn serve(mut self, url: &str, content_type: &str, body: &str) -> FakeHost {
        self.answers
            .insert(url.into(), Ok(response(200, content_type, body)));
        self
    }

    fn answer(mut self, url: &str, answer: Answer) -> FakeHost {
        self.answers.insert(url.into(), answer);
        self
    }

    fn collect(&mut self, scraper: &mut Scraper) -> Collection {
        scraper.collect(&mut |url, headers| {
            self.requests.push((url.to_owned(), headers.to_vec()));
            self.answers
                .get(url)
                .cloned()
                .unwrap_or_else(|| Err(HostError::Failed(format!("{url}: connection refused"))))
        })
    }
}

fn response(status: u16, content_type: &str, body: &str) -> Response {
    Response {
        status,
        headers: vec![("Content-Type".into(), content_type.into())],
        body: body.as_bytes().to_vec(),
    }
}

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn scraper(json: &str) -> Scraper {
    Scraper::new(Settings::from_json(json).unwrap()).unwrap()
}

fn families(collection: &Collection) -> &[Family] {
    match &collection.result {
        Ok(families) => families,
        Err(e) => panic!("collect failed: {e}"),
    }
}

fn family<'a>(families: &'a [Family], name: &str) -> &'a Family {
    families.iter().find(|f| f.name == name).unwrap_or_else(|| {
        let names: Vec<&str> = families.iter().map(|f| f.name.as_str()).collect();
        panic!("no family {name} in {names:?}")
    })
}

fn number(sample: &Sample) -> f64 {
    match sample.value {
        Value::Number(v) => v,
        ref other => panic!("not a number: {other:?}"),
    }
}

/// The value of one of the plugin's own gauges for a target.
fn own(families: &[Family], name: &str, target: &str) -> f64 {
    let f = family(families, name);
    assert_eq!(f.kind, MetricKind::Gauge);
    let sample = f
        .samples
        .iter()
        .find(|s| s.labels.iter().any(|l| l.value == target))
        .unwrap_or_else(|| panic!("{name} has no sample for {target}"));
    number(sample)
}

fn label<'a>(sample: &'a Sample, name: &str) -> Option<&'a str> {
    sample
        .labels
        .iter()
        .find(|l| l.name == name)
        .map(|l| l.value.as_str())
}

const OWN_METRICS: [&str; 6] = [
    "picket_scrape_up",
    "picket_scrape_duration_seconds",
    "picket_scrape_samples_scraped",
    "picket_scrape_samples",
    "picket_scrape_duplicate_series",
    "picket_scrape_invalid_series",
];

#[test]
fn describe_asks_for_http_and_log_and_gives_the_defaults() {
    let d = <Prometheus as Guest>::describe();
    assert_eq!(d.name, "prometheus");
    assert_eq!(d.capabilities, [Capability::Http, Capability::Log]);
    assert_eq!(
        Settings::from_json(&d.default_settings).unwrap(),
        Settings::default()
    );
    assert!(
        d.default_settings
            .contains(r#""drop_labels":["task_attempt_id"]"#)
    );
}

#[test]
fn init_errors_name_the_problem() {
    let e = Scraper::new(Settings::from_json(r#"{"targets":["http://h:9250-9240/"]}"#).unwrap())
        .err()
        .unwrap();
    assert!(e.contains("backwards"), "{e}");
    let e = Scraper::new(Settings::from_json(r#"{"keep_metrics":["("]}"#).unwrap())
        .err()
        .unwrap();
    assert!(e.contains("keep_metrics"), "{e}");
}

#[test]
fn scrapes_a_target_with_the_accept_header_and_reports_it_up() {
    let mut s = scraper(r#"{"targets":["http://127.0.0.1:9249/metrics"]}"#);
    let mut host = FakeHost::new().serve(
        "http://127.0.0.1:9249/metrics",
        TEXT,
        "# TYPE a gauge\na{x=\"1\"} 1\na{x=\"2\"} 2\n# TYPE s summary\ns_count 1\ns_sum 2\n",
    );
    let c = host.collect(&mut s);
    let f = families(&c);
    let a = family(f, "a");
    assert_eq!(a.samples.len(), 2);
    assert_eq!(label(&a.samples[0], "target"), Some("127.0.0.1:9249"));
    let t = "127.0.0.1:9249";
    assert_eq!(own(f, "picket_scrape_up", t), 1.0);
    assert_eq!(own(f, "picket_scrape_samples_scraped", t), 3.0);
    assert_eq!(own(f, "picket_scrape_samples", t), 3.0);
    assert_eq!(own(f, "picket_scrape_duplicate_series", t), 0.0);
    assert_eq!(own(f, "picket_scrape_invalid_series", t), 0.0);
    assert!(own(f, "picket_scrape_duration_seconds", t) >= 0.0);
    let names: Vec<&str> = f.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names[2..], OWN_METRICS);
    assert_eq!(host.requests.len(), 1);
    assert_eq!(
        host.requests[0].1,
        [("Accept".to_owned(), parse::ACCEPT.to_owned())]
    );
    assert!(c.logs.is_empty(), "{:?}", c.logs);
}

#[test]
fn the_content_type_decides_between_openmetrics_and_text() {
    let body = "# TYPE c counter\nc_total 1\nc_created 1.5\n# EOF\n";
    let mut s = scraper(r#"{"targets":["http://h:1/om","http://h:2/text"]}"#);
    let mut host = FakeHost::new()
        .serve("http://h:1/om", OPENMETRICS, body)
        .serve("http://h:2/text", TEXT, body);
    let c = host.collect(&mut s);
    let f = families(&c);
    let counter = family(f, "c_total");
    assert_eq!(counter.kind, MetricKind::Counter);
    assert_eq!(counter.samples.len(), 2, "one per target");
    // Read as text, `_created` is an ordinary series; as OpenMetrics it is dropped.
    let created = family(f, "c_created");
    assert_eq!(created.samples.len(), 1);
    assert_eq!(label(&created.samples[0], "target"), Some("h:2"));
}

#[test]
fn unreachable_targets_are_down_not_errors_and_logged_once_per_change() {
    let mut s = scraper(r#"{"targets":["http://h:9250-9252/metrics"]}"#);
    let mut host = FakeHost::new().serve("http://h:9251/metrics", TEXT, "m 1\n");
    let c = host.collect(&mut s);
    let f = families(&c);
    assert_eq!(own(f, "picket_scrape_up", "h:9250"), 0.0);
    assert_eq!(own(f, "picket_scrape_up", "h:9251"), 1.0);
    assert_eq!(own(f, "picket_scrape_up", "h:9252"), 0.0);
    assert_eq!(own(f, "picket_scrape_samples", "h:9250"), 0.0);
    assert_eq!(family(f, "m").samples.len(), 1);
    assert_eq!(c.logs.len(), 2);
    assert_eq!(
        c.logs[0].0,
        log::Level::Info,
        "range ports are expected to be down"
    );
    assert!(
        c.logs[0].1.contains("http://h:9250/metrics is down"),
        "{:?}",
        c.logs
    );
    assert!(c.logs[0].1.contains("connection refused"), "{:?}", c.logs);
    // Still down: nothing new to say.
    let c = host.collect(&mut s);
    assert!(c.logs.is_empty(), "{:?}", c.logs);
    // One comes up, one goes down.
    host = host
        .serve("http://h:9250/metrics", TEXT, "m 2\n")
        .answer("http://h:9251/metrics", Err(HostError::Timeout));
    let c = host.collect(&mut s);
    let f = families(&c);
    assert_eq!(own(f, "picket_scrape_up", "h:9250"), 1.0);
    assert_eq!(own(f, "picket_scrape_up", "h:9251"), 0.0);
    let messages: Vec<&str> = c.logs.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(
        messages,
        [
            "http://h:9250/metrics is up again",
            "http://h:9251/metrics is down: timed out (the grant's timeout)",
        ]
    );
}

#[test]
fn a_single_target_going_down_is_a_warning() {
    let mut s = scraper(r#"{"targets":["http://h:1/m"]}"#);
    let mut host = FakeHost::new().answer("http://h:1/m", Ok(response(503, TEXT, "busy")));
    let c = host.collect(&mut s);
    assert_eq!(own(families(&c), "picket_scrape_up", "h:1"), 0.0);
    assert_eq!(
        c.logs,
        [(
            log::Level::Warn,
            "http://h:1/m is down: HTTP status 503".to_owned()
        )]
    );
}

#[test]
fn an_oversized_body_marks_the_target_down_and_says_which_grant_to_raise() {
    let mut s = scraper(r#"{"targets":["http://h:1/m"]}"#);
    let mut host = FakeHost::new().answer("http://h:1/m", Err(HostError::TooLarge));
    let c = host.collect(&mut s);
    assert_eq!(own(families(&c), "picket_scrape_up", "h:1"), 0.0);
    assert!(c.logs[0].1.contains("http.max_bytes"), "{:?}", c.logs);
}

#[test]
fn a_malformed_exposition_fails_the_collection_naming_target_and_line() {
    let mut s = scraper(r#"{"targets":["http://h:1/m","http://h:2/m"]}"#);
    let mut host = FakeHost::new().serve("http://h:1/m", TEXT, "ok 1\n").serve(
        "http://h:2/m",
        TEXT,
        "ok 1\nbad{a=\"1\" 2\n",
    );
    let c = host.collect(&mut s);
    let e = c.result.unwrap_err();
    assert_eq!(
        e,
        "http://h:2/m: line 2: expected ',' or '}' after the value of label a: `bad{a=\"1\" 2`"
    );
    let mut host = FakeHost::new().serve("http://h:1/m", OPENMETRICS, "ok 1\n");
    let e = host.collect(&mut s).result.unwrap_err();
    assert!(e.starts_with("http://h:1/m: line 1: "), "{e}");
    assert!(e.contains("# EOF"), "{e}");
}

#[test]
fn a_denied_request_fails_the_collection_with_the_missing_grant() {
    let mut s = scraper(r#"{"targets":["http://h:1/m"]}"#);
    let mut host = FakeHost::new().answer(
        "http://h:1/m",
        Err(HostError::Denied(
            "http GET http://h:1/m (add http.allow = [\"http://h:1/\"])".into(),
        )),
    );
    let e = host.collect(&mut s).result.unwrap_err();
    assert!(e.starts_with("http://h:1/m: denied: "), "{e}");
    assert!(e.contains("http.allow"), "{e}");
}

#[test]
fn without_a_target_label_two_targets_series_collapse_and_are_counted() {
    let mut s = scraper(r#"{"targets":["http://a:1/m","http://b:1/m"],"target_label":""}"#);
    let mut host = FakeHost::new()
        .serve("http://a:1/m", TEXT, "m{x=\"1\"} 1\nm{x=\"2\"} 2\n")
        .serve("http://b:1/m", TEXT, "m{x=\"1\"} 10\n");
    let c = host.collect(&mut s);
    let f = families(&c);
    let m = family(f, "m");
    assert_eq!(m.samples.len(), 2);
    assert_eq!(number(&m.samples[0]), 10.0, "the last one wins");
    assert!(m.samples.iter().all(|s| label(s, "target").is_none()));
    assert_eq!(own(f, "picket_scrape_duplicate_series", "a:1"), 1.0);
    assert_eq!(own(f, "picket_scrape_duplicate_series", "b:1"), 0.0);
    assert_eq!(own(f, "picket_scrape_samples", "a:1"), 1.0);
    assert_eq!(own(f, "picket_scrape_samples", "b:1"), 1.0);
    assert_eq!(own(f, "picket_scrape_samples_scraped", "a:1"), 2.0);
    let up = family(f, "picket_scrape_up");
    assert_eq!(
        label(&up.samples[0], "target"),
        Some("a:1"),
        "own metrics fall back to `target`"
    );
}

#[test]
fn a_custom_target_label_names_own_metrics_too() {
    let mut s = scraper(r#"{"targets":["http://a:1/m"],"target_label":"scrape_target"}"#);
    let mut host = FakeHost::new().serve("http://a:1/m", TEXT, "m 1\n");
    let c = host.collect(&mut s);
    let f = families(&c);
    assert_eq!(
        label(&family(f, "m").samples[0], "scrape_target"),
        Some("a:1")
    );
    assert_eq!(
        label(&family(f, "picket_scrape_up").samples[0], "scrape_target"),
        Some("a:1")
    );
}

#[test]
fn invalid_series_are_counted_and_logged_when_they_appear() {
    let mut s = scraper(r#"{"targets":["http://a:1/m"]}"#);
    let body =
        "# TYPE h histogram\nh_bucket{le=\"1\"} 5\nh_bucket{le=\"+Inf\"} 2\nh_count 5\nok 1\n";
    let mut host = FakeHost::new().serve("http://a:1/m", TEXT, body);
    let c = host.collect(&mut s);
    let f = families(&c);
    assert_eq!(own(f, "picket_scrape_invalid_series", "a:1"), 1.0);
    assert_eq!(own(f, "picket_scrape_samples", "a:1"), 1.0);
    assert!(f.iter().all(|f| f.name != "h"));
    assert_eq!(c.logs.len(), 1);
    assert_eq!(c.logs[0].0, log::Level::Warn);
    assert!(
        c.logs[0].1.contains("line 2: h: bucket counts decrease"),
        "{:?}",
        c.logs
    );
    assert!(host.collect(&mut s).logs.is_empty(), "logged once");
    host = host.serve("http://a:1/m", TEXT, "ok 1\n");
    assert!(host.collect(&mut s).logs.is_empty());
    host = host.serve("http://a:1/m", TEXT, body);
    assert_eq!(
        host.collect(&mut s).logs.len(),
        1,
        "logged again after it went away"
    );
}

#[test]
fn a_kind_conflict_between_targets_keeps_the_first_and_is_logged_once() {
    let mut s = scraper(r#"{"targets":["http://a:1/m","http://b:1/m"]}"#);
    let mut host = FakeHost::new()
        .serve("http://a:1/m", TEXT, "# TYPE m gauge\nm 1\n")
        .serve(
            "http://b:1/m",
            TEXT,
            "# TYPE m summary\nm_count 1\nm_sum 1\n",
        );
    let c = host.collect(&mut s);
    let m = family(families(&c), "m");
    assert_eq!(m.kind, MetricKind::Gauge);
    assert_eq!(m.samples.len(), 1);
    assert_eq!(c.logs.len(), 1);
    assert!(
        c.logs[0]
            .1
            .contains("family m is a summary here but a gauge"),
        "{:?}",
        c.logs
    );
    assert!(host.collect(&mut s).logs.is_empty());
}

#[test]
fn timestamps_follow_honor_timestamps() {
    let mut host = FakeHost::new().serve("http://a:1/m", TEXT, "m 1 1700000000000\n");
    let mut s = scraper(r#"{"targets":["http://a:1/m"]}"#);
    let c = host.collect(&mut s);
    assert_eq!(
        family(families(&c), "m").samples[0].timestamp_ms,
        Some(1_700_000_000_000)
    );
    let mut s = scraper(r#"{"targets":["http://a:1/m"],"honor_timestamps":false}"#);
    let c = host.collect(&mut s);
    assert_eq!(family(families(&c), "m").samples[0].timestamp_ms, None);
}

#[test]
fn a_scraped_family_named_like_our_own_metrics_gives_way() {
    let mut s = scraper(r#"{"targets":["http://a:1/m"]}"#);
    let mut host = FakeHost::new().serve("http://a:1/m", TEXT, "picket_scrape_up 7\n");
    let c = host.collect(&mut s);
    let f = families(&c);
    assert_eq!(f.iter().filter(|f| f.name == "picket_scrape_up").count(), 1);
    assert_eq!(own(f, "picket_scrape_up", "a:1"), 1.0);
}

#[test]
fn the_flink_fixture_end_to_end_with_default_settings() {
    let body = std::fs::read_to_string(format!(
        "{}/fixtures/flink-taskmanager.txt",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut s = scraper(r#"{"targets":["http://127.0.0.1:9250-9251/metrics"]}"#);
    let mut host = FakeHost::new().serve("http://127.0.0.1:9250/metrics", TEXT, &body);
    let c = host.collect(&mut s);
    let f = families(&c);
    assert_eq!(f.len(), 33 + OWN_METRICS.len());
    assert_eq!(own(f, "picket_scrape_samples", "127.0.0.1:9250"), 106.0);
    assert_eq!(own(f, "picket_scrape_up", "127.0.0.1:9251"), 0.0);
    let records = family(f, "flink_taskmanager_job_task_operator_numRecordsIn");
    let first = &records.samples[0];
    assert_eq!(label(first, "task_attempt_id"), None);
    assert_eq!(label(first, "tm_id"), Some("172_18_0_5:38123_6f3a2b"));
    assert_eq!(label(first, "target"), Some("127.0.0.1:9250"));
}

#[test]
fn the_node_exporter_fixture_end_to_end() {
    let body = std::fs::read_to_string(format!(
        "{}/fixtures/node-exporter.txt",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut s = scraper(
        r#"{"targets":["http://127.0.0.1:9100/metrics"],"keep_metrics":["node_.*"],
            "drop_series":[{"label":"device","regex":"lo|ifb[0-9]+"}]}"#,
    );
    let mut host = FakeHost::new().serve("http://127.0.0.1:9100/metrics", TEXT, &body);
    let c = host.collect(&mut s);
    let f = families(&c);
    assert!(
        f.iter()
            .all(|f| f.name.starts_with("node_") || f.name.starts_with("picket_"))
    );
    let info = family(f, "node_network_info");
    assert_eq!(info.samples.len(), 1);
    assert_eq!(label(&info.samples[0], "device"), Some("eth0"));
    assert_eq!(
        label(&info.samples[0], "ifalias"),
        None,
        "empty values are dropped"
    );
    assert_eq!(
        own(f, "picket_scrape_samples_scraped", "127.0.0.1:9100"),
        501.0
    );
}

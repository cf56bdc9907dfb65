//! Smoke tests of the server harness (`picket_tests::servers`) against the real Prometheus,
//! InfluxDB, VictoriaMetrics and Pushgateway binaries: each must start, take data, give it
//! back exactly and survive a restart. A missing server fails these tests.

use std::collections::BTreeMap;

use picket_tests::servers::*;
use serde_json::json;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn row(pairs: &[(&str, serde_json::Value)]) -> BTreeMap<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Samples compared bit for bit, so NaN equals NaN.
fn bits(series: &[Series]) -> Vec<(Labels, Vec<(i64, u64)>)> {
    series
        .iter()
        .map(|(l, s)| {
            (
                l.clone(),
                s.iter().map(|(t, v)| (*t, v.to_bits())).collect(),
            )
        })
        .collect()
}

#[test]
#[should_panic(
    expected = "`picket-no-such-server` not found: install the Debian package `picket-nothing` (scripts/test does)"
)]
fn a_missing_server_fails_the_test() {
    require("picket-no-such-server", "picket-nothing");
}

#[test]
fn http_helpers_encode_as_servers_expect() {
    assert_eq!(percent_encode("a b&c=d/é~"), "a%20b%26c%3Dd%2F%C3%A9~");
    assert_eq!(form(&[("q", "1+1"), ("x", "")]), "q=1%2B1&x=");
    assert_eq!(
        basic_auth("Aladdin", "open sesame"),
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    );
    assert_eq!(basic_auth("a", "bc"), "Basic YTpiYw==");
    assert_eq!(basic_auth("a", "b"), "Basic YTpi");
}

#[test]
fn influxdb_keeps_points_across_restart_and_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut influx = InfluxDb::start(dir.path());
    influx.create_database("smoke");
    let t = now_ms() - 60_000;
    let lines = format!(
        "cpu,host=a usage=0.5,count=3i {t}\ncpu,host=b usage=-1.25 {}\n",
        t + 1
    );
    let response = http_request(
        influx.addr(),
        "POST",
        "/write?db=smoke&precision=ms",
        &[("Content-Type", "text/plain")],
        lines.as_bytes(),
    )
    .unwrap();
    assert_eq!(response.status, 204, "{}", response.text());

    let expected = vec![
        row(&[
            ("time", json!(t)),
            ("host", json!("a")),
            ("usage", json!(0.5)),
            ("count", json!(3)),
        ]),
        row(&[
            ("time", json!(t + 1)),
            ("host", json!("b")),
            ("usage", json!(-1.25)),
            ("count", json!(null)),
        ]),
    ];
    assert_eq!(influx.points("smoke", "cpu"), expected);
    assert!(influx.points("smoke", "no_such_measurement").is_empty());

    influx.restart();
    assert_eq!(influx.points("smoke", "cpu"), expected, "after restart");
    influx.kill9();
    influx.start_again();
    assert_eq!(influx.points("smoke", "cpu"), expected, "after SIGKILL");
}

#[test]
fn influxdb_with_auth_refuses_anonymous_writes() {
    let dir = tempfile::tempdir().unwrap();
    let influx = InfluxDb::start_with_auth(dir.path(), "admin", "s3cr'et\"pw");
    influx.create_database("secure");
    let line = format!("m value=7 {}\n", now_ms());
    let anonymous = http_request(
        influx.addr(),
        "POST",
        "/write?db=secure&precision=ms",
        &[],
        line.as_bytes(),
    )
    .unwrap();
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    let auth = basic_auth("admin", "s3cr'et\"pw");
    let wrong = basic_auth("admin", "nope");
    let refused = http_request(
        influx.addr(),
        "POST",
        "/write?db=secure&precision=ms",
        &[("Authorization", &wrong)],
        line.as_bytes(),
    )
    .unwrap();
    assert_eq!(refused.status, 401, "{}", refused.text());
    let accepted = http_request(
        influx.addr(),
        "POST",
        "/write?db=secure&precision=ms",
        &[("Authorization", &auth)],
        line.as_bytes(),
    )
    .unwrap();
    assert_eq!(accepted.status, 204, "{}", accepted.text());
    let points = influx.points("secure", "m");
    assert_eq!(points.len(), 1);
    assert_eq!(points[0]["value"], json!(7));
}

#[test]
fn victoria_metrics_gives_back_exact_samples() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = VictoriaMetrics::start(dir.path());
    let t = now_ms() - 60_000;

    // Prometheus text exposition with timestamps in ms.
    let text = format!(
        "smoke_a{{k=\"1\"}} 1.5 {t}\nsmoke_a{{k=\"1\"}} 2 {}\nsmoke_a{{k=\"2\"}} -3 {t}\n",
        t + 15
    );
    let response = http_request(
        vm.addr(),
        "POST",
        "/api/v1/import/prometheus",
        &[],
        text.as_bytes(),
    )
    .unwrap();
    assert_eq!(response.status, 204, "{}", response.text());
    let count = |s: &[Series]| s.iter().map(|(_, v)| v.len()).sum::<usize>();
    let expected_a = vec![
        (
            labels(&[("__name__", "smoke_a"), ("k", "1")]),
            vec![(t, 1.5), (t + 15, 2.0)],
        ),
        (
            labels(&[("__name__", "smoke_a"), ("k", "2")]),
            vec![(t, -3.0)],
        ),
    ];
    let got = vm.wait_export("{__name__=\"smoke_a\"}", |s| count(s) >= 3);
    assert_eq!(got, expected_a);

    // InfluxDB line protocol: series are named <measurement>_<field>, tags become labels.
    let lines = format!(
        "smoke_m,host=h usage=0.25,count=4i {t}\nsmoke_single value=9 {}\n",
        t + 1
    );
    let response = http_request(
        vm.addr(),
        "POST",
        "/api/v2/write?precision=ms&bucket=b&org=o",
        &[],
        lines.as_bytes(),
    )
    .unwrap();
    assert_eq!(response.status, 204, "{}", response.text());
    let expected_influx = vec![
        (
            labels(&[("__name__", "smoke_m_count"), ("host", "h")]),
            vec![(t, 4.0)],
        ),
        (
            labels(&[("__name__", "smoke_m_usage"), ("host", "h")]),
            vec![(t, 0.25)],
        ),
        (
            labels(&[("__name__", "smoke_single_value")]),
            vec![(t + 1, 9.0)],
        ),
    ];
    let selector = "{__name__=~\"smoke_m_.*|smoke_single_.*\"}";
    assert_eq!(vm.wait_export(selector, |s| count(s) >= 3), expected_influx);

    // Remote write (the harness's reference encoder), infinities included.
    let series = vec![(
        labels(&[("__name__", "smoke_rw"), ("k", "v")]),
        vec![
            (t, f64::INFINITY),
            (t + 1, f64::NEG_INFINITY),
            (t + 2, 0.125),
        ],
    )];
    let response = vm.remote_write(&series);
    assert_eq!(response.status, 204, "{}", response.text());
    assert_eq!(vm.wait_export("smoke_rw", |s| count(s) >= 3), series);

    vm.restart();
    assert_eq!(
        vm.export("{__name__=\"smoke_a\"}"),
        expected_a,
        "after restart"
    );
    assert_eq!(vm.export(selector), expected_influx, "after restart");
    assert_eq!(vm.export("smoke_rw"), series, "after restart");
}

#[test]
fn prometheus_answers_queries_and_keeps_remote_written_samples() {
    let dir = tempfile::tempdir().unwrap();
    let mut prom = Prometheus::start(dir.path());
    let answer = prom.query("1+1");
    assert_eq!(answer["data"]["resultType"], "scalar");
    assert_eq!(answer["data"]["result"][1], "2");

    let t = now_ms() - 60_000;
    let series = vec![
        (
            labels(&[("__name__", "smoke_rw"), ("k", "a")]),
            vec![
                (t, 1.5),
                (t + 1, f64::NAN),
                (t + 1001, f64::INFINITY),
                // Seventeen significant digits: any rounding on the way shows.
                (t + 2000, 10_000.0 / 7.0),
            ],
        ),
        (
            labels(&[("__name__", "smoke_rw"), ("k", "b")]),
            vec![(t + 7, -0.001), (t + 999, f64::NEG_INFINITY)],
        ),
    ];
    let response = prom.remote_write(&series);
    assert_eq!(response.status, 204, "{}", response.text());
    assert_eq!(bits(&prom.raw_samples("smoke_rw")), bits(&series));
    assert!(prom.raw_samples("smoke_nothing").is_empty());

    prom.restart();
    assert_eq!(prom.query("1+1")["data"]["result"][1], "2");
    assert_eq!(
        bits(&prom.raw_samples("smoke_rw")),
        bits(&series),
        "after restart"
    );
    prom.kill9();
    prom.start_again();
    assert_eq!(
        bits(&prom.raw_samples("smoke_rw")),
        bits(&series),
        "after SIGKILL"
    );
}

#[test]
fn pushgateway_serves_what_was_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Pushgateway::start(dir.path());
    let body = "# TYPE smoke_pushed gauge\nsmoke_pushed{a=\"b\"} 42\n";
    let response = http_request(
        gateway.addr(),
        "PUT",
        "/metrics/job/x",
        &[],
        body.as_bytes(),
    )
    .unwrap();
    assert!(
        response.is_success(),
        "{} {}",
        response.status,
        response.text()
    );
    let metrics = gateway.metrics();
    assert!(
        metrics.contains("smoke_pushed{a=\"b\",instance=\"\",job=\"x\"} 42"),
        "{metrics}"
    );
    assert!(gateway.url().starts_with("http://127.0.0.1:"));
}

//! The aggregator's push receivers against a real Prometheus: what is pushed in the
//! Pushgateway and InfluxDB `/write` protocols arrives through the remote-write sink, series
//! a push removes or a silent group leaves end with stale markers, and bad requests get the
//! status a real Pushgateway or InfluxDB would give without changing anything.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use picket_tests::servers::{HttpResponse, Prometheus, basic_auth, http_request, now_ms};
use picket_tests::*;

fn start(dir: &Path, prom: &Prometheus, receivers: &str) -> Aggregator {
    let extra = format!(
        r#"
[queues]
directory = "{queues}"

{receivers}
{sink}"#,
        queues = dir.join("queues").display(),
        sink = remote_write_sink_toml("prometheus", &prom.write_url()),
    );
    Aggregator::start(
        dir,
        &AggregatorSpec {
            pki: None,
            mutual_tls: false,
            journal: Some(dir.join("journal.jsonl")),
            extra,
        },
    )
}

fn request(
    agg: &Aggregator,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    http_request(agg.http, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// The value of every series `expr` selects now, by the value of `label`.
fn instant(prom: &Prometheus, expr: &str, label: &str) -> Vec<(String, String)> {
    let json = prom.query(expr);
    let mut out: Vec<(String, String)> = json["data"]["result"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    (
                        r["metric"][label].as_str().unwrap_or_default().to_owned(),
                        r["value"][1].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Waits until `expr` selects exactly `want` (by `label`).
fn wait_instant(prom: &Prometheus, expr: &str, label: &str, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    wait_for(
        &format!("{expr} to be {want:?}"),
        Duration::from_secs(30),
        || (instant(prom, expr, label) == want).then_some(()),
    );
}

fn receiver_requests(agg: &Aggregator, receiver: &str, outcome: &str) -> f64 {
    agg.metric_value(&format!(
        "picket_receiver_requests_total{{outcome=\"{outcome}\",receiver=\"{receiver}\"}}"
    ))
    .unwrap_or(0.0)
}

#[test]
fn pushgateway_pushes_reach_prometheus_and_removed_or_silent_series_end() {
    let dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(&dir.path().join("prometheus"));
    let agg = start(
        dir.path(),
        &prom,
        "[receivers.pushgateway]\nenabled = true\ngroup_ttl = \"3s\"\nmax_body_bytes = 4096\n",
    );
    let text = [("Content-Type", "text/plain; version=0.0.4")];
    let push =
        |method: &str, path: &str, body: &str| request(&agg, method, path, &text, body.as_bytes());

    // PUT: a group with two families.
    let r = push(
        "PUT",
        "/metrics/job/flink/host/tm-1",
        "# TYPE flink_up gauge\nflink_up{tm_id=\"a\"} 1\n# TYPE flink_records_total counter\nflink_records_total 5\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_instant(&prom, "flink_up{job=\"flink\"}", "host", &[("tm-1", "1")]);
    wait_instant(&prom, "flink_records_total", "host", &[("tm-1", "5")]);

    // PUT replaces the whole group: flink_up ends at once (a stale marker, not a 5-minute
    // lookback), flink_records_total has its new value.
    let r = push(
        "PUT",
        "/metrics/job/flink/host/tm-1",
        "# TYPE flink_records_total counter\nflink_records_total 7\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_instant(&prom, "flink_records_total", "host", &[("tm-1", "7")]);
    wait_instant(&prom, "flink_up", "host", &[]);

    // POST replaces only the families it carries.
    let r = push("POST", "/metrics/job/flink/host/tm-1", "flink_other 3\n");
    assert_eq!(r.status, 200, "{}", r.text());
    wait_instant(&prom, "flink_other", "host", &[("tm-1", "3")]);
    assert_eq!(
        instant(&prom, "flink_records_total", "host"),
        [("tm-1".to_owned(), "7".to_owned())]
    );

    // Another group, with a base64 grouping value; DELETE (Flink's deleteOnShutdown) ends
    // its series.
    let r = push(
        "PUT",
        "/metrics/job/flink/host@base64/dG0vMg",
        "flink_up 1\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_instant(&prom, "flink_up", "host", &[("tm/2", "1")]);
    let r = request(
        &agg,
        "DELETE",
        "/metrics/job/flink/host@base64/dG0vMg",
        &[],
        b"",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    wait_instant(&prom, "flink_up", "host", &[]);

    // Refused, and nothing changes: a label contradicting the path, a bad path, protobuf, a
    // body over max_body_bytes, GET.
    let r = push(
        "PUT",
        "/metrics/job/flink/host/tm-1",
        "flink_records_total{host=\"tm-9\"} 1\n",
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("host=\"tm-9\""), "{}", r.text());
    let r = push("PUT", "/metrics/job/flink/host", "x 1\n");
    assert_eq!(r.status, 400, "{}", r.text());
    let r = push("PUT", "/metrics/job/flink/host/tm-1", "not a metric line\n");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("line 1"), "{}", r.text());
    let r = request(
        &agg,
        "PUT",
        "/metrics/job/flink/host/tm-1",
        &[(
            "Content-Type",
            "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited",
        )],
        b"\x05",
    );
    assert_eq!(r.status, 415, "{}", r.text());
    let big = format!("flink_big{{pad=\"{}\"}} 1\n", "x".repeat(5000));
    let r = push("PUT", "/metrics/job/flink/host/tm-1", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    let r = request(&agg, "GET", "/metrics/job/flink/host/tm-1", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(
        instant(&prom, "flink_records_total", "host"),
        [("tm-1".to_owned(), "7".to_owned())],
        "a refused push changed the group"
    );

    // A pusher that stalls half way through its body holds up nobody else: another group's
    // push and a DELETE go through while it hangs (they would wait forever behind it if the
    // body were read under the groups' lock).
    let mut stalled = std::net::TcpStream::connect(agg.http).unwrap();
    stalled
        .write_all(
            b"PUT /metrics/job/flink/host/stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nflink_up 1\n",
        )
        .unwrap();
    let r = push("PUT", "/metrics/job/flink/host/tm-3", "flink_up 1\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(&agg, "DELETE", "/metrics/job/flink/host/tm-3", &[], b"");
    assert_eq!(r.status, 202, "{}", r.text());
    drop(stalled);

    // The group stops pushing: after group_ttl its series end.
    wait_instant(&prom, "flink_records_total", "host", &[]);
    wait_instant(&prom, "flink_other", "host", &[]);
    assert!(
        !agg.metrics().contains("flink_records_total{"),
        "an expired group's series must leave /metrics"
    );
    assert_eq!(receiver_requests(&agg, "pushgateway", "accepted"), 7.0);
    // Three refused pushes, and the stalled one whose client went away.
    assert_eq!(receiver_requests(&agg, "pushgateway", "bad_request"), 4.0);
    assert_eq!(receiver_requests(&agg, "pushgateway", "too_large"), 1.0);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn influxdb_writes_reach_prometheus_with_auth_gzip_and_partial_writes() {
    let dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(&dir.path().join("prometheus"));
    let password = dir.path().join("receiver-password");
    std::fs::write(&password, "pa:ss word\n").unwrap();
    let agg = start(
        dir.path(),
        &prom,
        &format!(
            "[receivers.influxdb]\nenabled = true\ndatabases = [\"flink\"]\nusername = \"flink\"\npassword_file = \"{}\"\n",
            password.display()
        ),
    );
    let r = request(&agg, "GET", "/ping", &[], b"");
    assert_eq!(r.status, 204);
    assert!(r.header("X-Influxdb-Version").is_some());

    let t = now_ms() - 5_000;
    // Flink's InfluxdbReporter shapes: a counter (`count`), a gauge (`value`), a meter.
    let body = format!(
        "taskmanager_job_task_operator_numRecordsIn,host=tm-1,job_name=etl\\ job,subtask_index=0 count=123i {t}\n\
         jobmanager_numRunningJobs,host=jm value=1 {t}\n\
         taskmanager_job_task_numRecordsInPerSecond,host=tm-1 count=10i,rate=2.5 {t}\n"
    );
    let auth = basic_auth("flink", "pa:ss word");
    let r = request(
        &agg,
        "POST",
        "/write?db=flink&precision=ms",
        &[("Authorization", &auth)],
        body.as_bytes(),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let raw = prom.raw_samples("{__name__=\"taskmanager_job_task_operator_numRecordsIn_count\"}");
    let raw = if raw.is_empty() {
        wait_for("the counter in Prometheus", Duration::from_secs(30), || {
            let s =
                prom.raw_samples("{__name__=\"taskmanager_job_task_operator_numRecordsIn_count\"}");
            (!s.is_empty()).then_some(s)
        })
    } else {
        raw
    };
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].0["job_name"], "etl job");
    assert_eq!(raw[0].0["subtask_index"], "0");
    assert_eq!(raw[0].1, [(t, 123.0)]);
    wait_instant(&prom, "jobmanager_numRunningJobs", "host", &[("jm", "1")]);
    wait_instant(
        &prom,
        "taskmanager_job_task_numRecordsInPerSecond_rate",
        "host",
        &[("tm-1", "2.5")],
    );

    // u/p parameters and a gzip body, seconds precision.
    let t2 = (now_ms() / 1000) - 2;
    let r = request(
        &agg,
        "POST",
        "/write?db=flink&precision=s&u=flink&p=pa%3Ass%20word",
        &[("Content-Encoding", "gzip")],
        &gzip(format!("gz_probe,host=tm-1 value=42 {t2}\n").as_bytes()),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    wait_for("the gzip point", Duration::from_secs(30), || {
        let s = prom.raw_samples("gz_probe");
        (s.len() == 1 && s[0].1 == [(t2 * 1000, 42.0)]).then_some(())
    });

    // A partial write stores the good line and names the bad one.
    let r = request(
        &agg,
        "POST",
        "/write?db=flink&precision=ms",
        &[("Authorization", &auth)],
        format!("partial_good value=1 {t}\npartial_bad value=oops {t}\n").as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("partial write"), "{}", r.text());
    assert!(r.text().contains("line 2"), "{}", r.text());
    wait_instant(&prom, "partial_good", "host", &[("", "1")]);

    // Refused: wrong password, no credentials, unknown database, no database.
    for (path, headers, status) in [
        (
            "/write?db=flink",
            vec![("Authorization", basic_auth("flink", "wrong"))],
            401,
        ),
        ("/write?db=flink", vec![], 401),
        (
            "/write?db=other",
            vec![("Authorization", auth.clone())],
            404,
        ),
        ("/write", vec![("Authorization", auth.clone())], 400),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = request(
            &agg,
            "POST",
            path,
            &headers,
            format!("refused value=1 {t}\n").as_bytes(),
        );
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert!(r.text().starts_with("{\"error\""), "{}", r.text());
    }
    assert!(instant(&prom, "refused", "host").is_empty());
    assert_eq!(receiver_requests(&agg, "influxdb", "accepted"), 2.0);
    assert_eq!(receiver_requests(&agg, "influxdb", "unauthorized"), 2.0);
    assert!(
        !agg.process.log_text().contains("pa:ss word"),
        "the password must never be logged"
    );
}

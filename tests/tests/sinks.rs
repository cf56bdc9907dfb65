//! The aggregator's network sinks against the real databases on loopback: Prometheus 2.42
//! (remote-write receiver), InfluxDB 1.6 (v1 API) and VictoriaMetrics (remote write and its
//! InfluxDB v2-compatible endpoint). What the aggregator accepted is read from its `file`
//! journal and must come back from every database with the same values and timestamps,
//! including across database restarts and an aggregator SIGKILL.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use picket_core::codec::BatchEncoder;
use picket_core::model::{Family, Histogram, Labels, MetricType, Point, Summary, Value};
use picket_tests::servers::{ClientTls, InfluxDb, Prometheus, VictoriaMetrics, WebTls};
use picket_tests::*;

type SeriesKey = (String, BTreeMap<String, String>);
type Samples = BTreeMap<SeriesKey, Vec<(i64, f64)>>;

/// Every finite numeric point the aggregator journaled, per series, in time order.
fn journaled(journal: &Path) -> Samples {
    let mut out: Samples = BTreeMap::new();
    for p in journal::read(journal).points {
        if let Some(v) = p.value.filter(|v| v.is_finite()) {
            out.entry((p.name.clone(), p.labels.clone()))
                .or_default()
                .push((p.timestamp_ms, v));
        }
    }
    for samples in out.values_mut() {
        samples.sort_by_key(|s| s.0);
    }
    out
}

fn family_names(samples: &Samples) -> BTreeSet<String> {
    samples.keys().map(|k| k.0.clone()).collect()
}

fn sink_toml(
    prom: &Prometheus,
    influx: &InfluxDb,
    vm: Option<&VictoriaMetrics>,
    queues: &Path,
) -> String {
    let mut text = format!(
        r#"
[queues]
directory = "{queues}"
{prometheus}
[[sinks]]
type = "influxdb"
name = "influx"
url = "{influx_url}"
api = "v1"
database = "picket"
[sinks.retry]
initial_backoff = "50ms"
max_backoff = "500ms"
"#,
        queues = queues.display(),
        prometheus = remote_write_sink_toml("prometheus", &prom.write_url()),
        influx_url = influx.url(),
    );
    if let Some(vm) = vm {
        text += &format!(
            r#"
[[sinks]]
type = "prometheus_remote_write"
name = "vm_remote_write"
url = "{rw}"

[[sinks]]
type = "influxdb"
name = "vm_influx_v2"
url = "{base}"
api = "v2"
org = "picket"
bucket = "fleet"
token = "unused-by-victoriametrics"
mapping = "grouped"
measurement = "grouped"
"#,
            rw = vm.remote_write_url(),
            base = vm.influx_v2_url(),
        );
    }
    text
}

fn start_aggregator(dir: &Path, extra: String, journal: &Path) -> Aggregator {
    Aggregator::start(
        dir,
        &AggregatorSpec {
            pki: None,
            mutual_tls: false,
            journal: Some(journal.to_owned()),
            extra,
        },
    )
}

/// The sum of a sink's metric `family` over the series whose labels include every one of
/// `labels` (written `name="value"`), from the aggregator's `/metrics`.
fn sink_metric(agg: &Aggregator, family: &str, sink: &str, labels: &[&str]) -> f64 {
    let sink_label = format!("sink=\"{sink}\"");
    let mut all = vec![sink_label.as_str()];
    all.extend_from_slice(labels);
    agg.metric_sum(family, &all)
}

fn sink_samples(agg: &Aggregator, sink: &str, outcome: &str) -> f64 {
    let outcome = format!("outcome=\"{outcome}\"");
    sink_metric(agg, "picket_sink_samples_total", sink, &[&outcome])
}

fn queue_samples(agg: &Aggregator, sink: &str) -> f64 {
    sink_metric(agg, "picket_sink_queue_samples", sink, &[])
}

/// Waits until every listed sink has sent all it queued.
fn wait_drained(agg: &Aggregator, sinks: &[&str]) {
    wait_for("sink queues drained", Duration::from_secs(60), || {
        sinks
            .iter()
            .all(|sink| queue_samples(agg, sink) == 0.0 && sink_samples(agg, sink, "queued") > 0.0)
            .then_some(())
    });
}

/// Collection rounds of agent `instance` the aggregator has journaled.
fn journaled_rounds(journal: &Path, instance: &str) -> usize {
    journal::read(journal)
        .series("picket_agent_collections_total", instance)
        .len()
}

/// Runs an agent that sends only its own metrics until the aggregator journaled `rounds`
/// of its collections, then stops it with SIGTERM (it delivers what is pending first).
fn run_agent(dir: &Path, agg: &Aggregator, journal: &Path, instance: &str, rounds: usize) {
    let text = agent_config(
        instance,
        &[http(agg.grpc)],
        None,
        None,
        "[plugins]\ndefaults = false\n",
    );
    let (mut agent, _) = start_agent(dir, instance, &text);
    wait_for(
        &format!("{rounds} collection rounds of {instance}"),
        Duration::from_secs(30),
        || (journaled_rounds(journal, instance) >= rounds).then_some(()),
    );
    agent.terminate(Duration::from_secs(15));
}

fn prometheus_samples(prom: &Prometheus, names: &BTreeSet<String>) -> Samples {
    let mut out = Samples::new();
    for name in names {
        for (labels, samples) in prom.raw_samples(&format!("{{__name__=\"{name}\"}}")) {
            let mut labels = labels;
            labels.remove("__name__");
            out.insert((name.clone(), labels), samples);
        }
    }
    out
}

/// What VictoriaMetrics stores for `expected`'s families, waiting until as many samples as
/// were sent are searchable (VictoriaMetrics makes fresh rows visible a moment after a flush).
fn victoria_samples(vm: &VictoriaMetrics, expected: &Samples, prefix: &str) -> Samples {
    vm.flush();
    let mut out = Samples::new();
    for name in family_names(expected) {
        let want: usize = expected
            .iter()
            .filter(|(k, _)| k.0 == name)
            .map(|(_, v)| v.len())
            .sum();
        let stored = format!("{prefix}{name}");
        let series = vm.wait_export(&format!("{{__name__=\"{stored}\"}}"), |series| {
            series.iter().map(|s| s.1.len()).sum::<usize>() >= want
        });
        for (labels, samples) in series {
            let mut labels = labels;
            labels.remove("__name__");
            out.insert((name.clone(), labels), samples);
        }
    }
    out
}

/// VictoriaMetrics stores floats with about 12 significant decimal digits, not bit for bit:
/// the same series, timestamps and values within that precision.
fn assert_close(what: &str, expected: &Samples, stored: &Samples) {
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "{what}: different series"
    );
    for (key, samples) in expected {
        let got = &stored[key];
        assert_eq!(got.len(), samples.len(), "{what}: {key:?} sample count");
        for ((t1, v1), (t2, v2)) in samples.iter().zip(got) {
            assert_eq!(t1, t2, "{what}: {key:?} timestamps");
            assert!(
                (v1 - v2).abs() <= 1e-9 * v1.abs().max(1.0),
                "{what}: {key:?} at {t1}: sent {v1}, stored {v2}"
            );
        }
    }
}

fn influx_samples(influx: &InfluxDb, names: &BTreeSet<String>) -> Samples {
    let mut out = Samples::new();
    for name in names {
        for row in influx.points("picket", name) {
            let mut labels = BTreeMap::new();
            let mut time = None;
            let mut value = None;
            for (column, v) in row {
                match column.as_str() {
                    "time" => time = v.as_i64(),
                    "value" => value = v.as_f64(),
                    _ => {
                        if let Some(s) = v.as_str() {
                            labels.insert(column, s.to_owned());
                        }
                    }
                }
            }
            if let (Some(t), Some(v)) = (time, value) {
                out.entry((name.clone(), labels)).or_default().push((t, v));
            }
        }
    }
    for samples in out.values_mut() {
        samples.sort_by_key(|s| s.0);
    }
    out
}

/// Asserts `stored` holds exactly `expected`, naming the first difference.
fn assert_same(what: &str, expected: &Samples, stored: &Samples) {
    let expected_count: usize = expected.values().map(Vec::len).sum();
    for (key, samples) in expected {
        let got = stored.get(key);
        assert_eq!(
            got,
            Some(samples),
            "{what}: series {key:?} differs (expected {} samples)",
            samples.len()
        );
    }
    let extra: Vec<_> = stored
        .keys()
        .filter(|k| !expected.contains_key(k))
        .collect();
    assert!(extra.is_empty(), "{what}: series nobody sent: {extra:?}");
    assert!(expected_count > 0, "{what}: nothing to compare");
}

#[test]
fn agent_samples_reach_every_database_with_their_values_and_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(&dir.path().join("prometheus"));
    let influx = InfluxDb::start(&dir.path().join("influxdb"));
    influx.create_database("picket");
    let vm = VictoriaMetrics::start(&dir.path().join("victoria"));
    let journal = dir.path().join("journal.jsonl");
    let extra = sink_toml(&prom, &influx, Some(&vm), &dir.path().join("queues"));
    let agg = start_aggregator(dir.path(), extra, &journal);
    run_agent(dir.path(), &agg, &journal, "pi-sinks", 6);
    let all = ["prometheus", "influx", "vm_remote_write", "vm_influx_v2"];
    wait_drained(&agg, &all);

    let expected = journaled(&journal);
    let names = family_names(&expected);
    assert!(
        names.len() >= 5,
        "too few families to be a real test: {names:?}"
    );
    assert_same("prometheus", &expected, &prometheus_samples(&prom, &names));
    assert_same("influxdb v1", &expected, &influx_samples(&influx, &names));
    assert_close(
        "victoriametrics remote write",
        &expected,
        &victoria_samples(&vm, &expected, ""),
    );
    assert_close(
        "victoriametrics influx v2 (grouped)",
        &expected,
        &victoria_samples(&vm, &expected, "grouped_"),
    );
    for sink in all {
        assert_eq!(sink_samples(&agg, sink, "rejected"), 0.0, "{sink}");
        assert!(sink_samples(&agg, sink, "sent") > 0.0, "{sink}");
    }
    // The remote-write sinks sent the later rounds with labels replayed from their label
    // caches, and the databases hold the same samples as the journal (above).
    for sink in ["prometheus", "vm_remote_write"] {
        let batches = |result: &str| {
            let result = format!("result=\"{result}\"");
            sink_metric(
                &agg,
                "picket_sink_label_cache_batches_total",
                sink,
                &[&result],
            )
        };
        assert!(batches("hit") > 0.0, "{sink}: no batch replayed its labels");
        assert!(batches("miss") > 0.0, "{sink}: no shape was cached");
    }
}

/// A batch no agent would make tidy: label values with every character the formats escape,
/// UTF-8, empty values, a summary, a histogram, NaN and infinities, and a stale marker.
fn hostile_batch(sequence: u64, ts: i64) -> picket_proto::v1::Batch {
    let mut gauge = Family::new("picket_test_escapes", MetricType::Gauge, "escapes");
    let values = [
        "plain",
        "with space",
        "com,ma",
        "equals=sign",
        "double\"quote",
        "back\\slash",
        "trailing\\",
        "new\nline",
        "ünïcødé ✓ 温度",
    ];
    for (i, v) in values.iter().enumerate() {
        gauge.push(
            Labels::from_pairs([("text", *v), ("empty", ""), ("i", &i.to_string())]),
            ts,
            i as f64 + 0.5,
        );
    }
    let mut odd = Family::new("picket_test_non_finite", MetricType::Gauge, "");
    odd.push(Labels::from_pairs([("kind", "nan")]), ts, f64::NAN);
    odd.push(Labels::from_pairs([("kind", "inf")]), ts, f64::INFINITY);
    odd.push(Labels::from_pairs([("kind", "finite")]), ts, -2.25);
    let mut summary = Family::new("picket_test_latency", MetricType::Summary, "");
    summary.points.push(Point {
        labels: Labels::from_pairs([("op", "read")]),
        timestamp_ms: ts,
        value: Value::Summary(Summary {
            count: 10,
            sum: 4.5,
            quantiles: vec![(0.5, 0.25), (0.99, 1.5)],
        }),
    });
    let mut histogram = Family::new("picket_test_size", MetricType::Histogram, "");
    histogram.points.push(Point {
        labels: Labels::new(),
        timestamp_ms: ts,
        value: Value::Histogram(Histogram {
            count: 7,
            sum: 70.0,
            buckets: vec![(1.0, 2), (10.0, 5)],
        }),
    });
    let mut encoder = BatchEncoder::new(&Labels::from_pairs([("instance", "raw-1")]));
    for family in [&gauge, &odd, &summary, &histogram] {
        encoder.push(family);
    }
    encoder.finish(sequence)
}

#[test]
fn escaping_types_and_non_finite_values_survive_each_database() {
    let dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(&dir.path().join("prometheus"));
    let influx = InfluxDb::start(&dir.path().join("influxdb"));
    influx.create_database("picket");
    let journal = dir.path().join("journal.jsonl");
    let extra = sink_toml(&prom, &influx, None, &dir.path().join("queues"));
    let agg = start_aggregator(dir.path(), extra, &journal);

    let ts = picket_core::model::now_ms() - 5_000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = raw::channel(&http(agg.grpc), None).await.unwrap();
        let mut stream = raw::open(channel, Some(raw::hello("raw-1", 7)))
            .await
            .unwrap();
        stream.send_batch(hostile_batch(1, ts)).await;
        let ack = stream.next().await.unwrap();
        assert!(
            matches!(
                ack.outcome,
                Some(picket_proto::v1::ack::Outcome::Accepted(_))
            ),
            "{ack:?}"
        );
    });
    wait_drained(&agg, &["prometheus", "influx"]);

    // Prometheus: every label value exactly, the empty label absent, NaN and +Inf kept.
    let stored = prom.raw_samples("{__name__=\"picket_test_escapes\"}");
    assert_eq!(stored.len(), 9, "{stored:?}");
    for (labels, samples) in &stored {
        assert!(!labels.contains_key("empty"), "{labels:?}");
        let i: usize = labels["i"].parse().unwrap();
        assert_eq!(samples, &vec![(ts, i as f64 + 0.5)], "{labels:?}");
    }
    let values: BTreeSet<String> = stored.iter().map(|(l, _)| l["text"].clone()).collect();
    assert!(
        values.contains("new\nline")
            && values.contains("trailing\\")
            && values.contains("ünïcødé ✓ 温度"),
        "{values:?}"
    );
    let nan = prom.raw_samples("{__name__=\"picket_test_non_finite\",kind=\"nan\"}");
    assert!(nan[0].1[0].1.is_nan(), "{nan:?}");
    let inf = prom.raw_samples("{__name__=\"picket_test_non_finite\",kind=\"inf\"}");
    assert_eq!(inf[0].1[0].1, f64::INFINITY);
    let q99 = prom.raw_samples("{__name__=\"picket_test_latency\",quantile=\"0.99\"}");
    assert_eq!(q99[0].1, vec![(ts, 1.5)]);
    let inf_bucket = prom.raw_samples("{__name__=\"picket_test_size_bucket\",le=\"+Inf\"}");
    assert_eq!(inf_bucket[0].1, vec![(ts, 7.0)]);
    assert_eq!(
        prom.raw_samples("{__name__=\"picket_test_size_count\"}")[0].1,
        vec![(ts, 7.0)]
    );

    // InfluxDB: the same nine tag values; NaN and +Inf dropped and counted, the rest stored.
    let rows = influx.points("picket", "picket_test_escapes");
    assert_eq!(rows.len(), 9, "{rows:?}");
    let stored_values: BTreeSet<String> = influx
        .query(
            "picket",
            "SHOW TAG VALUES FROM \"picket_test_escapes\" WITH KEY = \"text\"",
        )
        .pointer("/results/0/series/0/values")
        .and_then(|v| v.as_array())
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r.get(1).and_then(|v| v.as_str()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    // Line protocol cannot carry a newline: it is stored as backslash-n.
    let expected_values: BTreeSet<String> = [
        "plain",
        "with space",
        "com,ma",
        "equals=sign",
        "double\"quote",
        "back\\slash",
        // A trailing backslash would escape the separator after it; an escaped space keeps
        // the value distinct from "trailing".
        "trailing\\ ",
        "new\\nline",
        "ünïcødé ✓ 温度",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(stored_values, expected_values);
    let finite = influx.points("picket", "picket_test_non_finite");
    assert_eq!(finite.len(), 1, "only the finite value: {finite:?}");
    assert_eq!(finite[0]["value"].as_f64(), Some(-2.25));
    assert_eq!(sink_samples(&agg, "influx", "dropped_non_finite"), 2.0);
    let summary = influx.points("picket", "picket_test_latency");
    assert!(
        summary
            .iter()
            .any(|r| r.get("sum").and_then(|v| v.as_f64()) == Some(4.5)),
        "{summary:?}"
    );
}

#[test]
fn databases_restarted_and_aggregator_killed_while_agents_stream_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut prom = Prometheus::start(&dir.path().join("prometheus"));
    let mut influx = InfluxDb::start(&dir.path().join("influxdb"));
    influx.create_database("picket");
    let journal = dir.path().join("journal.jsonl");
    let extra = sink_toml(&prom, &influx, None, &dir.path().join("queues"));
    let mut agg = start_aggregator(dir.path(), extra, &journal);
    let names = ["pi-f1", "pi-f2"];
    let agent_names = names;
    let mut agents = Vec::new();
    for name in names {
        let text = agent_config(
            name,
            &[http(agg.grpc)],
            None,
            None,
            "[plugins]\ndefaults = false\n",
        );
        agents.push(start_agent(dir.path(), name, &text).0);
    }
    let rounds = |name: &str| journaled_rounds(&journal, name);
    for name in names {
        wait_for("first rounds", Duration::from_secs(30), || {
            (rounds(name) >= 3).then_some(())
        });
    }

    // Both databases go down; the agents keep streaming into the queues.
    prom.stop();
    influx.stop();
    let queued_during_outage = |agg: &Aggregator| {
        ["prometheus", "influx"]
            .iter()
            .all(|sink| queue_samples(agg, sink) > 50.0)
    };
    wait_for(
        "data queued during the outage",
        Duration::from_secs(30),
        || queued_during_outage(&agg).then_some(()),
    );
    // The aggregator dies with acked data only in its queues, and comes back.
    agg.kill9_and_restart(dir.path());
    let before = names.map(rounds);
    wait_for(
        "more rounds after the restart",
        Duration::from_secs(30),
        || {
            names
                .iter()
                .zip(before)
                .all(|(n, b)| rounds(n) >= b + 3)
                .then_some(())
        },
    );
    prom.start_again();
    influx.start_again();
    // A second blip of Prometheus alone, now that data flows again.
    let now = names.map(rounds);
    wait_for("rounds after recovery", Duration::from_secs(30), || {
        names
            .iter()
            .zip(now)
            .all(|(n, b)| rounds(n) >= b + 3)
            .then_some(())
    });
    let restarted = std::time::Instant::now();
    prom.restart();

    for agent in &mut agents {
        agent.terminate(Duration::from_secs(15));
    }
    wait_drained(&agg, &["prometheus", "influx"]);
    let recovery = restarted.elapsed();
    let expected = journaled(&journal);
    let names = family_names(&expected);
    assert_same(
        "prometheus after restarts",
        &expected,
        &prometheus_samples(&prom, &names),
    );
    assert_same(
        "influxdb after restarts",
        &expected,
        &influx_samples(&influx, &names),
    );
    let total: usize = expected.values().map(Vec::len).sum();
    // Every sample the agents collected was accepted once (their own count at exit).
    let accepted_journal = journal::read(&journal);
    let (mut collected, mut accepted) = (0, 0);
    for (name, agent) in agent_names.iter().zip(&agents) {
        let log = faults::AgentLog::read(&agent.log);
        let got = faults::accepted(&accepted_journal, name);
        assert_eq!(got.duplicates, 0, "{name}: samples accepted twice");
        let at_exit = log.collected_at_exit.expect("clean exit line");
        assert_eq!(got.points, at_exit, "{name}: collected vs accepted");
        collected += at_exit;
        accepted += got.points;
    }
    faults::report(&faults::FaultRow {
        scenario: "Prometheus + InfluxDB down, aggregator SIGKILL meanwhile, Prometheus restarted again",
        collected,
        accepted,
        stored: total as u64,
        lost: collected - accepted,
        duplicated: 0,
        recovery,
        note: "stored = finite samples, identical in Prometheus and InfluxDB",
    });
}

#[test]
fn prometheus_scrapes_the_aggregator_as_openmetrics_with_the_agents_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal.jsonl");
    let agg = start_aggregator(dir.path(), String::new(), &journal);
    let prom = Prometheus::start_scraping(&dir.path().join("prometheus"), agg.http);
    let text = agent_config(
        "pi-scraped",
        &[http(agg.grpc)],
        None,
        None,
        "[plugins]\ndefaults = false\n",
    );
    let (_agent, _) = start_agent(dir.path(), "pi-scraped", &text);
    let selector = "picket_agent_collections_total{instance=\"pi-scraped\"}";
    let stored = wait_for("scraped samples", Duration::from_secs(60), || {
        let series = prom.raw_samples(selector);
        (series.first().is_some_and(|s| s.1.len() >= 3)).then_some(series)
    });
    // Every stored timestamp is one the agent collected at, not a scrape time.
    let collected: BTreeSet<i64> = journal::read(&journal)
        .series("picket_agent_collections_total", "pi-scraped")
        .iter()
        .map(|p| p.timestamp_ms)
        .collect();
    for (ts, _) in &stored[0].1 {
        assert!(
            collected.contains(ts),
            "{ts} is not a collection time: {collected:?}"
        );
    }
    // Prometheus asked for OpenMetrics and got it: the counter's family is declared without
    // `_total`, which only the OpenMetrics writer does.
    let metadata = http_get(
        prom.addr(),
        "/api/v1/metadata?metric=picket_agent_collections",
    )
    .unwrap();
    assert!(
        metadata.1.contains("\"type\":\"counter\""),
        "metadata: {}",
        metadata.1
    );
    let plain = http_get(agg.http, "/metrics").unwrap().1;
    assert!(
        plain.contains("# TYPE picket_agent_collections_total counter"),
        "{plain}"
    );
}

#[test]
fn influxdb_with_authentication_gets_the_samples_with_basic_auth_from_a_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let influx = InfluxDb::start_with_auth(&dir.path().join("influxdb"), "picket", "s3cret pw");
    influx.create_database("picket");
    let password = dir.path().join("influx-password");
    std::fs::write(&password, "s3cret pw\n").unwrap();
    let journal = dir.path().join("journal.jsonl");
    let extra = format!(
        "[queues]\ndirectory = \"{}\"\n[[sinks]]\ntype = \"influxdb\"\nname = \"influx\"\nurl = \"{}\"\napi = \"v1\"\ndatabase = \"picket\"\n[sinks.auth]\nusername = \"picket\"\npassword_file = \"{}\"\n",
        dir.path().join("queues").display(),
        influx.url(),
        password.display()
    );
    let agg = start_aggregator(dir.path(), extra, &journal);
    run_agent(dir.path(), &agg, &journal, "pi-auth", 3);
    wait_drained(&agg, &["influx"]);
    let expected = journaled(&journal);
    let names = family_names(&expected);
    assert_same(
        "influxdb with auth",
        &expected,
        &influx_samples(&influx, &names),
    );
    assert!(
        !agg.process.log_text().contains("s3cret"),
        "the password must never be logged"
    );
}

/// What the routing of the mutual-TLS test below does to a journaled series: `None` when
/// the series is filtered out, else its labels after `drop_labels` and `external_labels`.
fn routed(name: &str, labels: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    let kept = (name.starts_with("picket_agent_") && name.ends_with("_total"))
        || name == "picket_agent_build_info";
    let dropped = name == "picket_agent_connects_total"
        || labels.get("reason").map(String::as_str) == Some("shutdown");
    if !kept || dropped {
        return None;
    }
    let mut labels = labels.clone();
    labels.remove("version");
    labels.insert("datacenter".into(), "dc1".into());
    // `instance` is in `external_labels` too, but the series' own value wins.
    Some(labels)
}

#[test]
fn prometheus_over_mutual_tls_gets_routed_series_and_a_sink_without_a_client_certificate_keeps_its_data()
 {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let harness = pki.issue_agent("harness");
    let sink_client = pki.issue_agent("aggregator-sink");
    let prom = Prometheus::start_tls(
        &dir.path().join("prometheus"),
        &WebTls {
            cert: pki.dir.join("aggregator.pem"),
            key: pki.dir.join("aggregator-key.pem"),
            client_ca: Some(pki.ca()),
        },
        ClientTls::new(&pki.ca(), Some((&harness.0, &harness.1))),
    );
    assert!(prom.write_url().starts_with("https://"));
    let journal = dir.path().join("journal.jsonl");
    let extra = format!(
        r#"
[queues]
directory = "{queues}"

[[sinks]]
type = "prometheus_remote_write"
name = "mtls"
url = "{url}"
[sinks.tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[sinks.routing]
keep_metrics = ["picket_agent_.*_total", "picket_agent_build_info"]
drop_metrics = ["picket_agent_connects_total"]
drop_labels = ["version"]
[sinks.routing.drop_if]
reason = "shutdown"
[sinks.routing.external_labels]
datacenter = "dc1"
instance = "never-used"

[[sinks]]
type = "prometheus_remote_write"
name = "no_client_cert"
url = "{url}"
[sinks.tls]
ca = "{ca}"
[sinks.retry]
initial_backoff = "50ms"
max_backoff = "200ms"
"#,
        queues = dir.path().join("queues").display(),
        url = prom.write_url(),
        ca = pki.ca().display(),
        cert = sink_client.0.display(),
        key = sink_client.1.display(),
    );
    let agg = start_aggregator(dir.path(), extra, &journal);
    run_agent(dir.path(), &agg, &journal, "pi-tls", 4);
    wait_drained(&agg, &["mtls"]);

    let all = journaled(&journal);
    let expected: Samples = all
        .iter()
        .filter_map(|((name, labels), samples)| {
            Some(((name.clone(), routed(name, labels)?), samples.clone()))
        })
        .collect();
    assert!(
        expected.len() >= 5 && expected.len() + 3 <= all.len(),
        "routing must keep some series and drop some: {} of {}",
        expected.len(),
        all.len()
    );
    // Queried by every journaled name, so a series routing should have dropped shows up as
    // one nobody sent.
    assert_same(
        "prometheus over mutual TLS, routed",
        &expected,
        &prometheus_samples(&prom, &family_names(&all)),
    );
    assert!(sink_samples(&agg, "mtls", "filtered") > 0.0);

    // The sink without a client certificate cannot get through the handshake: its data
    // waits in its queue and the failures are retried, never dropped.
    let queued = sink_samples(&agg, "no_client_cert", "queued");
    assert_eq!(queued, all.values().map(Vec::len).sum::<usize>() as f64);
    wait_for(
        "handshake failures retried",
        Duration::from_secs(30),
        || {
            (sink_metric(&agg, "picket_sink_retries_total", "no_client_cert", &[]) >= 3.0)
                .then_some(())
        },
    );
    assert_eq!(sink_samples(&agg, "no_client_cert", "sent"), 0.0);
    assert_eq!(sink_samples(&agg, "no_client_cert", "rejected"), 0.0);
    assert_eq!(queue_samples(&agg, "no_client_cert"), queued);
}

#[test]
fn a_full_blocking_queue_stops_acks_and_the_agent_keeps_its_data_until_the_database_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut prom = Prometheus::start(&dir.path().join("prometheus"));
    prom.stop();
    let journal = dir.path().join("journal.jsonl");
    // The smallest queue allowed (4 segments of 64 KiB): a few rounds of 2,000 series fill
    // it while Prometheus is down.
    let extra = format!(
        r#"
[queues]
directory = "{queues}"

[[sinks]]
type = "prometheus_remote_write"
name = "prometheus"
url = "{url}"
[sinks.retry]
initial_backoff = "50ms"
max_backoff = "300ms"
[sinks.queue]
max_bytes = 262144
segment_bytes = 65536
when_full = "block"
"#,
        queues = dir.path().join("queues").display(),
        url = prom.write_url(),
    );
    let agg = start_aggregator(dir.path(), extra, &journal);
    let plugins = format!(
        "[plugins]\ndefaults = false\ndirectory = \"{}\"\n\n[[plugins.instances]]\nname = \"wide\"\nplugin = \"picket_plugin_probe\"\nsettings = {{ mode = \"wide\", count = \"2000\" }}\n",
        plugin_dir().display()
    );
    let text = agent_config("pi-block", &[http(agg.grpc)], None, None, &plugins);
    let (mut agent, _) = start_agent(dir.path(), "pi-block", &text);

    // The queue fills and the aggregator refuses batches, again and again as the agent
    // retries.
    let refusals = || {
        agg.process
            .log_text()
            .matches("a sink refused a batch")
            .count()
    };
    wait_for(
        "the full queue refusing batches",
        Duration::from_secs(60),
        || (refusals() >= 5).then_some(()),
    );
    let rounds_while_blocked = journaled_rounds(&journal, "pi-block");
    assert!(queue_samples(&agg, "prometheus") > 0.0);

    // Prometheus returns: the queue drains, acks resume, and the agent sends what it kept.
    prom.start_again();
    wait_for(
        "rounds collected after the outage",
        Duration::from_secs(90),
        || (journaled_rounds(&journal, "pi-block") >= rounds_while_blocked + 10).then_some(()),
    );
    agent.terminate(Duration::from_secs(30));
    wait_drained(&agg, &["prometheus"]);

    let read = journal::read(&journal);
    // The agent lost nothing: its batches were accepted 1, 2, 3, ... without a gap, its
    // probe's round counter has no gap, and it counted no drops.
    let sequences: Vec<u64> = read
        .commits
        .iter()
        .filter(|c| c.0 == "pi-block")
        .map(|c| c.2)
        .collect();
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
    let rounds: Vec<f64> = read
        .series("probe_collections_total", "pi-block")
        .iter()
        .filter_map(|p| p.value)
        .collect();
    assert_eq!(
        rounds,
        (1..=rounds.len()).map(|n| n as f64).collect::<Vec<_>>(),
        "a collection round is missing"
    );
    let dropped: f64 = read
        .series("picket_agent_dropped_samples_total", "pi-block")
        .iter()
        .filter_map(|p| p.value)
        .sum();
    assert_eq!(dropped, 0.0, "the agent dropped samples");
    assert_eq!(sink_samples(&agg, "prometheus", "dropped_queue_full"), 0.0);

    let expected = journaled(&journal);
    assert_same(
        "prometheus after a blocking queue",
        &expected,
        &prometheus_samples(&prom, &family_names(&expected)),
    );
    eprintln!(
        "blocking queue: {} refusals, {} rounds, {} samples all in Prometheus",
        refusals(),
        rounds.len(),
        expected.values().map(Vec::len).sum::<usize>()
    );
}

/// An aggregator that only relays (`exposition.enabled = false`, one remote-write sink, no
/// routing or file sink) validates batches without decoding them and queues them as received;
/// the remote-write sink transcodes them straight from their symbol tables. What Prometheus
/// stores must be exactly what the full decode of the batch says, a bad batch must get the
/// same rejection, and `/metrics` must keep no series of the agents.
#[test]
fn a_relay_only_aggregator_stores_exactly_the_decoded_samples_and_keeps_no_series() {
    use picket_core::codec::decode_batch;
    use picket_proto::v1::ack::Outcome;

    let dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(&dir.path().join("prometheus"));
    let extra = format!(
        "\n[exposition]\nenabled = false\n[queues]\ndirectory = \"{}\"\n{}",
        dir.path().join("queues").display(),
        remote_write_sink_toml("prometheus", &prom.write_url()),
    );
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorSpec {
            pki: None,
            mutual_tls: false,
            journal: None,
            extra,
        },
    );

    let ts = picket_core::model::now_ms() - 5_000;
    let good = hostile_batch(1, ts);
    // A series label the protocol reserves: refused at ingest, by validation alone.
    let mut bad = hostile_batch(2, ts + 1);
    bad.symbols.push("__reserved".to_owned());
    let reserved = bad.symbols.len() as u32 - 1;
    bad.families[0].series[0]
        .labels
        .extend([reserved, reserved]);
    let expected_reason = decode_batch(&bad).unwrap_err().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (first, second) = rt.block_on(async {
        let channel = raw::channel(&http(agg.grpc), None).await.unwrap();
        let mut stream = raw::open(channel, Some(raw::hello("raw-1", 7)))
            .await
            .unwrap();
        stream.send_batch(good.clone()).await;
        let first = stream.next().await.unwrap();
        stream.send_batch(bad).await;
        (first, stream.next().await.unwrap())
    });
    assert!(
        matches!(first.outcome, Some(Outcome::Accepted(_))),
        "{first:?}"
    );
    match second.outcome {
        Some(Outcome::Rejected(r)) => assert_eq!(r.reason, expected_reason),
        other => panic!("the bad batch must be rejected: {other:?}"),
    }
    wait_drained(&agg, &["prometheus"]);

    // Every sample of the decoded batch, as Prometheus names the series.
    let decoded = decode_batch(&good).unwrap();
    let mut expected = Samples::new();
    let mut add = |name: String, labels: &Labels, extra: Option<(&str, String)>, v: f64| {
        let mut labels: BTreeMap<String, String> = labels
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(n, value)| (n.to_owned(), value.to_owned()))
            .collect();
        if let Some((n, value)) = extra {
            labels.insert(n.to_owned(), value);
        }
        expected.entry((name, labels)).or_default().push((ts, v));
    };
    for family in &decoded.families {
        for point in &family.points {
            let name = &family.name;
            match &point.value {
                Value::Number(v) => add(name.clone(), &point.labels, None, *v),
                Value::Summary(s) => {
                    for &(q, v) in &s.quantiles {
                        let q = picket_core::exposition::format_float(q);
                        add(name.clone(), &point.labels, Some(("quantile", q)), v);
                    }
                    add(format!("{name}_sum"), &point.labels, None, s.sum);
                    add(format!("{name}_count"), &point.labels, None, s.count as f64);
                }
                Value::Histogram(h) => {
                    let mut buckets = h.buckets.clone();
                    buckets.push((f64::INFINITY, h.count));
                    for (le, count) in buckets {
                        let le = picket_core::exposition::format_float(le);
                        add(
                            format!("{name}_bucket"),
                            &point.labels,
                            Some(("le", le)),
                            count as f64,
                        );
                    }
                    add(format!("{name}_sum"), &point.labels, None, h.sum);
                    add(format!("{name}_count"), &point.labels, None, h.count as f64);
                }
                Value::Stale => {}
            }
        }
    }
    assert!(expected.len() >= 15, "too few series: {expected:?}");
    // NaN equals nothing, so that family is compared on its own.
    let non_finite = "picket_test_non_finite";
    let stored = prometheus_samples(&prom, &BTreeSet::from([non_finite.to_owned()]));
    let values = |samples: &Samples| -> BTreeMap<String, String> {
        samples
            .iter()
            .filter(|((name, _), _)| name == non_finite)
            .map(|((_, labels), s)| (labels["kind"].clone(), format!("{:?}", s)))
            .collect()
    };
    assert_eq!(values(&stored), values(&expected));
    assert_eq!(values(&stored).len(), 3);
    expected.retain(|(name, _), _| name != non_finite);
    let names = family_names(&expected);
    assert_same("prometheus", &expected, &prometheus_samples(&prom, &names));

    assert_eq!(sink_samples(&agg, "prometheus", "rejected"), 0.0);
    assert_eq!(
        agg.metric_sum(
            "picket_aggregator_agent_samples_total",
            &["agent=\"raw-1\""]
        ),
        decoded.sample_count() as f64
    );
    let exposition = agg.metrics();
    assert!(
        !exposition.contains("picket_test_escapes"),
        "no agent series on /metrics:\n{exposition}"
    );
    assert!(
        exposition
            .lines()
            .any(|l| l.starts_with("picket_aggregator_series ") && l.contains(" 0")),
        "{exposition}"
    );
}

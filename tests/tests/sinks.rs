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
use picket_tests::servers::{InfluxDb, Prometheus, VictoriaMetrics};
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

[[sinks]]
type = "prometheus_remote_write"
name = "prometheus"
url = "{prom_url}"
[sinks.retry]
initial_backoff = "50ms"
max_backoff = "500ms"

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
        prom_url = prom.write_url(),
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

/// Waits until every listed sink has sent all it queued.
fn wait_drained(agg: &Aggregator, sinks: &[&str]) {
    wait_for("sink queues drained", Duration::from_secs(60), || {
        let text = agg.metrics();
        sinks
            .iter()
            .all(|sink| {
                let depth = text
                    .lines()
                    .find(|l| {
                        l.starts_with("picket_sink_queue_samples{")
                            && l.contains(&format!("sink=\"{sink}\""))
                    })
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok());
                depth == Some(0.0)
            })
            .then_some(())
    });
}

fn sink_samples(agg: &Aggregator, sink: &str, outcome: &str) -> f64 {
    let text = agg.metrics();
    text.lines()
        .filter(|l| {
            l.starts_with("picket_sink_samples_total{")
                && l.contains(&format!("sink=\"{sink}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
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

    let text = agent_config(
        "pi-sinks",
        &[http(agg.grpc)],
        None,
        None,
        "[plugins]\ndefaults = false\n",
    );
    let (mut agent, _) = start_agent(dir.path(), "pi-sinks", &text);
    wait_for("six collection rounds", Duration::from_secs(30), || {
        (journal::read(&journal)
            .series("picket_agent_collections_total", "pi-sinks")
            .len()
            >= 6)
            .then_some(())
    });
    agent.terminate(Duration::from_secs(15));
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
    let rounds = |name: &str| {
        journal::read(&journal)
            .series("picket_agent_collections_total", name)
            .len()
    };
    for name in names {
        wait_for("first rounds", Duration::from_secs(30), || {
            (rounds(name) >= 3).then_some(())
        });
    }

    // Both databases go down; the agents keep streaming into the queues.
    prom.stop();
    influx.stop();
    let queued_during_outage = |agg: &Aggregator| {
        let text = agg.metrics();
        ["prometheus", "influx"].iter().all(|sink| {
            text.lines().any(|l| {
                l.starts_with("picket_sink_queue_samples{")
                    && l.contains(&format!("sink=\"{sink}\""))
                    && l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v > 50.0)
            })
        })
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
    prom.restart();

    for agent in &mut agents {
        agent.terminate(Duration::from_secs(15));
    }
    wait_drained(&agg, &["prometheus", "influx"]);
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
    eprintln!("fault test: {total} journaled samples, all present once in Prometheus and InfluxDB");
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
    let text = agent_config(
        "pi-auth",
        &[http(agg.grpc)],
        None,
        None,
        "[plugins]\ndefaults = false\n",
    );
    let (mut agent, _) = start_agent(dir.path(), "pi-auth", &text);
    wait_for("rounds", Duration::from_secs(30), || {
        (journal::read(&journal)
            .series("picket_agent_collections_total", "pi-auth")
            .len()
            >= 3)
            .then_some(())
    });
    agent.terminate(Duration::from_secs(15));
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

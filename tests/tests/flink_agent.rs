//! The Flink story end to end on a real Apache Flink 2.3 cluster: an agent runs the flink
//! plugin against the JobManager's REST API and the prometheus plugin against both
//! PrometheusReporter ports (plus host and rpi, with a fake `vcgencmd`); the aggregator writes
//! to a real Prometheus (which also loads the shipped alert rules and scrapes the
//! aggregator's own metrics) and a real InfluxDB. What the seed documents monitor must
//! arrive; every panel of the shipped dashboard must return data; cancelling the job must
//! end its series and make `FlinkJobNotRunning` true; a resubmitted job must appear.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use picket_tests::flink::Flink;
use picket_tests::servers::{InfluxDb, Prometheus};
use picket_tests::*;

/// Rows per second of the SQL job's datagen source.
const ROWS: u32 = 2000;

/// Prometheus evaluating the shipped rules every second and scraping the aggregator's own
/// `picket_*` metrics from the targets in `targets_file` (filled in once the aggregator
/// runs).
fn start_prometheus(dir: &Path, targets_file: &Path) -> Prometheus {
    std::fs::write(targets_file, "[]").unwrap();
    let rules = dashboard::repo().join("deploy/prometheus/picket-alerts.yml");
    Prometheus::start_with_config(
        &dir.join("prometheus"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: picket-aggregator\n    honor_labels: true\n\
             \x20   file_sd_configs:\n      - files: [{targets:?}]\n\
             \x20   metric_relabel_configs:\n      - source_labels: [__name__]\n\
             \x20       regex: \"picket_(aggregator|sink|receiver)_.*\"\n        action: keep\n",
            rules = rules.display().to_string(),
            targets = targets_file.display().to_string(),
        ),
    )
}

fn scalar(prom: &Prometheus, expr: &str) -> Option<f64> {
    let json = prom.query(&format!("sum({expr})"));
    json["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
}

fn series(prom: &Prometheus, expr: &str) -> Vec<serde_json::Value> {
    prom.query(expr)["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn wait_value(prom: &Prometheus, what: &str, expr: &str, ok: impl Fn(f64) -> bool) -> f64 {
    wait_for(what, Duration::from_secs(150), || {
        scalar(prom, expr).filter(|v| ok(*v))
    })
}

fn wait_increasing(prom: &Prometheus, what: &str, expr: &str) {
    let first = wait_value(prom, what, expr, |v| v > 0.0);
    wait_value(prom, &format!("{what} increasing"), expr, |v| v > first);
}

#[test]
fn an_agent_watching_a_real_flink_cluster_feeds_prometheus_influxdb_alerts_and_the_dashboard() {
    let dir = tempfile::tempdir().unwrap();
    let targets = dir.path().join("aggregator-targets.json");
    let prom = start_prometheus(dir.path(), &targets);
    let influx = InfluxDb::start(&dir.path().join("influxdb"));
    influx.create_database("picket");
    let extra = format!(
        r#"
[queues]
directory = "{queues}"
{sink}
[[sinks]]
type = "influxdb"
name = "influx"
url = "{influx}"
api = "v1"
database = "picket"
"#,
        queues = dir.path().join("queues").display(),
        sink = remote_write_sink_toml("prometheus", &prom.write_url()),
        influx = influx.url(),
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
    let staged = dir.path().join("targets.tmp");
    std::fs::write(&staged, format!("[{{\"targets\": [\"{}\"]}}]", agg.http)).unwrap();
    std::fs::rename(&staged, &targets).unwrap();

    let mut flink = Flink::start(dir.path(), "", ROWS);
    let first_job = flink.submit();
    let rest = flink.rest_url();
    let (jm, tm) = flink.reporter_ports();

    // The agent: flink (REST), prometheus (both reporters), rpi (fake vcgencmd), host (default).
    let rpi = fake_rpi_instance(&copy_rpi_fixtures(dir.path()));
    let plugins = format!(
        "[[plugins.instances]]\nname = \"flink\"\nplugin = \"flink\"\ntimeout = \"20s\"\n\
         settings = {{ url = \"{rest}\", cluster = \"e2e\" }}\n\
         grants = {{ http = {{ allow = [\"{rest}/\"] }} }}\n\
         [[plugins.instances]]\nname = \"flink-reporters\"\nplugin = \"prometheus\"\ntimeout = \"20s\"\n\
         settings = {{ targets = [\"http://127.0.0.1:{jm}/metrics\", \"http://127.0.0.1:{tm}/metrics\"] }}\n\
         grants = {{ http = {{ allow = [\"http://127.0.0.1:{jm}/\", \"http://127.0.0.1:{tm}/\"] }} }}\n\
         {rpi}"
    );
    let text = agent_config("pi-flink", &[http(agg.grpc)], None, None, "")
        .replace("interval = \"300ms\"", "interval = \"1s\"")
        .replace("[batch]", &format!("{plugins}[batch]"));
    let (_agent, _) = start_agent(dir.path(), "pi-flink", &text);

    // From the flink plugin (REST API).
    let job = format!("job_id=\"{first_job}\"");
    wait_value(
        &prom,
        "one task manager",
        "flink_taskmanagers{cluster=\"e2e\"}",
        |v| v == 1.0,
    );
    wait_value(
        &prom,
        "two slots",
        "flink_task_slots{cluster=\"e2e\"}",
        |v| v == 2.0,
    );
    wait_value(
        &prom,
        "no free slot",
        "flink_task_slots_available{cluster=\"e2e\"}",
        |v| v == 0.0,
    );
    wait_value(
        &prom,
        "one running job",
        "flink_jobs{cluster=\"e2e\",state=\"running\"}",
        |v| v == 1.0,
    );
    wait_increasing(
        &prom,
        "job uptime",
        &format!("flink_job_uptime_seconds{{{job}}}"),
    );
    wait_value(
        &prom,
        "no restarts",
        &format!("flink_job_restarts_total{{{job}}}"),
        |v| v == 0.0,
    );
    wait_increasing(
        &prom,
        "completed checkpoints",
        &format!("flink_job_checkpoints_completed_total{{{job}}}"),
    );
    for name in [
        "flink_vertex_backpressured_time_ms_per_second",
        "flink_vertex_busy_time_ms_per_second",
    ] {
        wait_for(name, Duration::from_secs(120), || {
            (!series(&prom, &format!("{name}{{{job}}}")).is_empty()).then_some(())
        });
    }

    // From the prometheus plugin (both PrometheusReporter ports).
    for name in [
        "flink_jobmanager_Status_JVM_Memory_Heap_Used",
        "flink_taskmanager_Status_JVM_Memory_Heap_Used",
    ] {
        wait_value(&prom, name, name, |v| v > 0.0);
    }
    wait_for("GC counts", Duration::from_secs(120), || {
        (!series(
            &prom,
            "{__name__=~\"flink_(job|task)manager_Status_JVM_GarbageCollector_.*_Count\"}",
        )
        .is_empty())
        .then_some(())
    });
    for name in [
        "flink_taskmanager_job_task_operator_numRecordsIn",
        "flink_taskmanager_job_task_operator_numRecordsOut",
    ] {
        wait_increasing(&prom, name, &format!("{name}{{{job}}}"));
    }
    // Flink's meters average over a minute, so the source's rate climbs to the datagen rate.
    let rate = format!(
        "flink_taskmanager_job_task_operator_numRecordsOutPerSecond{{{job},operator_name=~\"Source.*\"}}"
    );
    let measured = wait_value(
        &prom,
        "records out per second near the datagen rate",
        &rate,
        |v| (v - f64::from(ROWS)).abs() <= 0.25 * f64::from(ROWS),
    );
    eprintln!("source numRecordsOutPerSecond {measured} for {ROWS} rows/s");
    let operator_series = series(
        &prom,
        &format!("flink_taskmanager_job_task_operator_numRecordsOut{{{job}}}"),
    );
    for s in &operator_series {
        let labels = &s["metric"];
        assert_eq!(labels["job_name"], "picket_datagen_blackhole", "{labels}");
        assert!(
            labels.get("task_attempt_id").is_none(),
            "task_attempt_id kept: {labels}"
        );
        assert_eq!(labels["instance"], "pi-flink", "{labels}");
    }

    // InfluxDB has them too.
    let running = influx.points("picket", "flink_jobs");
    assert!(
        running
            .iter()
            .any(|p| p.get("state").and_then(|s| s.as_str()) == Some("running")),
        "flink_jobs{{state=\"running\"}} in InfluxDB"
    );
    assert!(
        !influx
            .points(
                "picket",
                "flink_taskmanager_job_task_operator_numRecordsOut"
            )
            .is_empty()
    );

    // Every panel of the shipped dashboard has data (a panel with one query per source needs
    // one of them to answer).
    wait_for("the aggregator scraped", Duration::from_secs(60), || {
        scalar(&prom, "picket_aggregator_agent_up").filter(|v| *v == 1.0)
    });
    let board = dashboard::load();
    let values = BTreeMap::from([
        ("__rate_interval", "1m"),
        ("__interval", "15s"),
        ("__interval_ms", "15000"),
        ("__range", "1h"),
        ("__range_s", "3600"),
        ("instance", ".+"),
        ("job_name", ".+"),
        ("datasource", "prometheus"),
    ]);
    let mut empty = Vec::new();
    for panel in dashboard::all_panels(&board) {
        let queries = dashboard::exprs(panel);
        if queries.is_empty() {
            continue; // a row
        }
        let answered = queries
            .iter()
            .any(|q| !series(&prom, &dashboard::substitute(q, &values)).is_empty());
        if !answered {
            empty.push(format!("{}: {queries:?}", dashboard::panel_name(panel)));
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );

    // Cancel: the job's series end, and FlinkJobNotRunning's expression turns true.
    flink.cancel();
    wait_for(
        "the cancelled job's operator series to end",
        Duration::from_secs(120),
        || {
            series(
                &prom,
                &format!("flink_taskmanager_job_task_operator_numRecordsOut{{{job}}}"),
            )
            .is_empty()
            .then_some(())
        },
    );
    wait_for(
        "FlinkJobNotRunning pending or firing",
        Duration::from_secs(120),
        || {
            (!series(
                &prom,
                "ALERTS{alertname=\"FlinkJobNotRunning\",job_name=~\"picket.datagen.blackhole\"}",
            )
            .is_empty())
            .then_some(())
        },
    );

    // Resubmitted: the new job appears under its new id.
    let second_job = flink.submit();
    assert_ne!(second_job, first_job);
    wait_value(
        &prom,
        "one running job again",
        "flink_jobs{cluster=\"e2e\",state=\"running\"}",
        |v| v == 1.0,
    );
    wait_increasing(
        &prom,
        "the new job's records",
        &format!("flink_taskmanager_job_task_operator_numRecordsOut{{job_id=\"{second_job}\"}}"),
    );
}

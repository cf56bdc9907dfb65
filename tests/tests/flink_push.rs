//! A real Apache Flink 2.3 cluster whose own reporters push to the aggregator:
//! `PrometheusPushGatewayReporter` to the Pushgateway-compatible receiver and
//! `InfluxdbReporter` to the InfluxDB `/write`-compatible one, with nothing changed but the
//! address. Both arrive in a real Prometheus through the remote-write sink; a cancelled
//! job's series end, and `deleteOnShutdown` ends the rest when Flink stops.

use std::time::Duration;

use picket_tests::flink::Flink;
use picket_tests::servers::Prometheus;
use picket_tests::*;

/// The SQL job's name, `picket-datagen-blackhole` (tests/flink/SqlJob.java), as a label
/// matcher: Flink's Prometheus reporters turn the `-` into `_`.
const JOB: &str = "picket.datagen.blackhole";

fn sum(prom: &Prometheus, expr: &str) -> Option<f64> {
    let json = prom.query(&format!("sum({expr})"));
    json["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
}

fn wait_increasing(prom: &Prometheus, expr: &str) {
    let first = wait_for(
        &format!("{expr} in Prometheus"),
        Duration::from_secs(120),
        || sum(prom, expr).filter(|v| *v > 0.0),
    );
    wait_for(
        &format!("{expr} increasing"),
        Duration::from_secs(60),
        || sum(prom, expr).filter(|v| *v > first),
    );
}

fn wait_gone(prom: &Prometheus, expr: &str, timeout: Duration) {
    wait_for(&format!("{expr} to end"), timeout, || {
        let json = prom.query(expr);
        json["data"]["result"]
            .as_array()
            .is_some_and(|r| r.is_empty())
            .then_some(())
    });
}

#[test]
fn flink_reporters_push_to_the_aggregator_and_ended_series_go_stale() {
    let dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(&dir.path().join("prometheus"));
    let extra = format!(
        r#"
[queues]
directory = "{queues}"

[receivers.pushgateway]
enabled = true
group_ttl = "1m"

[receivers.influxdb]
enabled = true
databases = ["flink"]
{sink}"#,
        queues = dir.path().join("queues").display(),
        sink = remote_write_sink_toml("prometheus", &prom.write_url()),
    );
    let agg = Aggregator::start(
        dir.path(),
        &AggregatorSpec {
            pki: None,
            mutual_tls: false,
            journal: Some(dir.path().join("journal.jsonl")),
            extra,
        },
    );
    let port = agg.http.port();
    let reporters = format!(
        "metrics.reporter.push.factory.class: org.apache.flink.metrics.prometheus.PrometheusPushGatewayReporterFactory\n\
         metrics.reporter.push.hostUrl: http://127.0.0.1:{port}\n\
         metrics.reporter.push.jobName: picket-e2e\n\
         metrics.reporter.push.randomJobNameSuffix: true\n\
         metrics.reporter.push.deleteOnShutdown: true\n\
         metrics.reporter.push.groupingKey: cluster=e2e\n\
         metrics.reporter.push.interval: 1 s\n\
         metrics.reporter.influx.factory.class: org.apache.flink.metrics.influxdb.InfluxdbReporterFactory\n\
         metrics.reporter.influx.scheme: http\n\
         metrics.reporter.influx.host: 127.0.0.1\n\
         metrics.reporter.influx.port: {port}\n\
         metrics.reporter.influx.db: flink\n\
         metrics.reporter.influx.interval: 1 s\n"
    );
    let mut flink = Flink::start(dir.path(), &reporters, 2000);
    flink.submit();

    // Through the Pushgateway receiver: Flink's own names, the grouping key as labels.
    let pushed = format!(
        "flink_taskmanager_job_task_operator_numRecordsIn{{job_name=~\"{JOB}\",cluster=\"e2e\"}}"
    );
    wait_increasing(&prom, &pushed);
    wait_for("one running job (push)", Duration::from_secs(60), || {
        (sum(&prom, "flink_jobmanager_numRunningJobs{cluster=\"e2e\"}") == Some(1.0)).then_some(())
    });
    // Through the InfluxDB receiver: `<measurement>_<field>`.
    let written =
        format!("taskmanager_job_task_operator_numRecordsIn_count{{job_name=~\"{JOB}\"}}");
    wait_increasing(&prom, &written);
    wait_for("one running job (influx)", Duration::from_secs(60), || {
        (sum(&prom, "jobmanager_numRunningJobs") == Some(1.0)).then_some(())
    });

    // Cancelled: the task manager's next push no longer has the job's series, so they end.
    flink.cancel();
    wait_gone(&prom, &pushed, Duration::from_secs(120));
    wait_for("no running job (push)", Duration::from_secs(60), || {
        (sum(&prom, "flink_jobmanager_numRunningJobs{cluster=\"e2e\"}") == Some(0.0)).then_some(())
    });

    // Stopped: deleteOnShutdown removes each process's group, and its series end at once
    // (well within the 1-minute group_ttl, which would end them too, later).
    let jvm = "flink_taskmanager_Status_JVM_CPU_Load{cluster=\"e2e\"}";
    assert!(
        sum(&prom, jvm).is_some(),
        "the task manager's JVM metrics were pushed"
    );
    flink.stop();
    wait_gone(&prom, jvm, Duration::from_secs(40));
    wait_gone(
        &prom,
        "flink_jobmanager_numRunningJobs{cluster=\"e2e\"}",
        Duration::from_secs(40),
    );
    let accepted = agg
        .metric_value(
            "picket_receiver_requests_total{outcome=\"accepted\",receiver=\"pushgateway\"}",
        )
        .unwrap_or(0.0);
    assert!(accepted >= 4.0, "pushes accepted: {accepted}");
}

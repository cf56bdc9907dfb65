//! The agent as an operator runs it: `once`, `check-config`, SIGHUP, SIGTERM, failover
//! between aggregators, and the bounded buffer during an outage.

use std::process::Command;
use std::time::Duration;

use picket_tests::*;

#[test]
fn once_prints_prometheus_text_with_the_agent_labels() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "instance = \"pi-once\"\n[labels]\nrack = \"r7\"\n").unwrap();
    let out = run_ok(
        Command::new(bin("picket-agent"))
            .arg("--config")
            .arg(&config)
            .arg("once"),
    );
    assert!(
        out.contains("# TYPE node_memory_MemTotal_bytes gauge"),
        "{out}"
    );
    let mem = metric_value(
        &out,
        "node_memory_MemTotal_bytes{instance=\"pi-once\",rack=\"r7\"}",
    )
    .unwrap_or_else(|| panic!("no memory line:\n{out}"));
    assert!(mem > 0.0);
    // The embedded host plugin runs by default, with node_exporter's CPU counters.
    assert!(
        out.contains(
            "node_cpu_seconds_total{cpu=\"0\",instance=\"pi-once\",mode=\"idle\",rack=\"r7\"}"
        ),
        "{out}"
    );
    // Every sample line parses as name{labels} value.
    for line in out.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&value),
            "bad line: {line}"
        );
    }
}

#[test]
fn check_config_reports_file_line_key_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "picket-agent",
            "interval = \"10s\"\n\n[aggregator]\nendpoint = [\"https://x:7400\"]\n",
            &[
                ":4:1:",
                "aggregator.endpoint",
                "unknown field `endpoint`",
                "expected one of",
                "`endpoints`",
            ],
        ),
        (
            "picket-agent",
            "[aggregator]\nendpoints = [\"http://x:7400\"]\n",
            &[":2:", "aggregator.endpoints.0", "https://", "insecure"],
        ),
        (
            "picket-agent",
            "[aggregator.tls]\nca = \"/nonexistent/ca.pem\"\n",
            &[":2:1:", "aggregator.tls.ca", "/nonexistent/ca.pem"],
        ),
        (
            "picket-aggregator",
            "[grpc]\nlisten = \"7400\"\n",
            &[":2:", "grpc.listen", "socket address"],
        ),
        (
            "picket-aggregator",
            "[tls]\ncert = \"/nonexistent/s.pem\"\n",
            &[":2:1:", "tls.cert", "certs init"],
        ),
        (
            "picket-aggregator",
            "[tls]\ninsecure = true\n[[sinks]]\ntype = \"file\"\npath = \"/nonexistent/dir/j.jsonl\"\n",
            &[":5:1:", "sinks.0.path", "does not exist"],
        ),
    ];
    for (i, (binary, text, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin(binary))
            .arg("--config")
            .arg(&path)
            .arg("check-config")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{binary} accepted case {i}:\n{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&path.display().to_string()),
            "case {i}: no file name in\n{stderr}"
        );
        for e in *expected {
            assert!(stderr.contains(e), "case {i}: {e:?} missing from\n{stderr}");
        }
    }
    // A valid file passes.
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[aggregator.tls]\ninsecure = true\n[aggregator]\nendpoints = [\"http://127.0.0.1:7400\"]\n").unwrap();
    let out = run_ok(
        Command::new(bin("picket-agent"))
            .arg("--config")
            .arg(&good)
            .arg("check-config"),
    );
    assert!(out.contains("configuration is valid"));
}

#[test]
fn sighup_reloads_labels_and_sigterm_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal.jsonl");
    let agg = Aggregator::start_plaintext(dir.path(), Some(journal.clone()));
    let text = agent_config(
        "pi-hup",
        &[http(agg.grpc)],
        None,
        None,
        "[labels]\nsite = \"a\"",
    );
    let (mut agent, config) = start_agent(dir.path(), "hup", &text);
    wait_for("site=a", Duration::from_secs(20), || {
        agg.metrics().contains("site=\"a\"").then_some(())
    });

    std::fs::write(&config, text.replace("site = \"a\"", "site = \"b\"")).unwrap();
    agent.signal("HUP");
    wait_for("site=b after SIGHUP", Duration::from_secs(20), || {
        agg.metrics().contains("site=\"b\"").then_some(())
    });

    // An invalid config on SIGHUP is refused and the agent keeps running on the old one.
    std::fs::write(&config, "interval = \"never\"\n").unwrap();
    agent.signal("HUP");
    wait_for("refusal logged", Duration::from_secs(10), || {
        agent
            .log_text()
            .contains("keeping the running config")
            .then_some(())
    });
    assert!(agent.is_running());
    wait_for("a few rounds journaled", Duration::from_secs(20), || {
        (journal::read(&journal)
            .series("picket_agent_collections_total", "pi-hup")
            .len()
            >= 4)
            .then_some(())
    });

    let status = agent.terminate(Duration::from_secs(20));
    assert!(status.success(), "agent exit: {status:?}");
    assert!(
        agent.log_text().contains("all pending batches delivered"),
        "{}",
        agent.log_text()
    );
    // Every round up to the last was delivered: the agent's round counter has no gaps.
    let j = journal::read(&journal);
    let rounds: Vec<f64> = j
        .series("picket_agent_collections_total", "pi-hup")
        .iter()
        .filter_map(|p| p.value)
        .collect();
    assert!(rounds.len() >= 3, "{rounds:?}");
    assert!(
        rounds.iter().enumerate().all(|(i, v)| *v == i as f64),
        "rounds missing or repeated: {rounds:?}"
    );
}

#[test]
fn sigterm_during_an_outage_exits_within_the_shutdown_timeout_and_counts_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    // Long backoff: without the drain deadline in its event loop the agent would sleep 30 s.
    let text = agent_config("pi-outage", &[dead], None, None, "")
        .replace("backoff_max = \"1s\"", "backoff_max = \"30s\"")
        .replace("backoff_initial = \"100ms\"", "backoff_initial = \"20s\"")
        .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"1s\"");
    let (mut agent, _) = start_agent(dir.path(), "outage", &text);
    wait_for("a failed connection", Duration::from_secs(20), || {
        agent
            .log_text()
            .contains("cannot connect to aggregator")
            .then_some(())
    });
    let started = std::time::Instant::now();
    let status = agent.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let log = agent.log_text();
    assert!(log.contains("shutdown timeout reached"), "{log}");
}

#[test]
fn fails_over_to_the_next_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_plaintext(dir.path(), None);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let text = agent_config(
        "pi-failover",
        &[dead.clone(), http(agg.grpc)],
        None,
        None,
        "",
    );
    let (agent, _) = start_agent(dir.path(), "failover", &text);
    wait_for(
        "samples at the second endpoint",
        Duration::from_secs(20),
        || {
            agg.metric_value("picket_aggregator_agent_samples_total{agent=\"pi-failover\"}")
                .filter(|v| *v > 0.0)
        },
    );
    let log = agent.log_text();
    assert!(
        log.contains("cannot connect to aggregator") && log.contains(&dead),
        "{log}"
    );
}

#[test]
fn bounded_buffer_drops_oldest_during_an_outage_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal.jsonl");
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    // A buffer of ~24 KiB holds only a few rounds of host metrics. Without a spool (memory
    // only, as `spool.enabled = false` runs) the overflow is dropped; tests/tests/faults.rs
    // covers the spool.
    let text = agent_config("pi-buffer", &[endpoint], None, None, "").replace(
        "[batch]",
        "[buffer]\nmax_bytes = 24000\n[spool]\nenabled = false\n[batch]",
    );
    let (agent, _) = start_agent(dir.path(), "buffer", &text);
    wait_for("buffer overflow", Duration::from_secs(30), || {
        agent
            .log_text()
            .contains("pending buffer full")
            .then_some(())
    });
    // The aggregator comes up on the agent's endpoint.
    let agg_config = dir.path().join("late.toml");
    std::fs::write(&agg_config, format!(
        "[grpc]\nlisten = \"127.0.0.1:{port}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[tls]\ninsecure = true\n[[sinks]]\ntype = \"file\"\npath = \"{}\"\n",
        free_port(), journal.display())).unwrap();
    let mut cmd = Command::new(bin("picket-aggregator"));
    cmd.arg("--config").arg(&agg_config);
    let _agg = Process::spawn(cmd, dir.path().join("late.log"));
    let dropped = wait_for("the agent's drop counter", Duration::from_secs(30), || {
        let j = journal::read(&journal);
        j.points
            .iter()
            .rev()
            .find(|p| {
                p.name == "picket_agent_dropped_samples_total"
                    && p.labels.get("reason").map(String::as_str) == Some("buffer_full")
            })
            .and_then(|p| p.value)
            .filter(|v| *v > 0.0)
    });
    assert!(dropped > 0.0);
    // The oldest rounds were dropped, the newest kept: round numbers arrive without gaps
    // after the first one delivered, and the first delivered is not round 0.
    let j = journal::read(&journal);
    let rounds: Vec<f64> = j
        .series("picket_agent_collections_total", "pi-buffer")
        .iter()
        .filter_map(|p| p.value)
        .collect();
    assert!(
        rounds[0] > 0.0,
        "oldest round should have been dropped: {rounds:?}"
    );
    assert!(
        rounds.windows(2).all(|w| w[1] == w[0] + 1.0),
        "gap after reconnect: {rounds:?}"
    );
    j.assert_each_series_once_in_order();
}

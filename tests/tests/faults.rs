//! The fault-injection suite: agents stream through a real aggregator into a real Prometheus
//! while the aggregator is killed, an agent is killed during an outage, the network between
//! agent and aggregator is cut (network namespaces and a veth pair), and a spool fills up.
//!
//! Every scenario counts the samples the agents collected (from each agent's own log: the
//! "picket-agent stopped" line of a clean exit, or the batches a killed agent had sealed,
//! spooled and had acknowledged), the samples the aggregator accepted (its `file` journal) and
//! the samples Prometheus stored, and asserts that the difference is zero or exactly what a
//! documented drop policy allows. Each scenario appends a row to the report `scripts/test`
//! prints (`<target>/fault-report.txt`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use picket_tests::faults::{AgentLog, FaultRow, accepted, assert_prometheus_has, report};
use picket_tests::servers::{Prometheus, now_ms};
use picket_tests::*;

/// How long an outage lasts where the issue says so: the scenario is defined by it.
const AGGREGATOR_OUTAGE: Duration = Duration::from_secs(30);

struct Rig {
    prom: Prometheus,
    agg: Aggregator,
    journal: std::path::PathBuf,
}

impl Rig {
    fn start(dir: &Path) -> Rig {
        Rig::start_on(dir, None)
    }

    /// Prometheus, and an aggregator journaling everything it accepts and writing it to
    /// Prometheus through a disk-queued remote-write sink.
    fn start_on(dir: &Path, grpc: Option<SocketAddr>) -> Rig {
        let prom = Prometheus::start(&dir.join("prometheus"));
        let journal = dir.join("journal.jsonl");
        let extra = format!(
            "[queues]\ndirectory = \"{}\"\n{}",
            dir.join("queues").display(),
            remote_write_sink_toml("prometheus", &prom.write_url())
        );
        let spec = AggregatorSpec {
            pki: None,
            mutual_tls: false,
            journal: Some(journal.clone()),
            extra,
        };
        let agg = match grpc {
            Some(addr) => Aggregator::start_on(dir, &spec, addr),
            None => Aggregator::start(dir, &spec),
        };
        Rig { prom, agg, journal }
    }

    fn journaled_rounds(&self, instance: &str) -> usize {
        journal::read(&self.journal)
            .series("picket_agent_collections_total", instance)
            .len()
    }

    fn wait_rounds(&self, instance: &str, rounds: usize) {
        wait_for(
            &format!("{rounds} rounds of {instance} journaled"),
            Duration::from_secs(60),
            || (self.journaled_rounds(instance) >= rounds).then_some(()),
        );
    }

    /// Waits until every agent reported, in a round collected after `since_ms`, that nothing
    /// is waiting for an acknowledgement any more; returns how long that took from `from`.
    fn wait_caught_up(&self, instances: &[String], since_ms: i64, from: Instant) -> Duration {
        wait_for(
            "agents caught up (picket_agent_pending_batches 0)",
            Duration::from_secs(120),
            || {
                instances
                    .iter()
                    .all(|i| {
                        self.agg
                            .agent_value_after("picket_agent_pending_batches", i, since_ms)
                            == Some(0.0)
                    })
                    .then_some(())
            },
        );
        from.elapsed()
    }

    /// Waits until the Prometheus sink has sent everything it queued.
    fn wait_drained(&self) {
        let sink = ["sink=\"prometheus\""];
        wait_for("prometheus sink drained", Duration::from_secs(60), || {
            let waiting = self.agg.metric_sum("picket_sink_queue_samples", &sink);
            let queued = self.agg.metric_sum(
                "picket_sink_samples_total",
                &[sink[0], "outcome=\"queued\""],
            );
            (waiting == 0.0 && queued > 0.0).then_some(())
        });
    }
}

fn agent_text(instance: &str, endpoint: &str, extra: &str) -> String {
    agent_config(
        instance,
        &[endpoint.to_owned()],
        None,
        None,
        &format!("[plugins]\ndefaults = false\n{extra}"),
    )
}

/// Totals over agents for one report row.
#[derive(Default)]
struct Totals {
    collected: u64,
    accepted: u64,
    stored: u64,
    duplicated: u64,
}

impl Totals {
    /// Adds a cleanly stopped agent: everything it collected must have been accepted once
    /// and stored.
    fn add_clean(&mut self, rig: &Rig, instance: &str, log: &AgentLog) {
        let collected = log
            .collected_at_exit
            .unwrap_or_else(|| panic!("{instance}: no 'picket-agent stopped' line"));
        let got = accepted(&journal::read(&rig.journal), instance);
        let distinct = got.points - got.duplicates;
        assert_eq!(
            distinct, collected,
            "{instance}: collected {collected} samples, the aggregator accepted {distinct}"
        );
        assert_eq!(got.duplicates, 0, "{instance}: samples accepted twice");
        self.stored += assert_prometheus_has(&rig.prom, instance, &got);
        self.collected += collected;
        self.accepted += distinct;
    }

    fn report(&self, scenario: &str, recovery: Duration, note: &str) {
        report(&FaultRow {
            scenario,
            collected: self.collected,
            accepted: self.accepted,
            stored: self.stored,
            lost: self.collected - self.accepted,
            duplicated: self.duplicated,
            recovery,
            note,
        });
    }
}

#[test]
fn aggregator_killed_for_30_seconds_while_five_agents_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = Rig::start(dir.path());
    let names: Vec<String> = (1..=5).map(|i| format!("pi-kill-{i}")).collect();
    let mut agents = Vec::new();
    for name in &names {
        // 64 KiB of memory holds a fraction of 30 s of batches: the rest must go through the
        // spool (without it, the agents would drop and count them as buffer_full).
        let text = agent_text(name, &http(rig.agg.grpc), "[buffer]\nmax_bytes = 65536\n");
        agents.push(start_agent(dir.path(), name, &text).0);
    }
    for name in &names {
        rig.wait_rounds(name, 3);
    }

    rig.agg.process.kill9();
    // The outage itself is the scenario: the agents keep collecting into their spools.
    std::thread::sleep(AGGREGATOR_OUTAGE);
    let back = Instant::now();
    let back_ms = now_ms();
    rig.agg.start_again(dir.path());
    let recovery = rig.wait_caught_up(&names, back_ms, back);

    for agent in &mut agents {
        assert!(agent.terminate(Duration::from_secs(20)).success());
    }
    rig.wait_drained();
    let mut totals = Totals::default();
    for (name, agent) in names.iter().zip(&agents) {
        let log = AgentLog::read(&agent.log);
        assert!(
            log.spooled_through > 0,
            "{name}: nothing was spooled during a 30 s outage"
        );
        totals.add_clean(&rig, name, &log);
    }
    totals.report("aggregator SIGKILL, down 30 s, 5 agents", recovery, "");
}

#[test]
fn agent_killed_during_an_aggregator_outage_resends_its_spool_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = Rig::start(dir.path());
    let instance = "pi-agent-kill";
    let spool = spool_toml(&dir.path().join("spool"), "flush_interval = \"200ms\"");
    let text = agent_text(instance, &http(rig.agg.grpc), &spool);
    let (mut first, _) = start_agent(dir.path(), "first-run", &text);
    rig.wait_rounds(instance, 3);

    rig.agg.process.kill9();
    // Batches pile up unacknowledged and reach the spool.
    wait_for(
        "batches spooled during the outage",
        Duration::from_secs(30),
        || {
            let log = AgentLog::read(&first.log);
            (log.spooled_through >= log.acked_through + 5).then_some(())
        },
    );
    first.kill9();
    let first_log = AgentLog::read(&first.log);

    // The agent comes back while the aggregator is still down, resumes its spool and keeps
    // collecting; then the aggregator returns.
    let (mut second, _) = start_agent(dir.path(), "second-run", &text);
    wait_for(
        "the restarted agent spools too",
        Duration::from_secs(30),
        || {
            let log = AgentLog::read(&second.log);
            (log.spooled_through > first_log.sealed.keys().max().copied().unwrap_or(0) + 2)
                .then_some(())
        },
    );
    assert!(
        second
            .log_text()
            .contains("spooled batches from a previous run"),
        "the restarted agent did not find its spool:\n{}",
        second.log_text()
    );
    let back = Instant::now();
    let back_ms = now_ms();
    rig.agg.start_again(dir.path());
    let recovery = rig.wait_caught_up(&[instance.to_owned()], back_ms, back);
    assert!(second.terminate(Duration::from_secs(20)).success());
    rig.wait_drained();

    let second_log = AgentLog::read(&second.log);
    let collected_second = second_log
        .collected_at_exit
        .expect("clean exit line of the second run");
    // The killed run's batches that were acknowledged or spooled must all arrive; those
    // sealed after its last spool write are what a SIGKILL may cost (the durability window,
    // docs/configuration.md [spool]).
    let durable_first = first_log.durable_samples();
    let window_loss = first_log.sealed_samples() - durable_first;
    let got = accepted(&journal::read(&rig.journal), instance);
    let distinct = got.points - got.duplicates;
    assert_eq!(
        distinct,
        durable_first + collected_second,
        "accepted samples vs. the first run's durable batches ({durable_first}) plus the second run's collection ({collected_second})"
    );
    assert_eq!(got.duplicates, 0, "samples accepted twice");
    let stored = assert_prometheus_has(&rig.prom, instance, &got);
    report(&FaultRow {
        scenario: "agent SIGKILL during aggregator outage, restarted, aggregator back",
        collected: first_log.sealed_samples() + collected_second,
        accepted: distinct,
        stored,
        lost: window_loss,
        duplicated: got.duplicates,
        recovery,
        note: "lost = sealed after the last spool write before SIGKILL (flush_interval window)",
    });
}

#[test]
fn agent_killed_while_streaming_restarts_without_reusing_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let rig = Rig::start(dir.path());
    let instance = "pi-restart";
    let spool = spool_toml(&dir.path().join("spool"), "flush_interval = \"200ms\"");
    let text = agent_text(instance, &http(rig.agg.grpc), &spool);
    let (mut first, _) = start_agent(dir.path(), "restart-first", &text);
    rig.wait_rounds(instance, 5);
    // Killed while the aggregator acks: it has accepted sequences up to about where the
    // agent was. The restarted agent resumes the session; if it numbered new batches from
    // where its spool ends, the aggregator would take them for resends and discard them.
    first.kill9();
    let restarted = Instant::now();
    let restart_ms = now_ms();
    let (mut second, _) = start_agent(dir.path(), "restart-second", &text);
    let recovery = rig.wait_caught_up(&[instance.to_owned()], restart_ms, restarted);
    let rounds_after = |rig: &Rig| {
        journal::read(&rig.journal)
            .series("picket_agent_collections_total", instance)
            .iter()
            .filter(|p| p.timestamp_ms >= restart_ms)
            .count()
    };
    wait_for(
        "rounds of the restarted agent",
        Duration::from_secs(30),
        || (rounds_after(&rig) >= 5).then_some(()),
    );
    assert!(second.terminate(Duration::from_secs(20)).success());
    rig.wait_drained();

    let second_log = AgentLog::read(&second.log);
    let collected = second_log.collected_at_exit.expect("clean exit line");
    let got = accepted(&journal::read(&rig.journal), instance);
    let after_restart = journal::read(&rig.journal)
        .points
        .iter()
        .filter(|p| {
            p.labels.get("instance").map(String::as_str) == Some(instance)
                && p.timestamp_ms >= restart_ms
        })
        .count() as u64;
    assert_eq!(
        after_restart, collected,
        "every sample the restarted agent collected must be accepted, none taken for a resend"
    );
    assert_eq!(got.duplicates, 0);
    let stored = assert_prometheus_has(&rig.prom, instance, &got);
    let first_log = AgentLog::read(&first.log);
    report(&FaultRow {
        scenario: "agent SIGKILL while streaming, restarted at once",
        collected: first_log.sealed_samples() + collected,
        accepted: got.points - got.duplicates,
        stored,
        lost: (first_log.sealed_samples() + collected).saturating_sub(got.points - got.duplicates),
        duplicated: got.duplicates,
        recovery,
        note: "lost = sealed by the killed run after its last ack or spool write",
    });
}

#[test]
fn a_full_spool_drops_the_oldest_batches_and_counts_exactly_those() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = Rig::start(dir.path());
    let instance = "pi-spool-full";
    // The host plugin makes batches of tens of kilobytes, so a 1 MiB spool fills in seconds;
    // a small memory buffer sends everything older than a few batches to disk.
    let spool = spool_toml(
        &dir.path().join("spool"),
        "max_bytes = 1048576\nflush_interval = \"200ms\"",
    );
    let text = agent_config(
        instance,
        &[http(rig.agg.grpc)],
        None,
        None,
        &format!("{spool}\n[buffer]\nmax_bytes = 65536\n"),
    );
    let (mut agent, _) = start_agent(dir.path(), instance, &text);
    rig.wait_rounds(instance, 3);

    rig.agg.process.kill9();
    wait_for(
        "the spool overflowing twice",
        Duration::from_secs(120),
        || (agent.log_text().matches("spool full").count() >= 2).then_some(()),
    );
    let back = Instant::now();
    let back_ms = now_ms();
    rig.agg.start_again(dir.path());
    let recovery = rig.wait_caught_up(&[instance.to_owned()], back_ms, back);
    assert!(agent.terminate(Duration::from_secs(20)).success());
    rig.wait_drained();

    let log = AgentLog::read(&agent.log);
    let collected = log.collected_at_exit.expect("clean exit line");
    let dropped = log.spool_dropped_at_exit.expect("clean exit line");
    assert!(dropped > 0, "the spool never dropped anything");
    assert!(
        agent.log_text().contains("dropped_buffer_full=0"),
        "memory overflow must go to the spool, not be dropped"
    );
    let got = accepted(&journal::read(&rig.journal), instance);
    let distinct = got.points - got.duplicates;
    assert_eq!(
        distinct,
        collected - dropped,
        "accepted = collected ({collected}) - counted spool drops ({dropped})"
    );
    assert_eq!(got.duplicates, 0);
    // The agent's own counter, delivered through the pipeline, says the same.
    let reported = rig
        .agg
        .agent_value_after(
            "picket_agent_spool_dropped_samples_total",
            instance,
            back_ms,
        )
        .expect("the agent's spool drop counter after recovery");
    assert_eq!(reported as u64, dropped);
    let stored = assert_prometheus_has(&rig.prom, instance, &got);
    report(&FaultRow {
        scenario: "spool full (1 MiB) during an outage",
        collected,
        accepted: distinct,
        stored,
        lost: collected - distinct,
        duplicated: got.duplicates,
        recovery,
        note: "lost = picket_agent_spool_dropped_samples_total exactly",
    });
}

/// A network namespace with a veth pair to the host, removed on drop.
struct NetnsLink {
    namespace: String,
    host_side: String,
    host_ip: String,
}

impl NetnsLink {
    fn create() -> NetnsLink {
        let id = std::process::id() % 60_000;
        let namespace = format!("picket-cut-{id}");
        let host_side = format!("pkh{id}");
        let ns_side = format!("pkn{id}");
        // A /30 of 10.213.0.0/16 per test process.
        let base = (id % 16_000) * 4;
        let (a, b) = (base / 256, base % 256);
        let host_ip = format!("10.213.{a}.{}", b + 1);
        let ns_ip = format!("10.213.{a}.{}", b + 2);
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
                panic!("`ip` is needed for the network-cut test (apt-get install iproute2): {e}")
            });
            assert!(
                out.status.success(),
                "ip {args:?}: {} (the network-cut test needs root for network namespaces)",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let link = NetnsLink {
            namespace: namespace.clone(),
            host_side: host_side.clone(),
            host_ip: host_ip.clone(),
        };
        ip(&["netns", "add", &namespace]);
        ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", &ns_side,
        ]);
        ip(&["link", "set", &ns_side, "netns", &namespace]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_side]);
        ip(&["link", "set", &host_side, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", namespace.as_str(), "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_ns(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_side]);
        in_ns(&["link", "set", &ns_side, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        link
    }

    fn set_host_side(&self, state: &str) {
        run_ok(Command::new("ip").args(["link", "set", &self.host_side, state]));
    }
}

impl Drop for NetnsLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_side])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .output();
    }
}

#[test]
fn a_network_cut_is_detected_by_keepalives_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let link = NetnsLink::create();
    let grpc: SocketAddr = format!("{}:{}", link.host_ip, free_port()).parse().unwrap();
    let rig = Rig::start_on(dir.path(), Some(grpc));
    let instance = "pi-netns";
    let spool = spool_toml(&dir.path().join("spool"), "flush_interval = \"200ms\"");
    let text = agent_text(instance, &http(grpc), &spool).replace(
        "[aggregator]\n",
        "[aggregator]\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"1s\"\nack_timeout = \"30s\"\n",
    );
    let config = dir.path().join("agent-netns.toml");
    std::fs::write(&config, &text).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &link.namespace])
        .arg(bin("picket-agent"))
        .arg("--config")
        .arg(&config);
    let mut agent = Process::spawn(cmd, dir.path().join("agent-netns.log"));
    rig.wait_rounds(instance, 3);

    // Cut the cable on the aggregator's side: no RST, no FIN, the agent's connection is
    // half-open and only keepalives can tell.
    let lost_before = agent
        .log_text()
        .matches("connection to aggregator lost")
        .count();
    let cut = Instant::now();
    link.set_host_side("down");
    let detected = wait_for(
        "the agent noticing the cut",
        Duration::from_secs(20),
        || {
            (agent
                .log_text()
                .matches("connection to aggregator lost")
                .count()
                > lost_before)
                .then(|| cut.elapsed())
        },
    );
    let sealed_at_detection = AgentLog::read(&agent.log).sealed.len();
    wait_for(
        "collection continuing during the cut",
        Duration::from_secs(30),
        || (AgentLog::read(&agent.log).sealed.len() >= sealed_at_detection + 5).then_some(()),
    );
    let restored = Instant::now();
    let restored_ms = now_ms();
    link.set_host_side("up");
    let recovery = rig.wait_caught_up(&[instance.to_owned()], restored_ms, restored);
    assert!(agent.terminate(Duration::from_secs(20)).success());
    rig.wait_drained();

    let mut totals = Totals::default();
    totals.add_clean(&rig, instance, &AgentLog::read(&agent.log));
    assert!(
        detected < Duration::from_secs(10),
        "keepalives (1 s + 1 s) took {detected:?} to notice a half-open connection"
    );
    let note = format!(
        "half-open connection detected after {:.1} s",
        detected.as_secs_f64()
    );
    totals.report("network cut (netns veth down), restored", recovery, &note);
}

//! Nothing lost, nothing doubled: the aggregator is killed (SIGKILL) while agents stream and
//! restarted; every sample collected arrives exactly once, in order per series.

use std::time::Duration;

use picket_tests::*;

#[test]
fn aggregator_killed_mid_stream_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let journal = dir.path().join("journal.jsonl");
    let mut agg = Aggregator::start_tls(dir.path(), &pki, true, Some(journal.clone()));
    let names = ["pi-a", "pi-b"];
    let mut agents = Vec::new();
    for name in names {
        let cert = pki.issue_agent(name);
        let text = agent_config(name, &[https(agg.grpc)], Some(&pki), Some(&cert), "");
        agents.push(start_agent(dir.path(), name, &text).0);
    }
    let rounds_of = |name: &str| -> usize {
        journal::read(&journal)
            .series("picket_agent_collections_total", name)
            .len()
    };
    for name in names {
        wait_for("first rounds", Duration::from_secs(20), || {
            (rounds_of(name) >= 3).then_some(())
        });
    }

    // Kill the aggregator twice while the agents keep collecting.
    let count = |agent: &Process, what: &str| agent.log_text().matches(what).count();
    for outage in 1..=2 {
        if outage == 1 {
            // Freeze the aggregator until every agent has batches on the wire that cannot be
            // acknowledged, then kill it: those batches exist only in the agents' memory.
            agg.process.signal("STOP");
            for agent in &agents {
                let sent = count(agent, "batch sent");
                wait_for(
                    "unacknowledged batches in flight",
                    Duration::from_secs(20),
                    || (count(agent, "batch sent") >= sent + 3).then_some(()),
                );
            }
        }
        agg.process.kill9();
        let before: Vec<usize> = names.iter().map(|n| rounds_of(n)).collect();
        // The agents notice, keep collecting, and fail to reconnect for a while.
        for agent in &agents {
            wait_for("agent noticed the outage", Duration::from_secs(40), || {
                (count(agent, "connection to aggregator lost") >= outage).then_some(())
            });
            wait_for("agent retrying", Duration::from_secs(20), || {
                (count(agent, "cannot connect to aggregator") >= outage).then_some(())
            });
        }
        agg.kill9_and_restart(dir.path());
        for (name, b) in names.iter().zip(before) {
            wait_for("rounds after restart", Duration::from_secs(30), || {
                (rounds_of(name) >= b + 3).then_some(())
            });
        }
    }
    for agent in &mut agents {
        assert!(agent.terminate(Duration::from_secs(30)).success());
    }

    let j = journal::read(&journal);
    j.assert_each_series_once_in_order();
    for name in names {
        let rounds: Vec<f64> = j
            .series("picket_agent_collections_total", name)
            .iter()
            .filter_map(|p| p.value)
            .collect();
        assert!(rounds.len() >= 9, "{name}: {rounds:?}");
        assert!(
            rounds.iter().enumerate().all(|(i, v)| *v == i as f64),
            "{name}: rounds lost or doubled: {rounds:?}"
        );
        // Each batch committed once per session.
        let mut seqs: Vec<u64> = j
            .commits
            .iter()
            .filter(|c| c.0 == name)
            .map(|c| c.2)
            .collect();
        let n = seqs.len();
        seqs.dedup();
        assert_eq!(seqs.len(), n, "{name}: a batch was committed twice");
    }
}

//! The plugin manager keeps running instances in step with the config and the plugin files:
//! an added `.wasm` file starts its instance and a replaced one is reloaded without
//! restarting the agent, a broken replacement
//! leaves the working code running, a config reload (SIGHUP) restarts an instance with its
//! new settings, and a removed instance's series go stale.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use picket_agent::config::AgentConfig;
use picket_agent::plugins::manager::PluginManager;
use picket_agent::plugins::runtime::Runtime;
use picket_agent::stats::AgentStats;
use picket_core::model::{Family, Value};
use tokio::sync::{mpsc, watch};

fn wasm(name: &str) -> PathBuf {
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .expect("target dir");
    let path = target.join(format!("wasm32-wasip2/release/{name}.wasm"));
    assert!(
        path.is_file(),
        "{}: build it with `cargo build -p {} --target wasm32-wasip2 --release` (scripts/test does)",
        path.display(),
        name.replace('_', "-")
    );
    path
}

fn config(dir: &Path, settings: &str) -> Arc<AgentConfig> {
    let text = format!(
        r#"[plugins]
defaults = false
directory = "{}"
watch_interval = "100ms"
[[plugins.instances]]
name = "watched"
plugin = "custom"
interval = "100ms"
settings = {settings}
grants = {{ read_file = ["{watched}"] }}
"#,
        dir.display(),
        watched = dir.join("watched.txt").display()
    );
    Arc::new(picket_core::config::parse("agent.toml", &text).expect("valid config"))
}

/// Replaces `custom.wasm` the way operators do: write elsewhere, rename over.
fn install(dir: &Path, from: &Path) {
    let tmp = dir.join("custom.wasm.tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("custom.wasm")).unwrap();
}

/// Waits (bounded) for a round that contains a family named `name`.
async fn round_with(rounds: &mut mpsc::Receiver<Vec<Family>>, name: &str) -> Vec<Family> {
    let wait = async {
        loop {
            let round = rounds.recv().await.expect("the manager is running");
            if round.iter().any(|f| f.name == name) {
                return round;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .unwrap_or_else(|_| panic!("no round with {name} within 60 s"))
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_follow_their_files_and_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(AgentStats::default());
    let (rounds_tx, mut rounds) = mpsc::channel(64);
    let (config_tx, config_rx) = watch::channel(config(dir.path(), r#"{ mode = "ok" }"#));
    let (stop_tx, stop_rx) = watch::channel(false);
    let manager = PluginManager::new(Runtime::new(), stats.clone(), rounds_tx);
    let task = tokio::spawn(manager.run(config_rx, stop_rx));

    // The file is not there yet: the instance waits (one error, not one per check) and
    // starts as soon as the file is added.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while compile_errors(&stats) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing file never reported"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), rounds.recv()).await;
    }
    install(dir.path(), &wasm("picket_plugin_probe"));
    round_with(&mut rounds, "probe_up").await;
    assert_eq!(
        compile_errors(&stats),
        1,
        "the missing file was reported once"
    );

    // A replaced file is picked up without a restart: the template reports its own metric,
    // and the probe's series are marked stale because the new code no longer reports them.
    let watched = dir.path().join("watched.txt");
    std::fs::write(&watched, "hello").unwrap();
    let template_settings = format!(r#"{{ path = "{}" }}"#, watched.display());
    config_tx.send_modify(|c| *c = config(dir.path(), &template_settings));
    round_with(&mut rounds, "probe_up").await;
    install(dir.path(), &wasm("picket_plugin_template"));
    let round = round_with(&mut rounds, "template_file_bytes").await;
    let stale_probe = round
        .iter()
        .any(|f| f.name == "probe_up" && f.points.iter().all(|p| p.value == Value::Stale));
    // The stale marker may come in this round or the next one; look at a few.
    let mut saw_stale = stale_probe;
    for _ in 0..5 {
        if saw_stale {
            break;
        }
        let next = tokio::time::timeout(Duration::from_secs(10), rounds.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        saw_stale = next
            .iter()
            .any(|f| f.name == "probe_up" && f.points.iter().all(|p| p.value == Value::Stale));
    }
    assert!(
        saw_stale,
        "the old code's series went stale after the reload"
    );

    // A broken replacement is refused and the working code keeps collecting: rounds stamped
    // after the refusal still come from the template, and the instance was not restarted.
    std::fs::write(dir.path().join("custom.wasm.tmp"), b"\0asm not really").unwrap();
    std::fs::rename(
        dir.path().join("custom.wasm.tmp"),
        dir.path().join("custom.wasm"),
    )
    .unwrap();
    let errors_before = compile_errors(&stats);
    let restarts_before = restarts(&stats);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while compile_errors(&stats) == errors_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broken file was never noticed"
        );
        // Keep draining so the instance is not blocked on a full channel.
        let _ = tokio::time::timeout(Duration::from_millis(200), rounds.recv()).await;
    }
    let refused_at = picket_core::model::now_ms();
    let mut fresh = false;
    for _ in 0..20 {
        let round = round_with(&mut rounds, "template_file_bytes").await;
        fresh = round
            .iter()
            .filter(|f| f.name == "template_file_bytes")
            .flat_map(|f| &f.points)
            .any(|p| p.timestamp_ms > refused_at);
        if fresh {
            break;
        }
    }
    assert!(fresh, "no fresh round from the old code after the refusal");
    assert_eq!(
        restarts(&stats),
        restarts_before,
        "the running instance was disturbed"
    );

    // SIGHUP with new settings restarts the instance with them.
    install(dir.path(), &wasm("picket_plugin_probe"));
    round_with(&mut rounds, "probe_up").await;
    config_tx.send_modify(|c| {
        *c = config(
            dir.path(),
            r#"{ mode = "http", url = "http://127.0.0.1:9/" }"#,
        )
    });
    // In http mode without a grant the probe fails its collection: the new settings took.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let denied = stats
            .plugins
            .lock()
            .unwrap()
            .iter()
            .any(|(_, _, s)| s.errors().get("denied").copied().unwrap_or(0) > 0);
        if denied {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new settings never applied"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), rounds.recv()).await;
    }

    // Removing the instance stops it and marks its series stale.
    config_tx.send_modify(|c| {
        let mut next = (**c).clone();
        next.plugins.instances.clear();
        *c = Arc::new(next);
    });
    let stale = round_with(&mut rounds, "probe_up").await;
    let probe_up = stale.iter().find(|f| f.name == "probe_up").unwrap();
    assert!(
        probe_up.points.iter().all(|p| p.value == Value::Stale),
        "a removed instance's last series are marked stale: {probe_up:?}"
    );
    assert!(
        stats.plugins.lock().unwrap().is_empty(),
        "health series ended"
    );

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the manager stops")
        .unwrap();
}

/// Once the started instances have collected, the manager drops the pages of the binary that
/// start-up mapped (`image_pages`); the instances collect on, running code that maps back in.
#[tokio::test(flavor = "multi_thread")]
async fn pages_start_up_mapped_are_given_back_and_collection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), &wasm("picket_plugin_probe"));
    let stats = Arc::new(AgentStats::default());
    let (rounds_tx, mut rounds) = mpsc::channel(64);
    let (_config_tx, config_rx) = watch::channel(config(dir.path(), r#"{ mode = "ok" }"#));
    let (stop_tx, stop_rx) = watch::channel(false);
    let manager = PluginManager::new(Runtime::new(), stats.clone(), rounds_tx);
    let task = tokio::spawn(manager.run(config_rx, stop_rx));

    round_with(&mut rounds, "probe_up").await;
    let released = || AgentStats::get(&stats.released_image_bytes);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while released() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pages given back within 30 s of the first round"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), rounds.recv()).await;
    }
    for _ in 0..3 {
        round_with(&mut rounds, "probe_up").await;
    }

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the manager stops")
        .unwrap();
}

fn restarts(stats: &AgentStats) -> u64 {
    stats
        .plugins
        .lock()
        .unwrap()
        .iter()
        .map(|(_, _, s)| picket_agent::plugin_stats::PluginStats::get(&s.restarts))
        .sum()
}

fn compile_errors(stats: &AgentStats) -> u64 {
    stats
        .plugins
        .lock()
        .unwrap()
        .iter()
        .map(|(_, _, s)| s.errors().get("compile").copied().unwrap_or(0))
        .sum()
}

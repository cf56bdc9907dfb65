//! Plugins inside a real agent process: a misbehaving instance is torn down and restarted
//! while a well-behaved one keeps collecting; the failures show up in the agent's own metrics
//! at the aggregator; and the broken instance comes back once it behaves.
//!
//! Needs the probe plugin built for wasm32-wasip2 (`scripts/test` does it).

use std::time::Duration;

use picket_tests::*;

#[test]
fn a_bad_plugin_is_contained_reported_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal.jsonl");
    let agg = Aggregator::start_plaintext(dir.path(), Some(journal.clone()));
    let marker = dir.path().join("misbehave");
    std::fs::write(&marker, "1").unwrap();
    let plugins = format!(
        r#"
[plugins]
directory = "{probes}"

[[plugins.instances]]
name = "good"
plugin = "picket_plugin_probe"
interval = "200ms"
settings = {{ mode = "ok" }}

[[plugins.instances]]
name = "spinner"
plugin = "picket_plugin_probe"
interval = "200ms"
timeout = "100ms"
settings = {{ mode = "loop" }}

[[plugins.instances]]
name = "flaky"
plugin = "picket_plugin_probe"
interval = "200ms"
settings = {{ mode = "trap-while-file", path = "{marker}" }}
grants = {{ read_file = ["{marker}"] }}
"#,
        probes = plugin_dir().display(),
        marker = marker.display()
    );
    let text = agent_config("pi-plugins", &[http(agg.grpc)], None, None, "")
        .replace("[batch]", &format!("{plugins}\n[batch]"));
    let (mut agent, config) = start_agent(dir.path(), "plugins", &text);
    let run = std::process::Command::new(bin("picket-agent"))
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let errors = |instance: &str, kind: &str| {
        agg.metric_value(&format!(
            "picket_plugin_errors_total{{instance=\"pi-plugins\",kind=\"{kind}\",plugin=\"picket_plugin_probe\",plugin_instance=\"{instance}\"}}"
        ))
    };
    // The spinner times out again and again; the flaky one traps; the good one collects.
    wait_for("the spinner's timeouts", Duration::from_secs(30), || {
        errors("spinner", "timeout").filter(|n| *n >= 2.0)
    });
    wait_for("the flaky plugin's traps", Duration::from_secs(30), || {
        errors("flaky", "trap").filter(|n| *n >= 1.0)
    });
    let good_rounds =
        |j: &journal::Journal| j.series("probe_collections_total", "pi-plugins").len();
    let before = good_rounds(&journal::read(&journal));
    wait_for(
        "the good plugin to keep collecting",
        Duration::from_secs(30),
        || (good_rounds(&journal::read(&journal)) >= before + 5).then_some(()),
    );
    assert_eq!(
        agg.metric_value("picket_plugin_up{instance=\"pi-plugins\",plugin=\"picket_plugin_probe\",plugin_instance=\"good\"}"),
        Some(1.0)
    );
    assert!(agent.is_running());

    // Once the flaky plugin behaves, it is restarted (with backoff) and reports up.
    std::fs::remove_file(&marker).unwrap();
    wait_for(
        "the flaky plugin to come back",
        Duration::from_secs(30),
        || {
            agg.metric_value("picket_plugin_up{instance=\"pi-plugins\",plugin=\"picket_plugin_probe\",plugin_instance=\"flaky\"}")
            .filter(|v| *v == 1.0)
        },
    );
    assert!(agent.terminate(Duration::from_secs(20)).success());
    journal::read(&journal).assert_each_series_once_in_order();
}

#[test]
fn once_runs_plugin_instances_and_names_missing_grants() {
    let dir = tempfile::tempdir().unwrap();
    let watched = dir.path().join("watched");
    std::fs::write(&watched, "12345").unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"instance = "pi-once"
[plugins]
defaults = false
directory = "{probes}"
[[plugins.instances]]
name = "granted"
plugin = "picket_plugin_template"
settings = {{ path = "{watched}" }}
grants = {{ read_file = ["{watched}"] }}
[[plugins.instances]]
name = "ungranted"
plugin = "picket_plugin_template"
settings = {{ path = "/etc/shadow" }}
"#,
            probes = plugin_dir().display(),
            watched = watched.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin("picket-agent"))
        .arg("--config")
        .arg(&config)
        .arg("once")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = format!(
        "template_file_bytes{{instance=\"pi-once\",path=\"{}\"}}",
        watched.display()
    );
    assert_eq!(metric_value(&stdout, &line), Some(5.0), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ungranted")
            && stderr.contains(
                "denied: read-file /etc/shadow is not granted (add read_file = [\"/etc/shadow\"])"
            ),
        "{stderr}"
    );
}

/// `plugins describe` asks each plugin (embedded and in the directory) what it is and wants.
#[test]
fn plugins_describe_lists_embedded_and_directory_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("[plugins]\ndirectory = \"{}\"\n", plugin_dir().display()),
    )
    .unwrap();
    let out = run_ok(
        std::process::Command::new(bin("picket-agent"))
            .arg("--config")
            .arg(&config)
            .args(["plugins", "describe"]),
    );
    for (plugin, wants) in [
        ("host", "host-stats, log"),
        ("rpi", "exec, read-file, log"),
        ("prometheus", "http, log"),
        ("flink", "http, log"),
        ("picket_plugin_template", "read-file, log"),
    ] {
        let section = out
            .split("\n\n")
            .find(|s| s.starts_with(&format!("{plugin}\n")))
            .unwrap_or_else(|| panic!("{plugin} not described:\n{out}"));
        assert!(section.contains(&format!("wants: {wants}")), "{section}");
        assert!(section.contains("sha256: "), "{section}");
    }
}

/// An instance not granted what its plugin says it needs gets a warning naming the grant.
#[test]
fn missing_grants_are_named_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_plaintext(dir.path(), None);
    let plugins = "[plugins]\ndefaults = false\n[[plugins.instances]]\nname = \"flink-prod\"\nplugin = \"flink\"\n";
    let text = agent_config("pi-grants", &[http(agg.grpc)], None, None, "")
        .replace("[batch]", &format!("{plugins}\n[batch]"));
    let (mut agent, _) = start_agent(dir.path(), "grants", &text);
    wait_for("the missing-grant warning", Duration::from_secs(60), || {
        let log = agent.log_text();
        (log.contains("flink/flink-prod")
            && log.contains("wants the `http` capability")
            && log.contains("http = { allow = "))
        .then_some(())
    });
    assert!(agent.terminate(Duration::from_secs(20)).success());
}

/// With `plugins.cache_directory` the running agent keeps what it compiled and reuses it on
/// the next start; an entry that was tampered with is thrown away (and said so) and rebuilt
/// rather than loaded.
#[test]
fn the_compile_cache_is_reused_and_tampering_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_plaintext(dir.path(), None);
    let cache = dir.path().join("cache");
    let plugins = format!(
        "[plugins]\ndefaults = false\ncache_directory = \"{}\"\n\
         [[plugins.instances]]\nname = \"host\"\nplugin = \"host\"\ngrants = {{ host_stats = true }}\n",
        cache.display()
    );
    // One agent run under its own name (so the aggregator's view of an earlier run cannot
    // satisfy the wait): until its host metrics arrive, then SIGTERM.
    let run = |round: &str| -> String {
        let name = format!("pi-cache-{round}");
        let text = agent_config(&name, &[http(agg.grpc)], None, None, "")
            .replace("[batch]", &format!("{plugins}\n[batch]"));
        let (mut agent, _) = start_agent(dir.path(), &name, &text);
        let series = format!("node_memory_MemTotal_bytes{{instance=\"{name}\"}}");
        wait_for("host metrics", Duration::from_secs(60), || {
            agg.metrics().contains(&series).then_some(())
        });
        assert!(agent.terminate(Duration::from_secs(20)).success());
        agent.log_text()
    };
    let entries = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect()
    };

    // The agent compiles in a child process of itself, not in its own (plugins/compiler.rs).
    let log = run("cold");
    assert!(
        log.contains("plugin compiled") && log.contains("child-process"),
        "the cold start did not compile in a child process:\n{log}"
    );
    let cached = entries();
    assert_eq!(cached.len(), 1, "one entry for the one instance");
    let entry = cached[0].clone();
    let written = std::fs::read(&entry).unwrap();
    let modified = std::fs::metadata(&entry).unwrap().modified().unwrap();

    // Warm start: the entry is used as it is, not rewritten.
    let log = run("warm");
    assert!(!log.contains("did not write"), "{log}");
    assert!(
        !log.contains("plugin compiled"),
        "the warm start compiled:\n{log}"
    );
    assert_eq!(std::fs::read(&entry).unwrap(), written);
    assert_eq!(
        std::fs::metadata(&entry).unwrap().modified().unwrap(),
        modified
    );

    // One byte flipped in the middle of the compiled code: the tag no longer verifies.
    let mut tampered = written.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0xff;
    std::fs::write(&entry, &tampered).unwrap();
    let log = run("tampered");
    assert!(
        log.contains("did not write"),
        "the forged entry was not refused:\n{log}"
    );
    assert_eq!(
        std::fs::read(&entry).unwrap(),
        written,
        "the entry was rebuilt from the plugin"
    );
    let key = std::fs::metadata(cache.join("key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
}

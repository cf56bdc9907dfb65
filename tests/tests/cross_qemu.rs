//! The cross-built Raspberry Pi agents (aarch64 and armv7) run under qemu-user and stream to
//! an x86_64 aggregator over mutual TLS: metrics collected on the emulated CPU arrive, from
//! every first-party plugin (on armv7 through Pulley): host, rpi (a fake `vcgencmd`),
//! prometheus (scraping the aggregator's own /metrics) and flink (recorded REST answers).
//!
//! Needs `cross/build.sh` to have produced `dist/picket-agent-<target>` (or set
//! PICKET_CROSS_DIR) and Debian's qemu-user with the cross C libraries; `scripts/test`
//! installs and builds all of it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use picket_tests::*;

struct Arch {
    target: &'static str,
    qemu: &'static str,
    sysroot: &'static str,
    /// `std::env::consts::ARCH` as compiled into that binary.
    rust_arch: &'static str,
}

const ARCHES: [Arch; 2] = [
    Arch {
        target: "aarch64-unknown-linux-gnu",
        qemu: "qemu-aarch64",
        sysroot: "/usr/aarch64-linux-gnu",
        rust_arch: "aarch64",
    },
    Arch {
        target: "armv7-unknown-linux-gnueabihf",
        qemu: "qemu-arm",
        sysroot: "/usr/arm-linux-gnueabihf",
        rust_arch: "arm",
    },
];

fn cross_binary(arch: &Arch) -> PathBuf {
    let dir = std::env::var("PICKET_CROSS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist"));
    let path = dir.join(format!("picket-agent-{}", arch.target));
    assert!(
        path.exists(),
        "{} missing: run `cross/build.sh --install` first (scripts/test does)",
        path.display()
    );
    assert!(
        Command::new(arch.qemu)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "{} not found: apt-get install qemu-user",
        arch.qemu
    );
    assert!(
        std::path::Path::new(arch.sysroot).join("lib").exists(),
        "{} missing: apt-get install libc6-dev-arm64-cross libc6-dev-armhf-cross",
        arch.sysroot
    );
    path
}

fn emulated(arch: &Arch) -> Command {
    let mut cmd = Command::new(arch.qemu);
    cmd.arg("-L").arg(arch.sysroot).arg(cross_binary(arch));
    cmd
}

#[test]
fn emulated_pi_agents_stream_to_an_x86_aggregator() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let agg = Aggregator::start_tls(dir.path(), &pki, true, None);
    let flink = flink_overview_server();
    // The rpi plugin's fake vcgencmd and sysfs tree; canonical, since grants are checked on
    // resolved paths.
    let rpi_dir = copy_rpi_fixtures(dir.path());
    let mut agents = Vec::new();
    for arch in &ARCHES {
        let name = format!("pi-{}", arch.rust_arch);
        let cert = pki.issue_agent(&name);
        // A well-behaved plugin and a spinning one: on armv7 both run on Pulley, whose
        // deadline must still stop the spinner.
        let plugins = format!(
            "[plugins]\ndirectory = \"{}\"\n\
             [[plugins.instances]]\nname = \"probe\"\nplugin = \"picket_plugin_probe\"\ntimeout = \"20s\"\n\
             settings = {{ mode = \"ok\" }}\n\
             [[plugins.instances]]\nname = \"spinner\"\nplugin = \"picket_plugin_probe\"\ntimeout = \"300ms\"\n\
             settings = {{ mode = \"loop\" }}\n{}",
            plugin_dir().display(),
            first_party_instances(&rpi_dir, agg.http, flink.addr)
        );
        let text = agent_config(&name, &[https(agg.grpc)], Some(&pki), Some(&cert), "")
            .replace("interval = \"300ms\"", "interval = \"1s\"")
            .replace("jitter = \"10ms\"", "jitter = \"100ms\"")
            .replace("[batch]", &format!("{plugins}[batch]"));
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, text).unwrap();
        let mut cmd = emulated(arch);
        cmd.arg("--config").arg(&config);
        agents.push(Process::spawn(cmd, dir.path().join(format!("{name}.log"))));
    }
    for arch in &ARCHES {
        let name = format!("pi-{}", arch.rust_arch);
        // build_info carries the architecture compiled into the binary that collected it.
        let build_info = format!(
            "picket_agent_build_info{{arch=\"{}\",instance=\"{name}\"",
            arch.rust_arch
        );
        wait_for(&format!("{name} metrics"), Duration::from_secs(90), || {
            let m = agg.metrics();
            (m.contains(&build_info)
                && m.contains(&format!(
                    "node_memory_MemTotal_bytes{{instance=\"{name}\"}}"
                )))
            .then_some(())
        });
        // The plugin ran on the emulated CPU, and the spinner was stopped by its deadline.
        let probe_up = format!("probe_up{{instance=\"{name}\"}}");
        let spinner_timeouts = format!(
            "picket_plugin_errors_total{{instance=\"{name}\",kind=\"timeout\",plugin=\"picket_plugin_probe\",plugin_instance=\"spinner\"}}"
        );
        wait_for(
            &format!("{name} plugin output"),
            Duration::from_secs(120),
            || {
                let m = agg.metrics();
                (metric_value(&m, &probe_up) == Some(1.0)
                    && metric_value(&m, &spinner_timeouts).is_some_and(|n| n >= 1.0))
                .then_some(())
            },
        );
    }
    for arch in &ARCHES {
        let name = format!("pi-{}", arch.rust_arch);
        let target = agg.http.to_string();
        let expected = [
            // rpi: the fake vcgencmd's answer.
            (
                format!("rpi_soc_temperature_celsius{{instance=\"{name}\",sensor=\"soc\"}}"),
                48.3,
            ),
            // prometheus: the aggregator's own exposition, scraped and parsed.
            (
                format!("picket_scrape_up{{instance=\"{name}\",target=\"{target}\"}}"),
                1.0,
            ),
            // flink: slots from the recorded /overview.
            (format!("flink_task_slots{{instance=\"{name}\"}}"), 2.0),
        ];
        wait_for(
            &format!("{name} first-party plugin output"),
            Duration::from_secs(180),
            || {
                let m = agg.metrics();
                expected
                    .iter()
                    .all(|(series, value)| metric_value(&m, series) == Some(*value))
                    .then_some(())
            },
        );
    }
    // Once their plugins have collected, the agents drop the mapped read-only pages of their
    // binary and libraries (agent/src/image_pages.rs; whether the pagemap check passes under
    // the emulator or not, the agent must carry on).
    for (arch, agent) in ARCHES.iter().zip(agents.iter_mut()) {
        let name = format!("pi-{}", arch.rust_arch);
        wait_for(
            &format!("{name} giving back its start-up pages"),
            Duration::from_secs(120),
            || {
                agent
                    .log_text()
                    .contains(
                        "dropped the mapped read-only pages of the agent's binary and libraries",
                    )
                    .then_some(())
            },
        );
        // The aggregator's count lags the agent by a batch or two: ask for more rounds than
        // that after the message.
        let collections = format!("picket_agent_collections_total{{instance=\"{name}\"}}");
        let before = metric_value(&agg.metrics(), &collections)
            .unwrap_or_else(|| panic!("{name} reported no collections"));
        wait_for(
            &format!("{name} collecting after giving them back"),
            Duration::from_secs(90),
            || {
                metric_value(&agg.metrics(), &collections)
                    .is_some_and(|n| n >= before + 5.0)
                    .then_some(())
            },
        );
        assert!(agent.is_running(), "{}", agent.log_text());
    }
    for agent in &mut agents {
        assert!(
            agent.terminate(Duration::from_secs(60)).success(),
            "{}",
            agent.log_text()
        );
    }
}

/// Instances of the embedded rpi, prometheus and flink plugins for the emulated agents.
fn first_party_instances(
    rpi_dir: &std::path::Path,
    scrape: std::net::SocketAddr,
    flink: std::net::SocketAddr,
) -> String {
    let rpi = fake_rpi_instance(rpi_dir);
    format!(
        "{rpi}[[plugins.instances]]\nname = \"scrape\"\nplugin = \"prometheus\"\ntimeout = \"20s\"\n\
         settings = {{ targets = [\"http://{scrape}/metrics\"] }}\n\
         grants = {{ http = {{ allow = [\"http://{scrape}/metrics\"] }} }}\n\
         [[plugins.instances]]\nname = \"flink\"\nplugin = \"flink\"\ntimeout = \"20s\"\n\
         settings = {{ url = \"http://{flink}\" }}\n\
         grants = {{ http = {{ allow = [\"http://{flink}/\"] }} }}\n"
    )
}

/// Flink's recorded `/overview` and `/jobs/overview`; everything else is a 404, which the
/// flink plugin counts and survives.
fn flink_overview_server() -> fixture_http::Server {
    let fixtures = plugin_fixtures("flink");
    let read = |file: &str| std::fs::read(fixtures.join(file)).expect("flink fixture");
    let (overview, jobs) = (read("overview.json"), read("jobs-overview-cancelled.json"));
    fixture_http::Server::start(move |target| {
        let json = "application/json; charset=UTF-8";
        match target {
            "/overview" => fixture_http::Reply::new(200, json, overview.clone()),
            "/jobs/overview" => fixture_http::Reply::new(200, json, jobs.clone()),
            _ => fixture_http::Reply::new(404, json, r#"{"errors":["Not found"]}"#),
        }
    })
}

#[test]
fn emulated_agents_run_once_and_check_config() {
    for arch in &ARCHES {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("once.toml");
        std::fs::write(&config, "instance = \"emulated\"\n").unwrap();
        let out = run_ok(emulated(arch).arg("--config").arg(&config).arg("once"));
        let build_info = format!("picket_agent_build_info{{arch=\"{}\"", arch.rust_arch);
        assert!(out.contains(&build_info), "{out}");
        let mem = metric_value(&out, "node_memory_MemTotal_bytes{instance=\"emulated\"}");
        assert!(mem.is_some_and(|v| v > 0.0), "{out}");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "intervl = \"1s\"\n").unwrap();
        let out = emulated(arch)
            .arg("--config")
            .arg(&bad)
            .arg("check-config")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `intervl`"));
    }
}

//! The agent's footprint against node_exporter on the same machine: resident memory after the
//! same number of collections (the agent with its host, rpi and flink plugins loaded, both
//! compiling them at start and loading them from a warm compile cache), CPU
//! per collection of host metrics against node_exporter's CPU per scrape, binary sizes,
//! start-up to the first batch, and the cross-built agents' memory under qemu-user.
//!
//! The rpi plugin runs the plugin's fake `vcgencmd` (no Pi here) and the flink plugin reads
//! recorded Flink 2.3 REST answers from a loopback server, so both do their full work.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use picket_tests::{
    Aggregator, Process, bin, copy_rpi_fixtures, fake_rpi_instance, fixture_http, http_get,
    plugin_fixtures,
};

use crate::proc_stats::usage;
use crate::report::{count, median, mib, ratio};
use crate::{Settings, setup};

pub async fn run(s: &mut Settings) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let env = Env::new(dir.path())?;
    tokio::task::block_in_place(|| -> Result<()> {
        // Start-up first: it also fills the compile cache the cached agent below loads from.
        startup(s, &env)?;
        against_node_exporter(s, &env)?;
        binary_sizes(s);
        emulated(s, &env)?;
        Ok(())
    })
}

/// What the agents under test talk to: an aggregator journaling to a file, recorded Flink
/// answers, the rpi plugin's fixtures, and a compile cache directory.
pub(crate) struct Env {
    dir: PathBuf,
    agg: Aggregator,
    ca: PathBuf,
    flink: SocketAddr,
    /// Serves `flink` for as long as the agents run.
    _flink_server: fixture_http::Server,
    rpi_dir: PathBuf,
    journal: PathBuf,
    /// The compile cache (`plugins.cache_directory`) of the agents that use one.
    cache: PathBuf,
}

impl Env {
    pub(crate) fn new(dir: &Path) -> Result<Env> {
        let pki = setup::pki(dir)?;
        let journal = dir.join("journal.jsonl");
        let agg = setup::aggregator(
            dir,
            &pki,
            &format!(
                "[[sinks]]\ntype = \"file\"\npath = \"{}\"\n",
                journal.display()
            ),
        )?;
        let flink_server = flink_rest_server()?;
        let rpi_dir = copy_rpi_fixtures(dir);
        let cache = dir.join("plugin-cache");
        std::fs::create_dir_all(&cache)?;
        set_owner_only(&cache)?;
        Ok(Env {
            dir: dir.to_path_buf(),
            agg,
            ca: pki.ca(),
            flink: flink_server.addr,
            _flink_server: flink_server,
            rpi_dir,
            journal,
            cache,
        })
    }

    pub(crate) fn cache(&self) -> &Path {
        &self.cache
    }

    pub(crate) fn agg(&self) -> &Aggregator {
        &self.agg
    }
}

/// Which plugins an agent under test runs.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Plugins {
    /// The default host instance only.
    Host,
    /// host, rpi (fake vcgencmd) and flink (recorded REST answers).
    All,
}

pub(crate) fn agent_config(
    env: &Env,
    instance: &str,
    interval: Duration,
    plugins: Plugins,
    cache: Option<&Path>,
) -> String {
    let mut text = format!(
        "instance = \"{instance}\"\ninterval = \"{}ms\"\njitter = \"0ms\"\n\
         [batch]\nmax_delay = \"20ms\"\n\
         [aggregator]\nendpoints = [\"https://{}\"]\n[aggregator.tls]\nca = \"{}\"\n\
         [spool]\ndirectory = \"{}\"\n",
        interval.as_millis(),
        env.agg.grpc,
        env.ca.display(),
        env.dir.join(format!("spool-{instance}")).display(),
    );
    if let Some(cache) = cache {
        text += &format!("[plugins]\ncache_directory = \"{}\"\n", cache.display());
    }
    if plugins == Plugins::All {
        text += &fake_rpi_instance(&env.rpi_dir);
        let flink = env.flink;
        text += &format!(
            "[[plugins.instances]]\nname = \"flink\"\nplugin = \"flink\"\ntimeout = \"20s\"\n\
             settings = {{ url = \"http://{flink}\" }}\n\
             grants = {{ http = {{ allow = [\"http://{flink}/\"] }} }}\n"
        );
    }
    text
}

/// Starts `program` (the agent, or qemu running it) with `config`.
pub(crate) fn start_agent(
    env: &Env,
    instance: &str,
    config: &str,
    program: Command,
) -> Result<Process> {
    let path = env.dir.join(format!("agent-{instance}.toml"));
    std::fs::write(&path, config)?;
    let mut cmd = program;
    cmd.arg("--config").arg(&path);
    setup::spawn(cmd, env.dir.join(format!("agent-{instance}.log")))
}

/// The agent's own count of collection rounds, as the aggregator last received it.
fn collections(agg: &Aggregator, instance: &str) -> f64 {
    agg.metric_sum(
        "picket_agent_collections_total",
        &[&format!("instance=\"{instance}\"")],
    )
}

fn samples_per_collection(agg: &Aggregator, instance: &str) -> f64 {
    let label = format!("instance=\"{instance}\"");
    agg.metric_sum("picket_agent_collected_samples_total", &[&label])
        / collections(agg, instance).max(1.0)
}

/// Waits until `instance` has reported at least `n` collections.
pub(crate) fn wait_collections(
    env: &Env,
    instance: &str,
    n: f64,
    process: &mut Process,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while collections(&env.agg, instance) < n {
        if !process.is_running() {
            return Err(anyhow!(
                "agent {instance} exited; its log:\n{}",
                process.log_text()
            ));
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "agent {instance} did not reach {n} collections; log:\n{}",
                process.log_text()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn against_node_exporter(s: &mut Settings, env: &Env) -> Result<()> {
    let (interval, warmup, collections_n) = if s.quick {
        (Duration::from_millis(500), 3u32, 15u32)
    } else {
        (Duration::from_secs(1), 5, 60)
    };
    let mut rows = Vec::new();
    let (mut rss_ratio, mut cached_ratio, mut cpu_ratio) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..s.runs {
        start_cold(&measured_agent().0)?;
        start_cold(&setup::require(
            "prometheus-node-exporter",
            "prometheus-node-exporter",
        )?)?;
        let (mut node, node_addr) = setup::node_exporter(&env.dir)?;
        let start = |instance: &str, plugins: Plugins, cache: Option<&Path>| {
            let config = agent_config(env, instance, interval, plugins, cache);
            start_agent(env, instance, &config, Command::new(measured_agent().0))
        };
        let (full, host, cached) = (
            format!("full-{run}"),
            format!("host-{run}"),
            format!("cached-{run}"),
        );
        let mut agent_full = start(&full, Plugins::All, None)?;
        let mut agent_host = start(&host, Plugins::Host, None)?;
        let mut agent_cached = start(&cached, Plugins::All, Some(&env.cache))?;
        // node_exporter is scraped on the same interval, in step with the agents.
        let mut node_samples = 0usize;
        let mut node_cpu = (0.0, 0.0);
        let mut scrape = |n: u32| -> Result<()> {
            let started = Instant::now();
            let (status, body) = http_get(node_addr, "/metrics")?;
            if status != 200 {
                return Err(anyhow!("node_exporter answered {status}"));
            }
            node_samples = body
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .count();
            if n == warmup {
                node_cpu.0 = usage(node.pid())?.cpu_s;
            }
            if n == collections_n {
                node_cpu.1 = usage(node.pid())?.cpu_s;
            }
            std::thread::sleep(interval.saturating_sub(started.elapsed()));
            Ok(())
        };
        let mut agent_cpu_at_warmup = None;
        for n in 1..=collections_n {
            scrape(n)?;
            if n == warmup {
                wait_collections(env, &full, f64::from(warmup), &mut agent_full)?;
                wait_collections(env, &host, f64::from(warmup), &mut agent_host)?;
                agent_cpu_at_warmup = Some((
                    usage(agent_full.pid())?.cpu_s,
                    usage(agent_host.pid())?.cpu_s,
                    collections(&env.agg, &host),
                ));
            }
        }
        wait_collections(env, &full, f64::from(collections_n), &mut agent_full)?;
        wait_collections(env, &host, f64::from(collections_n), &mut agent_host)?;
        wait_collections(env, &cached, f64::from(collections_n), &mut agent_cached)?;
        let (full_u, host_u, cached_u, node_u) = (
            usage(agent_full.pid())?,
            usage(agent_host.pid())?,
            usage(agent_cached.pid())?,
            usage(node.pid())?,
        );
        let host_rounds = collections(&env.agg, &host);
        let Some((_, host_cpu0, host_rounds0)) = agent_cpu_at_warmup else {
            return Err(anyhow!("no warm-up reading"));
        };
        let host_cpu_per = (host_u.cpu_s - host_cpu0) / (host_rounds - host_rounds0).max(1.0);
        let node_cpu_per = (node_cpu.1 - node_cpu.0) / f64::from(collections_n - warmup);
        rss_ratio.push(full_u.rss as f64 / node_u.rss as f64);
        cached_ratio.push(cached_u.rss as f64 / node_u.rss as f64);
        cpu_ratio.push(host_cpu_per / node_cpu_per);
        rows.push(vec![
            format!("{}", run + 1),
            mib(full_u.rss as f64),
            mib(host_u.rss as f64),
            mib(cached_u.rss as f64),
            mib(node_u.rss as f64),
            format!("{:.2}×", full_u.rss as f64 / node_u.rss as f64),
            format!("{:.2}×", cached_u.rss as f64 / node_u.rss as f64),
            format!(
                "{} / {}",
                mib(full_u.rss_anon as f64),
                mib(node_u.rss_anon as f64)
            ),
            format!("{:.2} ms", host_cpu_per * 1e3),
            format!("{:.2} ms", node_cpu_per * 1e3),
            format!("{:.2}×", host_cpu_per / node_cpu_per),
            format!(
                "{} / {} / {}",
                count(samples_per_collection(&env.agg, &full)),
                count(samples_per_collection(&env.agg, &host)),
                count(node_samples as f64)
            ),
        ]);
        agent_full.terminate(Duration::from_secs(20));
        agent_host.terminate(Duration::from_secs(20));
        agent_cached.terminate(Duration::from_secs(20));
        node.terminate(Duration::from_secs(20));
    }
    rows.push(vec![
        "**median**".into(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        format!("**{}**", ratio(median(&rss_ratio), 1.0)),
        format!("**{}**", ratio(median(&cached_ratio), 1.0)),
        String::new(),
        String::new(),
        String::new(),
        format!("**{}**", ratio(median(&cpu_ratio), 1.0)),
        String::new(),
    ]);
    s.report.table(
        &format!(
            "Agent vs node_exporter (x86_64, {}), after {collections_n} collections / scrapes {}ms apart; CPU from collection {warmup} on (goals: memory ≤ 0.5×, CPU ≤ 0.5×)",
            measured_agent().1,
            interval.as_millis()
        ),
        &[
            "run",
            "agent RSS (host+rpi+flink)",
            "agent RSS (host only)",
            "agent RSS (host+rpi+flink, compile cache)",
            "node_exporter RSS",
            "memory ratio",
            "memory ratio (compile cache)",
            "anonymous part of RSS: agent (host+rpi+flink) / node_exporter",
            "agent CPU per host collection",
            "node_exporter CPU per scrape",
            "CPU ratio",
            "samples per round: agent full / host / node_exporter",
        ],
        &rows,
    );
    Ok(())
}

/// Spawn → the aggregator has journaled the agent's first batch (its own metrics), and →
/// the first samples of every plugin (host, rpi, flink), with plugins compiled at start
/// (default) and loaded from a warm compile cache.
fn startup(s: &mut Settings, env: &Env) -> Result<()> {
    let runs = s.runs.max(3);
    let cache = &env.cache;
    // One series each plugin reports every round.
    let plugin_series = [
        "node_memory_MemTotal_bytes",
        "rpi_soc_temperature_celsius",
        "flink_task_slots",
    ];
    let mut rows = Vec::new();
    for (label, cache) in [
        ("compiled at start", None),
        ("from the compile cache", Some(cache.as_path())),
    ] {
        let (mut first, mut all) = (Vec::new(), Vec::new());
        // With a cache, the first start fills it; measure the starts after it.
        let starts = if cache.is_some() { runs + 1 } else { runs };
        for n in 0..starts {
            let kind = if cache.is_some() { "cached" } else { "cold" };
            let instance = format!("start-{kind}-{n}");
            let config = agent_config(env, &instance, Duration::from_secs(10), Plugins::All, cache);
            let offset = std::fs::metadata(&env.journal)
                .map(|m| m.len())
                .unwrap_or(0);
            let started = Instant::now();
            let mut agent = start_agent(env, &instance, &config, Command::new(measured_agent().0))?;
            let deadline = started + Duration::from_secs(120);
            let mut first_batch = None;
            let tag = format!("\"instance\":\"{instance}\"");
            loop {
                let new = read_from(&env.journal, offset);
                if first_batch.is_none() && !new.is_empty() {
                    first_batch = Some(started.elapsed());
                }
                let every_plugin = plugin_series.iter().all(|name| {
                    new.lines()
                        .any(|l| l.contains(&format!("\"name\":\"{name}\"")) && l.contains(&tag))
                });
                if every_plugin {
                    break;
                }
                if Instant::now() > deadline || !agent.is_running() {
                    return Err(anyhow!(
                        "no samples from every plugin of {instance}; log:\n{}",
                        agent.log_text()
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let elapsed = started.elapsed();
            agent.terminate(Duration::from_secs(20));
            if cache.is_none() || n > 0 {
                first.push(first_batch.unwrap_or(elapsed).as_secs_f64() * 1e3);
                all.push(elapsed.as_secs_f64() * 1e3);
            }
        }
        rows.push(vec![
            label.into(),
            format!("{:.0} ms", median(&first)),
            format!("{:.0} ms", median(&all)),
            all.iter()
                .map(|t| format!("{t:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    s.report.table(
        "Agent start-up (host+rpi+flink, x86_64): spawn → first batch journaled by the aggregator, and → first samples of all three plugins",
        &["plugins", "first batch (median)", "all plugins (median)", "all plugins, each run (ms)"],
        &rows,
    );
    Ok(())
}

/// Drops what the page cache holds of `binary` (the pages no process maps), so that each run
/// starts it as after a reboot: the first agent reads it on demand, the others share what
/// that one read. How much of a binary a page fault maps depends on how its pages sit in the
/// cache (one just written by `cp` measured 1.1 MiB more resident than one read on demand;
/// docs/performance.md, "Agent memory"), and runs should not depend on what came before them.
fn start_cold(binary: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file =
        std::fs::File::open(binary).map_err(|e| anyhow!("open {}: {e}", binary.display()))?;
    // Dirty pages (a binary `cross/build.sh` just copied) are not dropped: write them first.
    file.sync_data()
        .map_err(|e| anyhow!("fsync {}: {e}", binary.display()))?;
    // SAFETY: posix_fadvise only advises the kernel about an open descriptor's cached pages.
    let done = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if done != 0 {
        return Err(anyhow!(
            "posix_fadvise({}): {}",
            binary.display(),
            std::io::Error::from_raw_os_error(done)
        ));
    }
    Ok(())
}

/// What was appended to `path` after `offset`.
fn read_from(path: &Path, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = file.read_to_string(&mut text);
    }
    text
}

fn set_owner_only(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// The x86_64 agent measured, and which build it is (for table titles): the one
/// `cross/build.sh` builds, which is what ships and is linked with the trained symbol order,
/// when it is there; else the one beside this tool.
fn measured_agent() -> (PathBuf, &'static str) {
    match cross_binary("x86_64-unknown-linux-gnu") {
        Some(path) => (path, "as cross/build.sh builds it"),
        None => (
            bin("picket-agent"),
            "the build beside picket-bench, not cross/build.sh's",
        ),
    }
}

/// Where `cross/build.sh` leaves each architecture's agent.
fn cross_binary(target: &str) -> Option<PathBuf> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    [
        repo.join(format!("dist/picket-agent-{target}")),
        picket_tests::bin_dir().join(format!("../{target}/release/picket-agent")),
    ]
    .into_iter()
    .find(|p| p.exists())
}

const CROSS: [(&str, &str, &str); 2] = [
    (
        "aarch64-unknown-linux-gnu",
        "qemu-aarch64",
        "/usr/aarch64-linux-gnu",
    ),
    (
        "armv7-unknown-linux-gnueabihf",
        "qemu-arm",
        "/usr/arm-linux-gnueabihf",
    ),
];

fn binary_sizes(s: &mut Settings) {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64).ok();
    let mut rows = Vec::new();
    let native = measured_agent().0;
    let node = Path::new("/usr/bin/prometheus-node-exporter");
    let node_size = size(node);
    let mut add = |arch: &str, path: Option<PathBuf>| {
        let bytes = path.as_deref().and_then(size);
        rows.push(vec![
            arch.to_owned(),
            bytes.map_or_else(|| "not built (run cross/build.sh)".into(), mib),
            match (bytes, node_size) {
                (Some(b), Some(n)) => ratio(b, n),
                _ => "n/a".into(),
            },
        ]);
    };
    add("x86_64", Some(native));
    for (target, _, _) in CROSS {
        add(target, cross_binary(target));
    }
    s.report.table(
        &format!(
            "Stripped picket-agent binary (first-party plugins embedded) vs node_exporter's x86_64 binary ({})",
            node_size.map_or_else(|| "not installed".into(), mib)
        ),
        &["architecture", "size", "vs node_exporter"],
        &rows,
    );
}

/// The cross-built agents under qemu-user with all three plugins: resident memory of the
/// emulator process after some collections. qemu's own memory and its translated code are
/// included, so this bounds the agent's memory on a Pi from above.
fn emulated(s: &mut Settings, env: &Env) -> Result<()> {
    let collections_n = if s.quick { 5.0 } else { 20.0 };
    let mut rows = Vec::new();
    for (target, qemu, sysroot) in CROSS {
        let Some(binary) = cross_binary(target) else {
            rows.push(vec![
                target.into(),
                "not built (run cross/build.sh)".into(),
                String::new(),
            ]);
            continue;
        };
        let qemu_path = setup::require(qemu, "qemu-user")?;
        let mut rss = Vec::new();
        for run in 0..s.runs {
            let instance = format!("qemu-{target}-{run}");
            let mut cmd = Command::new(&qemu_path);
            cmd.arg("-L").arg(sysroot).arg(&binary);
            let config = agent_config(env, &instance, Duration::from_secs(1), Plugins::All, None);
            let mut agent = start_agent(env, &instance, &config, cmd)?;
            wait_collections(env, &instance, collections_n, &mut agent)?;
            rss.push(usage(agent.pid())?.rss as f64);
            agent.terminate(Duration::from_secs(60));
        }
        rows.push(vec![
            target.into(),
            mib(median(&rss)),
            rss.iter().map(|r| mib(*r)).collect::<Vec<_>>().join(", "),
        ]);
    }
    s.report.table(
        &format!(
            "Cross-built agents under qemu-user, host+rpi+flink, after {collections_n} collections (RSS of the qemu process: includes the emulator)"
        ),
        &["target", "median RSS", "each run"],
        &rows,
    );
    Ok(())
}

/// Recorded Flink 2.3 REST answers (plugins/flink/fixtures) by request path, so the flink
/// plugin walks a running job's overview, checkpoints, task managers and vertices.
fn flink_rest_server() -> Result<fixture_http::Server> {
    let fixtures = plugin_fixtures("flink");
    let mut files = std::collections::HashMap::new();
    for entry in std::fs::read_dir(&fixtures)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") {
            files.insert(name, std::fs::read(entry.path())?);
        }
    }
    let vertex = |vid: &str| match vid {
        "bc764cd8ddf7a0cff126f51c16239658" => "source",
        "0a448493b4782967b150582570326227" => "calc",
        _ => "sink",
    };
    let route = move |target: &str| -> Option<String> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let file = match parts.as_slice() {
            ["overview"] => "overview.json".into(),
            ["jobs", "overview"] => "jobs-overview.json".into(),
            ["taskmanagers"] => "taskmanagers.json".into(),
            ["taskmanagers", _, "metrics"] if query.is_empty() => {
                "taskmanager-metrics-list.json".into()
            }
            ["taskmanagers", _, "metrics"] => "taskmanager-metrics.json".into(),
            ["jobs", _] => "job.json".into(),
            ["jobs", _, "checkpoints"] => "job-checkpoints.json".into(),
            ["jobs", _, "metrics"] if query.is_empty() => "job-metrics-list.json".into(),
            ["jobs", _, "metrics"] => "job-metrics.json".into(),
            ["jobs", _, "vertices", vid, "backpressure"] => {
                format!("vertex-{}-backpressure.json", vertex(vid))
            }
            ["jobs", _, "vertices", vid, "subtasks", "metrics"] => {
                format!("vertex-{}-subtasks-metrics.json", vertex(vid))
            }
            ["jobs", _, "vertices", _, "metrics"] if query.is_empty() => {
                "vertex-source-metrics-list.json".into()
            }
            ["jobs", _, "vertices", vid, "metrics"] => {
                format!("vertex-{}-metrics.json", vertex(vid))
            }
            _ => return None,
        };
        Some(file)
    };
    Ok(fixture_http::Server::start(move |target| {
        let json = "application/json; charset=UTF-8";
        match route(target).and_then(|f| files.get(&f)) {
            Some(body) => fixture_http::Reply::new(200, json, body.clone()),
            None => fixture_http::Reply::new(404, json, r#"{"errors":["Not found"]}"#),
        }
    }))
}

//! The four first-party plugins as the agent ships them: the wasm embedded by `build.rs`,
//! loaded through the catalog, compiled and run by the real runtime with the agent's default
//! instance limits, against the fixtures each plugin keeps in `plugins/<name>/fixtures`.
//!
//! - `host` reads this machine through the `host_stats` grant; its numbers are checked
//!   against /proc as the test reads it.
//! - `rpi` runs the fake `vcgencmd` script and reads the fake sysfs tree of its fixtures
//!   (a private, canonicalised copy, as its README prescribes).
//! - `prometheus` and `flink` talk HTTP to a small HTTP/1.1 server in this file that serves
//!   the recorded exporter texts and Flink REST answers.
//!
//! The plugins' own crates test their logic natively against the same fixtures; this file
//! checks that what reaches the agent, through the capabilities, grants, WIT conversion and
//! output limits, still carries the fixtures' values.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use picket_agent::plugin_stats::PluginStats;
use picket_agent::plugins::catalog;
use picket_agent::plugins::config::{InstanceConfig, rpi_grants};
use picket_agent::plugins::grants::{Grants, HttpGrant};
use picket_agent::plugins::runtime::{Instance, PluginError, Runtime};
use picket_core::model::{Family, Point, Value};
use picket_tests::fixture_http::{Reply, Server, closed_port};
use picket_tests::{copy_tree, plugin_fixtures};
use serde_json::json;

// ---- Shared helpers --------------------------------------------------------------------------

/// The collection time handed to `collect`.
const NOW_MS: i64 = 1_700_000_000_000;

fn fixture(plugin: &str, file: &str) -> Vec<u8> {
    let path = plugin_fixtures(plugin).join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture_json(plugin: &str, file: &str) -> serde_json::Value {
    serde_json::from_slice(&fixture(plugin, file))
        .unwrap_or_else(|e| panic!("{plugin}/fixtures/{file} is not JSON: {e}"))
}

/// Loads the embedded plugin `name`, compiles it and starts one instance with `grants` and
/// `settings` (JSON), under the limits the agent gives an instance by default.
async fn start(name: &str, grants: Grants, settings: &str) -> (Instance, Arc<PluginStats>) {
    let code = catalog::load(name, None).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(code.origin, catalog::Origin::Embedded, "{name}");
    let compiled = Runtime::new()
        .compile(&code.wasm, 512 * 1024)
        .unwrap_or_else(|e| panic!("{name} does not compile: {e}"));
    let stats = Arc::new(PluginStats::default());
    let instance = Instance::start(
        &compiled,
        format!("{name}/first-party-test"),
        Arc::new(grants),
        settings,
        InstanceConfig::new(name, name).limits(),
        stats.clone(),
    )
    .await
    .unwrap_or_else(|e| panic!("{name} did not start with {settings}: {e}"));
    (instance, stats)
}

/// One collection that must succeed.
async fn collect(instance: &mut Instance, what: &str) -> Vec<Family> {
    match instance.collect(NOW_MS).await {
        Ok(families) => families,
        Err(e) => panic!("{what}: collection failed ({}): {e}", e.kind()),
    }
}

fn family<'a>(families: &'a [Family], name: &str) -> Option<&'a Family> {
    families.iter().find(|f| f.name == name)
}

/// The points of family `name` whose labels include every pair of `labels`.
fn points<'a>(families: &'a [Family], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Point> {
    family(families, name)
        .map(|f| {
            f.points
                .iter()
                .filter(|p| labels.iter().all(|(k, v)| p.labels.get(k) == Some(*v)))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of the one series of `name` whose labels include `labels`; None when there is
/// none. Panics when the selector matches several series or a non-numeric value.
fn value(families: &[Family], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    match points(families, name, labels).as_slice() {
        [] => None,
        [point] => match &point.value {
            Value::Number(v) => Some(*v),
            other => panic!("{name}{labels:?} is not a number: {other:?}"),
        },
        many => panic!("{name}{labels:?} matches {} series", many.len()),
    }
}

fn names(families: &[Family]) -> Vec<&str> {
    families.iter().map(|f| f.name.as_str()).collect()
}

fn http_grant(allow: Vec<String>) -> Grants {
    Grants {
        http: HttpGrant {
            allow,
            ..Default::default()
        },
        ..Default::default()
    }
}

// ---- host ------------------------------------------------------------------------------------

const CPU_MODES: [&str; 8] = [
    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
];

/// Per CPU of /proc/stat (`cpuN` lines, not the `cpu` total): its name and the seconds of
/// the modes of [`CPU_MODES`], in that (the kernel's column) order.
fn proc_stat_cpus() -> Vec<(String, Vec<f64>)> {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    assert!(ticks > 0.0, "_SC_CLK_TCK");
    stat.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let cpu = fields.next()?.strip_prefix("cpu")?;
            if cpu.is_empty() {
                return None;
            }
            let seconds = fields
                .take(CPU_MODES.len())
                .map(|t| t.parse::<f64>().expect("a /proc/stat tick count") / ticks)
                .collect();
            Some((cpu.to_owned(), seconds))
        })
        .collect()
}

fn meminfo_bytes(field: &str) -> f64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/meminfo"));
    kib * 1024.0
}

/// The device and type of the filesystem mounted at `/` (the last mount there wins).
fn root_mount() -> (String, String) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"/")).then(|| (f[0].to_owned(), f[2].to_owned()))
        })
        .next_back()
        .expect("a filesystem mounted at /")
}

#[tokio::test(flavor = "multi_thread")]
async fn host_reports_this_machine_under_node_exporter_names() {
    let (device, fstype) = root_mount();
    // The plugin's defaults leave container roots (overlay) out, as node_exporter does; this
    // test is about the root filesystem reaching the agent, so let it through there.
    let settings = if fstype == "overlay" {
        r#"{"filesystem_exclude_fstypes":[]}"#
    } else {
        "{}"
    };
    let grants = Grants {
        host_stats: true,
        ..Default::default()
    };
    let before = proc_stat_cpus();
    assert!(!before.is_empty(), "no cpuN lines in /proc/stat");
    let (mut host, stats) = start("host", grants, settings).await;
    let f = collect(&mut host, "host").await;

    // Every CPU of /proc/stat with all eight modes, and nothing else; counters at least what
    // /proc/stat said just before the collection.
    let cpu = family(&f, "node_cpu_seconds_total").expect("node_cpu_seconds_total");
    assert_eq!(cpu.points.len(), before.len() * CPU_MODES.len());
    for (name, seconds_before) in &before {
        for (mode, earlier) in CPU_MODES.iter().zip(seconds_before) {
            let seconds = value(
                &f,
                "node_cpu_seconds_total",
                &[("cpu", name), ("mode", mode)],
            )
            .unwrap_or_else(|| panic!("no node_cpu_seconds_total{{cpu={name},mode={mode}}}"));
            assert!(
                seconds + 1e-6 >= *earlier,
                "cpu {name} {mode}: {seconds} s, but /proc/stat said {earlier} s before"
            );
        }
    }

    assert_eq!(
        value(&f, "node_memory_MemTotal_bytes", &[]),
        Some(meminfo_bytes("MemTotal"))
    );

    let root = [
        ("mountpoint", "/"),
        ("device", device.as_str()),
        ("fstype", fstype.as_str()),
    ];
    let size = value(&f, "node_filesystem_size_bytes", &root)
        .unwrap_or_else(|| panic!("no node_filesystem_size_bytes{root:?}"));
    assert!(size > 0.0, "{size}");
    let avail = value(&f, "node_filesystem_avail_bytes", &root).expect("avail bytes of /");
    assert!((0.0..=size).contains(&avail), "{avail} of {size}");

    let load1 = value(&f, "node_load1", &[]).expect("node_load1");
    assert!(load1.is_finite() && load1 >= 0.0, "{load1}");
    assert!(
        stats.errors().values().all(|n| *n == 0),
        "{:?}",
        stats.errors()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn host_without_the_grant_fails_naming_it() {
    let (mut host, stats) = start("host", Grants::default(), "{}").await;
    match host.collect(NOW_MS).await {
        Err(PluginError::Collect(message)) => {
            assert!(message.contains("denied"), "{message}");
            assert!(message.contains("host_stats = true"), "{message}");
        }
        other => panic!("expected a denied collection, got {other:?}"),
    }
    assert_eq!(stats.errors().get("denied"), Some(&1));
}

// ---- rpi -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn rpi_reads_vcgencmd_and_falls_back_to_sysfs() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let root = tmp
        .path()
        .canonicalize()
        .expect("canonical temp dir")
        .join("rpi");
    copy_tree(&plugin_fixtures("rpi"), &root);
    let program = root.join("vcgencmd").display().to_string();
    let thermal = root.join("sys/class/thermal").display().to_string();
    let temp_glob = format!("{thermal}/thermal_zone*/temp");
    // The very grants the agent gives its default rpi instance, pointed at the fixtures.
    let grants = rpi_grants(&program, &[&thermal]);
    let settings = json!({ "vcgencmd": program, "thermal_glob": temp_glob }).to_string();
    let (mut rpi, stats) = start("rpi", grants, &settings).await;

    // As shipped: every answer from the fake vcgencmd.
    let f = collect(&mut rpi, "rpi, all answers").await;
    assert_eq!(
        value(&f, "rpi_soc_temperature_celsius", &[("sensor", "soc")]),
        Some(48.3)
    );
    assert_eq!(points(&f, "rpi_soc_temperature_celsius", &[]).len(), 1);
    // throttled=0x50005: bits 0 and 2 now, 16 and 18 since boot.
    assert_eq!(value(&f, "rpi_throttled_raw", &[]), Some(327_685.0));
    assert_eq!(points(&f, "rpi_throttled", &[]).len(), 8);
    for when in ["now", "since_boot"] {
        for (condition, expected) in [
            ("under_voltage", 1.0),
            ("arm_frequency_capped", 0.0),
            ("throttled", 1.0),
            ("soft_temperature_limit", 0.0),
        ] {
            assert_eq!(
                value(
                    &f,
                    "rpi_throttled",
                    &[("condition", condition), ("when", when)]
                ),
                Some(expected),
                "{condition} {when}"
            );
        }
    }
    assert_eq!(
        value(&f, "rpi_arm_frequency_hertz", &[]),
        Some(1_500_398_464.0)
    );
    assert_eq!(value(&f, "rpi_core_voltage_volts", &[]), Some(0.8563));
    for command in [
        "measure_temp",
        "get_throttled",
        "measure_clock_arm",
        "measure_volts_core",
    ] {
        assert_eq!(
            value(&f, "rpi_vcgencmd_errors_total", &[("command", command)]),
            Some(0.0),
            "{command}"
        );
    }

    // measure_temp failing as without /dev/vchiq (the README's recipe): the kernel's thermal
    // zone stands in, and the failure is counted.
    let answers = root.join("answers");
    std::fs::write(answers.join("measure_temp"), "").expect("edit an answer");
    std::fs::write(
        answers.join("measure_temp.stderr"),
        "VCHI initialization failed\n",
    )
    .expect("edit an answer");
    std::fs::write(answers.join("measure_temp.status"), "255\n").expect("edit an answer");
    let f = collect(&mut rpi, "rpi, measure_temp failing").await;
    assert_eq!(
        value(&f, "rpi_soc_temperature_celsius", &[("sensor", "soc")]),
        None
    );
    assert_eq!(
        value(
            &f,
            "rpi_soc_temperature_celsius",
            &[("sensor", "cpu-thermal"), ("zone", "thermal_zone0")]
        ),
        Some(48.312)
    );
    assert_eq!(points(&f, "rpi_soc_temperature_celsius", &[]).len(), 1);
    assert_eq!(
        value(
            &f,
            "rpi_vcgencmd_errors_total",
            &[("command", "measure_temp")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &f,
            "rpi_vcgencmd_errors_total",
            &[("command", "get_throttled")]
        ),
        Some(0.0)
    );
    assert_eq!(value(&f, "rpi_throttled_raw", &[]), Some(327_685.0));
    assert_eq!(value(&f, "rpi_core_voltage_volts", &[]), Some(0.8563));
    assert!(
        stats.errors().values().all(|n| *n == 0),
        "{:?}",
        stats.errors()
    );
}

// ---- prometheus ------------------------------------------------------------------------------

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// Serves the exporter fixtures: node_exporter at `/node/metrics`, the real Flink 2.3
/// TaskManager reporter at `/flink/metrics`.
fn exporter_server() -> Server {
    let node = fixture("prometheus", "node-exporter.txt");
    let flink = fixture("flink", "reporter-taskmanager.txt");
    Server::start(move |target| match target {
        "/node/metrics" => Reply::new(200, PROMETHEUS_TEXT, node.clone()),
        "/flink/metrics" => Reply::new(200, PROMETHEUS_TEXT, flink.clone()),
        _ => Reply::new(404, "text/plain", "404 page not found\n"),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_node_exporter_and_marks_a_closed_port_down() {
    let server = exporter_server();
    let closed = format!("http://127.0.0.1:{}", closed_port());
    let grants = http_grant(vec![server.url("/"), format!("{closed}/")]);
    let settings = json!({ "targets": [server.url("/node/metrics"), format!("{closed}/metrics")] })
        .to_string();
    let (mut prometheus, stats) = start("prometheus", grants, &settings).await;
    let f = collect(&mut prometheus, "prometheus, node_exporter").await;

    let served = server.addr.to_string();
    let closed_label = closed.trim_start_matches("http://");
    // The fixture's 283 families and 501 series (a summary counts once), as the plugin's
    // parser tests state, plus the plugin's six picket_scrape_* families.
    let scraped: Vec<&Family> = f
        .iter()
        .filter(|fam| !fam.name.starts_with("picket_scrape_"))
        .collect();
    assert_eq!(scraped.len(), 283, "{:?}", names(&f));
    assert_eq!(f.len(), 283 + 6);
    assert_eq!(
        scraped.iter().map(|fam| fam.points.len()).sum::<usize>(),
        501
    );
    assert_eq!(
        value(
            &f,
            "picket_scrape_samples_scraped",
            &[("target", served.as_str())]
        ),
        Some(501.0)
    );
    assert_eq!(
        value(&f, "picket_scrape_samples", &[("target", served.as_str())]),
        Some(501.0)
    );
    assert_eq!(
        value(&f, "picket_scrape_up", &[("target", served.as_str())]),
        Some(1.0)
    );
    assert_eq!(
        value(&f, "picket_scrape_up", &[("target", closed_label)]),
        Some(0.0)
    );
    assert_eq!(
        value(&f, "picket_scrape_samples", &[("target", closed_label)]),
        Some(0.0)
    );
    // Values and labels as recorded, with the target label added.
    assert_eq!(
        value(
            &f,
            "node_memory_MemTotal_bytes",
            &[("target", served.as_str())]
        ),
        Some(2.5276510208e10)
    );
    assert_eq!(
        value(
            &f,
            "node_cpu_seconds_total",
            &[("cpu", "0"), ("mode", "idle"), ("target", served.as_str())]
        ),
        Some(1855.65)
    );
    assert!(
        stats.errors().values().all(|n| *n == 0),
        "{:?}",
        stats.errors()
    );
    assert_eq!(server.requests(), ["/node/metrics"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_a_real_flink_reporter_without_attempt_ids() {
    let server = exporter_server();
    let grants = http_grant(vec![server.url("/")]);
    let settings = json!({ "targets": [server.url("/flink/metrics")] }).to_string();
    let (mut prometheus, _) = start("prometheus", grants, &settings).await;
    let f = collect(&mut prometheus, "prometheus, Flink reporter").await;

    let served = server.addr.to_string();
    assert_eq!(
        value(&f, "picket_scrape_up", &[("target", served.as_str())]),
        Some(1.0)
    );
    let flink: Vec<&Family> = f
        .iter()
        .filter(|fam| fam.name.starts_with("flink_"))
        .collect();
    assert!(!flink.is_empty(), "{:?}", names(&f));
    for fam in &flink {
        for point in &fam.points {
            assert!(
                !point.labels.contains("task_attempt_id"),
                "{}{}",
                fam.name,
                point.labels
            );
            assert_eq!(point.labels.get("target"), Some(served.as_str()));
            if fam.name.starts_with("flink_taskmanager_job_") {
                assert_eq!(
                    point.labels.get("job_name"),
                    Some("picket_datagen_blackhole"),
                    "{}{}",
                    fam.name,
                    point.labels
                );
            }
        }
    }
    // From the fixture: the sink's second subtask had read 28616 records.
    assert_eq!(
        value(
            &f,
            "flink_taskmanager_job_task_operator_numRecordsIn",
            &[("operator_name", "sink_3_:_Writer"), ("subtask_index", "1")]
        ),
        Some(28_616.0)
    );
    assert_eq!(
        points(&f, "flink_taskmanager_job_task_operator_numRecordsIn", &[]).len(),
        6,
        "three operators, two subtasks each"
    );
}

// ---- flink -----------------------------------------------------------------------------------

/// Ids of the recorded cluster (plugins/flink/fixtures/README.md).
const JOB: &str = "7c997992b172a4a842aa7460f6969a66";
const SOURCE: &str = "bc764cd8ddf7a0cff126f51c16239658";
const CALC: &str = "0a448493b4782967b150582570326227";
const SINK: &str = "ea632d67b7d595e5b851708ae9ad79d6";
const TASKMANAGER: &str = "127.0.0.1:37781-a369d9";

const JSON: &str = "application/json; charset=UTF-8";

#[derive(Clone, Copy, PartialEq)]
enum Cluster {
    /// While the job ran.
    Running,
    /// After the job was cancelled: only what was recorded then.
    Cancelled,
}

/// The fixture recorded for a request (path, query), per plugins/flink/fixtures/README.md.
fn flink_fixture(cluster: Cluster, path: &str, query: Option<&str>) -> Option<(u16, String)> {
    use Cluster::{Cancelled, Running};
    let job = format!("/jobs/{JOB}");
    let vertex = |vid: &str| {
        Some(match vid {
            SOURCE => "source",
            CALC => "calc",
            SINK => "sink",
            _ => return None,
        })
    };
    let file = match (cluster, path, query) {
        (Running, "/overview", None) => "overview.json".to_owned(),
        (Cancelled, "/overview", None) => "overview-cancelled.json".to_owned(),
        (Running, "/jobs/overview", None) => "jobs-overview.json".to_owned(),
        (Cancelled, "/jobs/overview", None) => "jobs-overview-cancelled.json".to_owned(),
        (Running, "/taskmanagers", None) => "taskmanagers.json".to_owned(),
        (Running, p, q) if p == format!("/taskmanagers/{TASKMANAGER}/metrics") => match q {
            None => "taskmanager-metrics-list.json".to_owned(),
            Some(_) => "taskmanager-metrics.json".to_owned(),
        },
        (_, "/jobs/00000000000000000000000000000000", None) => {
            return Some((404, "job-not-found-404.json".to_owned()));
        }
        (_, "/jobs/not-a-job-id", None) => return Some((400, "job-bad-id-400.json".to_owned())),
        (Running, p, None) if p == job => "job.json".to_owned(),
        (Cancelled, p, None) if p == job => "job-cancelled.json".to_owned(),
        (Running, p, None) if p == format!("{job}/checkpoints") => "job-checkpoints.json".into(),
        (Cancelled, p, None) if p == format!("{job}/checkpoints") => {
            "job-checkpoints-cancelled.json".to_owned()
        }
        (Running, p, None) if p == format!("{job}/metrics") => "job-metrics-list.json".to_owned(),
        (Running, p, Some(_)) if p == format!("{job}/metrics") => "job-metrics.json".to_owned(),
        (Cancelled, p, Some(_)) if p == format!("{job}/metrics") => {
            "job-metrics-cancelled.json".to_owned()
        }
        (cluster, p, q) => {
            let rest = p.strip_prefix(&format!("{job}/vertices/"))?;
            let (vid, endpoint) = rest.split_once('/')?;
            let name = vertex(vid)?;
            match (cluster, endpoint, q) {
                (Running, "backpressure", None) => format!("vertex-{name}-backpressure.json"),
                (Cancelled, "backpressure", None) if vid == CALC => {
                    "vertex-calc-backpressure-cancelled.json".to_owned()
                }
                (Running, "subtasks/metrics", Some(_)) => {
                    format!("vertex-{name}-subtasks-metrics.json")
                }
                (Cancelled, "subtasks/metrics", Some(_)) if vid == CALC => {
                    "vertex-calc-subtasks-metrics-cancelled.json".to_owned()
                }
                (Running, "metrics", None) if vid == SOURCE => {
                    "vertex-source-metrics-list.json".to_owned()
                }
                (Running, "metrics", Some(q)) => {
                    // Vertex metrics exist only with a subtask prefix (`0.numRecordsIn`).
                    let prefixed = get_ids(q).iter().all(|id| id.contains('.'));
                    if prefixed {
                        format!("vertex-{name}-metrics.json")
                    } else {
                        format!("vertex-{name}-metrics-unprefixed.json")
                    }
                }
                _ => return None,
            }
        }
    };
    Some((200, file))
}

/// The metric ids of a `get=a,b,c` query.
fn get_ids(query: &str) -> BTreeSet<String> {
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("get="))
        .flat_map(|ids| ids.split(','))
        .map(str::to_owned)
        .collect()
}

/// What the recorded Flink answers to `target`: the fixture for it, with a `?get=` list
/// answered as Flink does (only the requested metrics it has); anything unrecorded gets
/// Flink's router 404.
fn flink_reply(cluster: Cluster, target: &str) -> Reply {
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let Some((status, file)) = flink_fixture(cluster, path, query) else {
        let body = json!({ "errors": [format!("Not found: {target}")] }).to_string();
        return Reply::new(404, JSON, body);
    };
    let body = fixture("flink", &file);
    let Some(wanted) = query.map(get_ids).filter(|ids| !ids.is_empty()) else {
        return Reply::new(status, JSON, body);
    };
    let Ok(serde_json::Value::Array(entries)) = serde_json::from_slice(&body) else {
        return Reply::new(status, JSON, body);
    };
    let requested = |e: &serde_json::Value| e["id"].as_str().is_some_and(|id| wanted.contains(id));
    if entries.iter().all(requested) {
        // Recorded with this very list: the bytes as Flink sent them.
        return Reply::new(status, JSON, body);
    }
    let kept: Vec<&serde_json::Value> = entries.iter().filter(|e| requested(e)).collect();
    Reply::new(status, JSON, json!(kept).to_string())
}

/// A Flink REST endpoint from the recordings, with `failing` targets answering HTTP 500 as
/// a JobManager with an internal error does.
fn flink_server(cluster: Cluster, failing: &[String]) -> Server {
    let failing: HashSet<String> = failing.iter().cloned().collect();
    Server::start(move |target| {
        if failing.contains(target) {
            let body = json!({ "errors": ["Internal server error."] }).to_string();
            return Reply::new(500, JSON, body);
        }
        flink_reply(cluster, target)
    })
}

async fn start_flink(server: &Server) -> (Instance, Arc<PluginStats>) {
    let grants = http_grant(vec![server.url("/")]);
    let settings = json!({ "url": server.url("") }).to_string();
    start("flink", grants, &settings).await
}

const SCRAPE_ENDPOINTS: [&str; 6] = [
    "jobs_overview",
    "job",
    "job_metrics",
    "job_checkpoints",
    "vertex_metrics",
    "vertex_backpressure",
];

fn job_labels() -> [(&'static str, &'static str); 2] {
    [("job_id", JOB), ("job_name", "picket-datagen-blackhole")]
}

#[tokio::test(flavor = "multi_thread")]
async fn flink_reports_the_recorded_running_cluster() {
    let server = flink_server(Cluster::Running, &[]);
    let (mut flink, stats) = start_flink(&server).await;
    let f = collect(&mut flink, "flink, running").await;
    // Every request was answered from a recording: 2 cluster, 3 for the job, 2 per vertex.
    let requests = server.requests();
    assert_eq!(requests.len(), 2 + 3 + 3 * 2, "{requests:#?}");
    for request in &requests {
        let (path, query) = match request.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (request.as_str(), None),
        };
        assert!(
            flink_fixture(Cluster::Running, path, query).is_some(),
            "{request} has no recording"
        );
    }

    let overview = fixture_json("flink", "overview.json");
    assert_eq!(
        value(&f, "flink_task_slots", &[]),
        overview["slots-total"].as_f64()
    );
    assert_eq!(
        value(&f, "flink_taskmanagers", &[]),
        overview["taskmanagers"].as_f64()
    );
    assert_eq!(value(&f, "flink_jobs", &[("state", "running")]), Some(1.0));
    let job = job_labels();
    assert_eq!(
        value(
            &f,
            "flink_job_state",
            &[job[0], job[1], ("state", "running")]
        ),
        Some(1.0)
    );
    // uptime 50739 ms in the job metrics.
    assert_eq!(value(&f, "flink_job_uptime_seconds", &job), Some(50.739));

    let counts = &fixture_json("flink", "job-checkpoints.json")["counts"];
    for (name, field) in [
        ("flink_job_checkpoints_completed_total", "completed"),
        ("flink_job_checkpoints_failed_total", "failed"),
        ("flink_job_checkpoints_restored_total", "restored"),
        ("flink_job_checkpoints_in_progress", "in_progress"),
    ] {
        assert_eq!(value(&f, name, &job), counts[field].as_f64(), "{name}");
    }
    assert_eq!(
        value(&f, "flink_job_checkpoints_completed_total", &job),
        Some(26.0)
    );

    // Busy time of the Calc vertex: avg and max over its subtasks, as recorded.
    let calc = fixture_json("flink", "vertex-calc-subtasks-metrics.json");
    let busy = calc
        .as_array()
        .and_then(|m| m.iter().find(|e| e["id"] == "busyTimeMsPerSecond"))
        .expect("busyTimeMsPerSecond in the Calc fixture");
    for stat in ["avg", "max"] {
        assert_eq!(
            value(
                &f,
                "flink_vertex_busy_time_ms_per_second",
                &[("vertex_id", CALC), ("vertex", "Calc[2]"), ("stat", stat)]
            ),
            busy[stat].as_f64(),
            "{stat}"
        );
    }
    // Flink reports the source's busy time as NaN: no series for it.
    assert!(
        points(
            &f,
            "flink_vertex_busy_time_ms_per_second",
            &[("vertex_id", SOURCE)]
        )
        .is_empty()
    );
    assert_eq!(
        value(&f, "flink_vertex_records_out_total", &[("vertex_id", CALC)]),
        Some(50185.0)
    );
    for endpoint in SCRAPE_ENDPOINTS {
        assert_eq!(
            value(&f, "flink_scrape_errors", &[("endpoint", endpoint)]),
            Some(0.0),
            "{endpoint}"
        );
    }
    assert!(
        stats.errors().values().all(|n| *n == 0),
        "{:?}",
        stats.errors()
    );
}

/// A JobManager answering 500 on one endpoint after `/overview`. The plugin never requests
/// `/taskmanagers` (see its README's request list), so the failing endpoint is a job's
/// `/checkpoints`.
#[tokio::test(flavor = "multi_thread")]
async fn flink_counts_a_failing_endpoint_instead_of_failing() {
    let checkpoints = format!("/jobs/{JOB}/checkpoints");
    let server = flink_server(Cluster::Running, std::slice::from_ref(&checkpoints));
    let (mut flink, stats) = start_flink(&server).await;
    let f = collect(&mut flink, "flink, /checkpoints failing").await;

    assert!(server.requests().contains(&checkpoints));
    assert_eq!(
        value(
            &f,
            "flink_scrape_errors",
            &[("endpoint", "job_checkpoints")]
        ),
        Some(1.0)
    );
    for endpoint in SCRAPE_ENDPOINTS.iter().filter(|e| **e != "job_checkpoints") {
        assert_eq!(
            value(&f, "flink_scrape_errors", &[("endpoint", endpoint)]),
            Some(0.0),
            "{endpoint}"
        );
    }
    // Only the checkpoint series are missing.
    assert!(points(&f, "flink_job_checkpoints_completed_total", &[]).is_empty());
    assert_eq!(value(&f, "flink_task_slots", &[]), Some(2.0));
    assert_eq!(value(&f, "flink_jobs", &[("state", "running")]), Some(1.0));
    assert_eq!(
        value(&f, "flink_job_uptime_seconds", &job_labels()),
        Some(50.739)
    );
    assert!(
        value(
            &f,
            "flink_vertex_busy_time_ms_per_second",
            &[("vertex_id", CALC), ("stat", "max")]
        )
        .is_some()
    );
    assert!(
        stats.errors().values().all(|n| *n == 0),
        "{:?}",
        stats.errors()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn flink_after_the_job_was_cancelled() {
    let server = flink_server(Cluster::Cancelled, &[]);
    let (mut flink, _) = start_flink(&server).await;
    let f = collect(&mut flink, "flink, cancelled").await;

    assert_eq!(value(&f, "flink_jobs", &[("state", "running")]), Some(0.0));
    assert_eq!(value(&f, "flink_jobs", &[("state", "canceled")]), Some(1.0));
    let overview = fixture_json("flink", "overview-cancelled.json");
    assert_eq!(
        value(&f, "flink_task_slots_available", &[]),
        overview["slots-available"].as_f64()
    );
    // A finished job gets no per-job or per-vertex requests or series.
    assert_eq!(server.requests(), ["/overview", "/jobs/overview"]);
    assert!(points(&f, "flink_job_state", &[]).is_empty());
    assert!(points(&f, "flink_vertex_parallelism", &[]).is_empty());
    assert_eq!(
        value(&f, "flink_scrape_errors", &[("endpoint", "jobs_overview")]),
        Some(0.0)
    );
}

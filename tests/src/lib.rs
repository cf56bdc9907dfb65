//! Test harness: starts real `picket-aggregator` and `picket-agent` processes on loopback with
//! their own certificates, waits for readiness by polling (never by sleeping a guessed time),
//! and reads back what arrived through `/metrics` and the aggregator's file journal.
//!
//! The binaries must be built first (`cargo build --workspace --bins`; `scripts/test` does
//! it). A missing binary fails the test with that instruction.

pub mod faults;
pub mod hostile;
pub mod journal;
pub mod raw;

pub mod dashboard;
pub mod fixture_http;
pub mod flink;
pub mod servers;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace binaries built alongside this test.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PICKET_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first with `cargo build --workspace --bins` \
         (scripts/test does this), or set PICKET_BIN_DIR",
        path.display()
    );
    path
}

/// Where the test plugins built for wasm32-wasip2 are (`scripts/test` builds them).
pub fn plugin_dir() -> PathBuf {
    let dir = bin_dir()
        .parent()
        .map(|target| target.join("wasm32-wasip2/release"))
        .expect("target dir");
    assert!(
        dir.join("picket_plugin_probe.wasm").exists(),
        "{}/picket_plugin_probe.wasm missing: build the test plugins with \
         `cargo build -p picket-plugin-probe -p picket-plugin-template --target wasm32-wasip2 --release` \
         (scripts/test does)",
        dir.display()
    );
    dir
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal HTTP/1.1 GET for our own loopback endpoints: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    // Our servers may answer chunked; de-chunk crudely but correctly for text bodies.
    let body = if response
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A fleet CA with an aggregator certificate, made by `picket-aggregator certs`.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn create(dir: &Path) -> Pki {
        let dir = dir.join("tls");
        run_ok(
            Command::new(bin("picket-aggregator"))
                .args(["certs", "init", "--dir"])
                .arg(&dir),
        );
        Pki { dir }
    }

    /// Issues an agent certificate; returns (cert, key).
    pub fn issue_agent(&self, name: &str) -> (PathBuf, PathBuf) {
        run_ok(
            Command::new(bin("picket-aggregator"))
                .args(["certs", "issue-agent", name, "--dir"])
                .arg(&self.dir),
        );
        let agents = self.dir.join("agents");
        (
            agents.join(format!("{name}.pem")),
            agents.join(format!("{name}-key.pem")),
        )
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running process whose output goes to a log file; killed when dropped.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).expect("create log file");
        let err = file.try_clone().expect("clone log file");
        cmd.stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .env("RUST_LOG", "info,picket_agent=debug");
        cmd.env_remove("NO_COLOR").env("NO_COLOR", "1");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Process { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        run_ok(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(self.pid().to_string()),
        );
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.signal("TERM");
        wait_for("process exit after SIGTERM", timeout, || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// SIGKILL, as a crash or power cut would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill9();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- log of {} ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Settings for a test aggregator.
pub struct AggregatorSpec<'a> {
    pub pki: Option<&'a Pki>,
    pub mutual_tls: bool,
    pub journal: Option<PathBuf>,
    pub extra: String,
}

/// A running aggregator and the addresses it listens on.
pub struct Aggregator {
    pub process: Process,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub config: PathBuf,
}

impl Aggregator {
    pub fn start(dir: &Path, spec: &AggregatorSpec) -> Aggregator {
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Aggregator::start_on(dir, spec, grpc)
    }

    /// Like [`Aggregator::start`], with gRPC on `grpc` (an address in a test's own network
    /// namespace set-up, say).
    pub fn start_on(dir: &Path, spec: &AggregatorSpec, grpc: SocketAddr) -> Aggregator {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut text = format!("[grpc]\nlisten = \"{grpc}\"\n[http]\nlisten = \"{http}\"\n[tls]\n");
        match spec.pki {
            Some(pki) => {
                text += &format!(
                    "cert = \"{}\"\nkey = \"{}\"\n",
                    pki.dir.join("aggregator.pem").display(),
                    pki.dir.join("aggregator-key.pem").display()
                );
                if spec.mutual_tls {
                    text += &format!("client_ca = \"{}\"\n", pki.ca().display());
                }
            }
            None => text += "insecure = true\n",
        }
        text += &spec.extra;
        if let Some(journal) = &spec.journal {
            text += &format!(
                "\n[[sinks]]\ntype = \"file\"\npath = \"{}\"\n",
                journal.display()
            );
        }
        let config = dir.join(format!("aggregator-{}.toml", grpc.port()));
        std::fs::write(&config, text).expect("write aggregator config");
        let process = Self::spawn(&config, dir, grpc.port());
        let agg = Aggregator {
            process,
            grpc,
            http,
            config,
        };
        agg.wait_ready();
        agg
    }

    fn spawn(config: &Path, dir: &Path, port: u16) -> Process {
        let mut cmd = Command::new(bin("picket-aggregator"));
        cmd.arg("--config").arg(config);
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        Process::spawn(cmd, dir.join(format!("aggregator-{port}-{n}.log")))
    }

    /// A plaintext aggregator (no TLS), optionally journaling to `journal`.
    pub fn start_plaintext(dir: &Path, journal: Option<PathBuf>) -> Aggregator {
        let spec = AggregatorSpec {
            pki: None,
            mutual_tls: false,
            journal,
            extra: String::new(),
        };
        Aggregator::start(dir, &spec)
    }

    /// A TLS aggregator with `pki`'s server certificate; with `mutual_tls`, agents must
    /// present a certificate from the same CA.
    pub fn start_tls(
        dir: &Path,
        pki: &Pki,
        mutual_tls: bool,
        journal: Option<PathBuf>,
    ) -> Aggregator {
        let spec = AggregatorSpec {
            pki: Some(pki),
            mutual_tls,
            journal,
            extra: String::new(),
        };
        Aggregator::start(dir, &spec)
    }

    pub fn wait_ready(&self) {
        wait_for("aggregator /readyz", Duration::from_secs(20), || {
            matches!(http_get(self.http, "/readyz"), Ok((200, _))).then_some(())
        });
    }

    /// SIGKILL and start again on the same ports and config.
    pub fn kill9_and_restart(&mut self, dir: &Path) {
        self.process.kill9();
        self.start_again(dir);
    }

    /// Starts the (stopped or killed) aggregator again on the same ports and config.
    pub fn start_again(&mut self, dir: &Path) {
        self.process = Self::spawn(&self.config, dir, self.grpc.port());
        self.wait_ready();
    }

    /// The sum of `family` over the series whose labels include every one of `labels`
    /// (written `name="value"`), from the aggregator's `/metrics`.
    pub fn metric_sum(&self, family: &str, labels: &[&str]) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| {
                l.strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with('{'))
                    && labels.iter().all(|label| l.contains(label))
            })
            .filter_map(|l| {
                l.rsplit_once('}')?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .sum()
    }

    /// The newest value of agent `instance`'s `name` series that the aggregator received with
    /// a sample timestamp after `after_ms` (from its `/metrics`, which carries timestamps).
    pub fn agent_value_after(&self, name: &str, instance: &str, after_ms: i64) -> Option<f64> {
        let text = self.metrics();
        let label = format!("instance=\"{instance}\"");
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
            .find_map(|l| {
                let mut parts = l.rsplitn(3, ' ');
                let ts: i64 = parts.next()?.parse().ok()?;
                let value: f64 = parts.next()?.parse().ok()?;
                (ts > after_ms).then_some(value)
            })
    }

    pub fn metrics(&self) -> String {
        http_get(self.http, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The value of the first exposition line starting with `prefix` (name plus labels).
    pub fn metric_value(&self, prefix: &str) -> Option<f64> {
        metric_value(&self.metrics(), prefix)
    }
}

/// The value of the first exposition line in `text` that starts with `prefix`.
pub fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l[prefix.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Agent config text pointing at `endpoints`, TLS per `pki` (None: plaintext).
pub fn agent_config(
    instance: &str,
    endpoints: &[String],
    pki: Option<&Pki>,
    client_cert: Option<&(PathBuf, PathBuf)>,
    extra: &str,
) -> String {
    let list = endpoints
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!(
        "instance = \"{instance}\"\ninterval = \"300ms\"\njitter = \"10ms\"\n{extra}\n\
         [batch]\nmax_delay = \"50ms\"\n\
         [aggregator]\nendpoints = [{list}]\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\n\
         shutdown_timeout = \"10s\"\n[aggregator.tls]\n"
    );
    match pki {
        Some(pki) => {
            text += &format!("ca = \"{}\"\n", pki.ca().display());
            if let Some((cert, key)) = client_cert {
                text += &format!(
                    "cert = \"{}\"\nkey = \"{}\"\n",
                    cert.display(),
                    key.display()
                );
            }
        }
        None => text += "insecure = true\n",
    }
    text
}

/// An agent `[spool]` section in `directory`, plus `extra` keys.
pub fn spool_toml(directory: &Path, extra: &str) -> String {
    format!(
        "\n[spool]\ndirectory = \"{}\"\n{extra}\n",
        directory.display()
    )
}

pub fn https(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

pub fn http(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// Starts an agent with `config_text` written to `dir`. Unless the text has a `[spool]`
/// section, the agent's spool goes to `<dir>/spool-<name>` (never the machine's default, which
/// test agents would otherwise share).
pub fn start_agent(dir: &Path, name: &str, config_text: &str) -> (Process, PathBuf) {
    let config = dir.join(format!("agent-{name}.toml"));
    let mut config_text = config_text.to_owned();
    if !config_text.contains("[spool]") {
        config_text += &spool_toml(&dir.join(format!("spool-{name}")), "");
    }
    std::fs::write(&config, config_text).expect("write agent config");
    let mut cmd = Command::new(bin("picket-agent"));
    cmd.arg("--config").arg(&config);
    (
        Process::spawn(cmd, dir.join(format!("agent-{name}.log"))),
        config,
    )
}

/// A first-party plugin's fixture directory in the repository.
pub fn plugin_fixtures(plugin: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins")
        .join(plugin)
        .join("fixtures")
}

/// Copies a directory tree (permissions included, so fixture scripts stay executable).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create fixture copy");
    for entry in std::fs::read_dir(from).expect("read fixture dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy fixture file");
        }
    }
}

/// Copies the rpi plugin's fixtures (a fake `vcgencmd` and a sysfs tree) to `<dir>/rpi` and
/// returns the canonical path: grants are checked on resolved paths.
pub fn copy_rpi_fixtures(dir: &Path) -> PathBuf {
    let rpi_dir = dir.join("rpi");
    copy_tree(&plugin_fixtures("rpi"), &rpi_dir);
    rpi_dir
        .canonicalize()
        .expect("canonical rpi fixture directory")
}

/// An `rpi` plugin instance (agent TOML) running the fake `vcgencmd` in `rpi_dir` (from
/// [`copy_rpi_fixtures`]), granted exactly the four queries the plugin makes.
pub fn fake_rpi_instance(rpi_dir: &Path) -> String {
    let vcgencmd = rpi_dir.join("vcgencmd").display().to_string();
    let exec: Vec<String> = [
        "[\"measure_temp\"]",
        "[\"get_throttled\"]",
        "[\"measure_clock\", \"arm\"]",
        "[\"measure_volts\", \"core\"]",
    ]
    .iter()
    .map(|args| format!("{{ program = \"{vcgencmd}\", args = {args} }}"))
    .collect();
    format!(
        "[[plugins.instances]]\nname = \"rpi\"\nplugin = \"rpi\"\ntimeout = \"20s\"\n\
         settings = {{ vcgencmd = \"{vcgencmd}\", fallback = false }}\n\
         grants = {{ exec = [{}] }}\n",
        exec.join(", ")
    )
}

/// Aggregator TOML for a `prometheus_remote_write` sink called `name`, retrying quickly
/// (50 ms to 500 ms) so tests recover from a database restart in well under a second.
pub fn remote_write_sink_toml(name: &str, url: &str) -> String {
    format!(
        "\n[[sinks]]\ntype = \"prometheus_remote_write\"\nname = \"{name}\"\nurl = \"{url}\"\n\
         [sinks.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"500ms\"\n"
    )
}

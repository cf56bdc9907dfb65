//! Starting what the scenarios measure: the aggregator (release build, TLS, limits raised for
//! 10,000 agents), vmagent and node_exporter, each on loopback with its own files.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use picket_tests::{Aggregator, Pki, Process, bin, free_port, http_get};

/// Binaries are taken from the directory `picket-bench` itself is in (build everything with
/// `--release`), or from `PICKET_BIN_DIR`.
pub fn check_binaries() -> Result<()> {
    for name in ["picket-agent", "picket-aggregator"] {
        let path = picket_tests::bin_dir().join(name);
        if !path.exists() {
            bail!(
                "{} not found: build with `cargo build --release --workspace --bins` and run \
                 target/release/picket-bench (or set PICKET_BIN_DIR)",
                path.display()
            );
        }
    }
    Ok(())
}

/// A fleet CA and the aggregator's certificate (the agents' CA file is `pki.ca()`).
pub fn pki(dir: &Path) -> Result<Pki> {
    check_binaries()?;
    Ok(Pki::create(dir))
}

/// An aggregator with TLS (server certificate only: the simulated agents do not each get a
/// certificate), room for 20,000 connections, and `extra` TOML (sinks) at the end.
pub fn aggregator(dir: &Path, pki: &Pki, extra: &str) -> Result<Aggregator> {
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let text = format!(
        "[grpc]\nlisten = \"{grpc}\"\nmax_connections = 20000\n\
         [http]\nlisten = \"{http}\"\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [queues]\ndirectory = \"{}\"\n{extra}\n",
        pki.dir.join("aggregator.pem").display(),
        pki.dir.join("aggregator-key.pem").display(),
        dir.join("queues").display(),
    );
    let config = dir.join(format!("aggregator-{}.toml", grpc.port()));
    std::fs::write(&config, text)?;
    let mut cmd = Command::new(bin("picket-aggregator"));
    cmd.arg("--config").arg(&config);
    let process = spawn(cmd, dir.join(format!("aggregator-{}.log", grpc.port())))?;
    let agg = Aggregator {
        process,
        grpc,
        http,
        config,
    };
    wait_http(&agg.http, "/readyz", "aggregator", &agg.process)?;
    Ok(agg)
}

/// Starts `cmd` with its output in `log` and the default log level (`info`): the harness's
/// `Process::spawn` turns on debug logging, which benchmarks must not measure.
pub fn spawn(mut cmd: Command, log: std::path::PathBuf) -> Result<Process> {
    let file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    cmd.stdout(file.try_clone()?)
        .stderr(file)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    Ok(Process { child, log })
}

/// Polls `http://addr/path` until it answers 200 (30 s at most).
pub fn wait_http(addr: &SocketAddr, path: &str, what: &str, process: &Process) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if matches!(http_get(*addr, path), Ok((200, _))) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what} not ready at http://{addr}{path} after 30 s; its log:\n{}",
                process.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A peer binary from a Debian package; a clear error naming the package when it is missing.
pub fn require(binary: &str, package: &str) -> Result<std::path::PathBuf> {
    let path = Path::new("/usr/bin").join(binary);
    if path.exists() {
        Ok(path)
    } else {
        Err(anyhow!(
            "{binary} not found: apt-get install {package} (the benchmark compares against it)"
        ))
    }
}

/// vmagent accepting remote write over HTTPS (the aggregator's certificate, so both relays
/// terminate the same TLS) and relaying to `remote_write_url`.
pub fn vmagent(dir: &Path, pki: &Pki, remote_write_url: &str) -> Result<(Process, SocketAddr)> {
    let binary = require("vmagent", "victoria-metrics")?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let data = dir.join(format!("vmagent-{}", addr.port()));
    std::fs::create_dir_all(&data)?;
    let mut cmd = Command::new(binary);
    cmd.arg(format!("-httpListenAddr={addr}"))
        .arg("-tls")
        .arg(format!(
            "-tlsCertFile={}",
            pki.dir.join("aggregator.pem").display()
        ))
        .arg(format!(
            "-tlsKeyFile={}",
            pki.dir.join("aggregator-key.pem").display()
        ))
        .arg(format!("-remoteWrite.url={remote_write_url}"))
        .arg(format!("-remoteWrite.tmpDataPath={}", data.display()))
        .arg("-loggerLevel=ERROR");
    let process = spawn(cmd, dir.join(format!("vmagent-{}.log", addr.port())))?;
    // Readiness over TLS: the harness's HTTPS request with the fleet CA.
    let tls = picket_tests::servers::ClientTls::new(&pki.ca(), None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = picket_tests::servers::https_request(addr, &tls, "GET", "/health", &[], b"");
        if matches!(&probe, Ok(r) if r.status == 200) {
            return Ok((process, addr));
        }
        if Instant::now() > deadline {
            bail!(
                "vmagent not ready after 30 s; its log:\n{}",
                process.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// node_exporter on loopback with its default collectors.
pub fn node_exporter(dir: &Path) -> Result<(Process, SocketAddr)> {
    let binary = require("prometheus-node-exporter", "prometheus-node-exporter")?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let mut cmd = Command::new(binary);
    cmd.arg(format!("--web.listen-address={addr}"));
    let process = spawn(cmd, dir.join(format!("node_exporter-{}.log", addr.port())))?;
    wait_http(&addr, "/metrics", "node_exporter", &process)?;
    Ok((process, addr))
}

/// Waits (polling every 10 ms) until `done` holds; an error naming `what` after `timeout`.
pub async fn until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            return Err(anyhow!("timed out after {timeout:?} waiting for {what}"))
                .context("the machine may be overloaded, or a component stalled");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// `perf record` attached to `pid` while it lives, when `--perf DIR` was given; the profile
/// is `DIR/<name>.perf.data` (`perf report -i` reads it).
pub struct Profiler(Option<Process>);

impl Profiler {
    pub fn attach(settings: &crate::Settings, pid: u32, name: &str) -> Result<Profiler> {
        let Some(dir) = &settings.perf else {
            return Ok(Profiler(None));
        };
        std::fs::create_dir_all(dir)?;
        let perf = require("perf", "linux-perf")?;
        let mut cmd = Command::new(perf);
        // DWARF unwinding: release builds keep no frame pointers, so `-g` alone gives
        // call chains of garbage and no way to tell who calls `memmove` or the allocator.
        cmd.args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-o"])
            .arg(dir.join(format!("{name}.perf.data")))
            .args(["-p", &pid.to_string()]);
        Ok(Profiler(Some(spawn(
            cmd,
            dir.join(format!("{name}.perf.log")),
        )?)))
    }

    /// Stops recording (SIGINT, as perf expects) and waits for the file to be written.
    pub fn finish(mut self) {
        if let Some(mut perf) = self.0.take() {
            perf.signal("INT");
            let deadline = Instant::now() + Duration::from_secs(60);
            while perf.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

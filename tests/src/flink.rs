//! A real Apache Flink 2.3 session cluster for end-to-end tests: one JobManager and one
//! TaskManager (2 slots) on 127.0.0.1 with free ports, started, fed a SQL job and stopped by
//! `tests/flink/start-cluster.sh` (see `tests/flink/README.md`), so the shell workflow and
//! the tests share one way of running Flink.
//!
//! Flink comes from the `apache-flink-libraries` wheel, which `scripts/test` installs under
//! [`DEFAULT_FLINK_HOME`]; `FLINK_HOME` overrides. A missing Flink fails the test with the
//! command that installs it. The cluster is stopped when the [`Flink`] value is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `scripts/test` unpacks the wheel's `pyflink/` directory.
pub const DEFAULT_FLINK_HOME: &str = "/opt/picket-tests/flink/pyflink";

/// The Flink distribution directory (`lib/`, `plugins/`, `bin/bash-java-utils.jar`).
pub fn flink_home() -> PathBuf {
    let home = std::env::var_os("FLINK_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_FLINK_HOME));
    assert!(
        home.join("bin/bash-java-utils.jar").is_file() && home.join("lib").is_dir(),
        "no Apache Flink at {} (FLINK_HOME): run scripts/test, which installs it, or \
         `pip3 install --no-deps --target /opt/picket-tests/flink 'apache-flink-libraries==2.3.0'`; \
         Java 17 (`apt-get install openjdk-17-jdk-headless`) runs it",
        home.display()
    );
    home
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("flink/start-cluster.sh")
}

/// A running cluster; stopped on drop.
pub struct Flink {
    state: PathBuf,
    home: PathBuf,
    rows_per_second: u32,
    extra_config: PathBuf,
    env: BTreeMap<String, String>,
}

impl Flink {
    /// Starts JobManager and TaskManager with `extra_config` (YAML) appended to the generated
    /// `config.yaml`, and waits until the TaskManager registered its slots. The SQL job's
    /// datagen source will produce `rows_per_second`.
    pub fn start(dir: &Path, extra_config: &str, rows_per_second: u32) -> Flink {
        let state = dir.join("flink");
        std::fs::create_dir_all(&state).expect("create the Flink state directory");
        let extra = dir.join("flink-extra-config.yaml");
        std::fs::write(&extra, extra_config).expect("write the extra Flink config");
        let mut flink = Flink {
            state,
            home: flink_home(),
            rows_per_second,
            extra_config: extra,
            env: BTreeMap::new(),
        };
        flink.run("cluster");
        flink.reload_env();
        flink
    }

    /// Submits the SQL job (datagen → filter/projection → blackhole, parallelism 2,
    /// checkpoints every 2 s) and waits until all its tasks run; returns its id.
    pub fn submit(&mut self) -> String {
        self.run("submit");
        self.reload_env();
        self.job_id()
    }

    /// Cancels the submitted job and waits until Flink reports it CANCELED.
    pub fn cancel(&mut self) {
        self.run("cancel");
    }

    /// Stops TaskManager and JobManager (SIGTERM, so reporters get to say goodbye).
    pub fn stop(&mut self) {
        self.run("stop");
    }

    /// Waits until the job completed `n` checkpoints.
    pub fn wait_checkpoints(&self, n: u32) {
        self.run(&format!("wait-checkpoints {n}"));
    }

    pub fn job_id(&self) -> String {
        self.env.get("FLINK_JOB_ID").cloned().unwrap_or_default()
    }

    /// `http://127.0.0.1:<rest port>`.
    pub fn rest_url(&self) -> String {
        self.env["FLINK_REST_URL"].clone()
    }

    /// The PrometheusReporter ports of the JobManager and the TaskManager.
    pub fn reporter_ports(&self) -> (u16, u16) {
        let port = |key: &str| {
            self.env[key]
                .parse()
                .unwrap_or_else(|_| panic!("{key} in cluster.env is not a port"))
        };
        (port("FLINK_JM_PROM_PORT"), port("FLINK_TM_PROM_PORT"))
    }

    /// The directory with `jobmanager.log`, `taskmanager.log` and `client.log`.
    pub fn log_dir(&self) -> PathBuf {
        self.state.join("log")
    }

    fn command(&self, args: &str) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(script())
            .args(args.split_whitespace())
            .env("FLINK_HOME", &self.home)
            .env("PICKET_FLINK_DIR", &self.state)
            .env("PICKET_FLINK_ROWS", self.rows_per_second.to_string())
            .env("PICKET_FLINK_EXTRA_CONFIG", &self.extra_config);
        cmd
    }

    fn run(&self, args: &str) {
        let output = self
            .command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script().display()));
        if !output.status.success() {
            let logs = ["jobmanager.log", "taskmanager.log", "client.log"]
                .iter()
                .map(|name| {
                    let path = self.log_dir().join(name);
                    format!(
                        "---- {} ----\n{}",
                        path.display(),
                        crate::servers::log_tail(&path, 30)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "start-cluster.sh {args} failed ({}):\n{}{}\n{logs}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    fn reload_env(&mut self) {
        let path = self.state.join("cluster.env");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        self.env = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
    }
}

impl Drop for Flink {
    fn drop(&mut self) {
        // Best effort: the script only signals JVMs started from this state directory.
        let _ = self.command("stop").output();
    }
}

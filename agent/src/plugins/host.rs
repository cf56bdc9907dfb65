//! The host functions a plugin can import, each checked against the instance's grants and
//! bounded by its own timeout and size cap.
//!
//! WASI is linked (Rust guests for `wasm32-wasip2` import it through std), but with a context
//! that grants nothing: no preopened directories, no environment, no arguments, no sockets,
//! no name lookups. Output a guest writes to stdout/stderr is discarded.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::picket::plugin::types::HostError;
use super::bindings::picket::plugin::{exec, files, host_stats, http, log, types};
use super::grants::Grants;
use crate::plugin_stats::PluginStats;

/// Everything a plugin instance's store holds.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: MemoryLimiter,
    grants: Arc<Grants>,
    /// `plugin/instance`, for logs.
    pub name: String,
    stats: Arc<PluginStats>,
    /// Denied requests already logged, so a loop of them logs once.
    logged_denials: HashSet<String>,
}

impl HostState {
    pub fn new(
        name: String,
        grants: Arc<Grants>,
        max_memory_bytes: usize,
        stats: Arc<PluginStats>,
    ) -> Self {
        HostState {
            // A builder with nothing added: no files, env, args, network or name lookups.
            wasi: WasiCtx::builder()
                .allow_ip_name_lookup(false)
                .allow_tcp(false)
                .allow_udp(false)
                .build(),
            table: ResourceTable::new(),
            limits: MemoryLimiter {
                max_bytes: max_memory_bytes,
                in_use: 0,
            },
            grants,
            name,
            stats,
            logged_denials: HashSet::new(),
        }
    }

    fn deny(&mut self, what: String, how_to_grant: String) -> HostError {
        self.stats.count_error("denied");
        if self.logged_denials.len() < 64 && self.logged_denials.insert(what.clone()) {
            tracing::warn!(plugin = %self.name, request = %what,
                "plugin call denied: not granted; to allow it add {how_to_grant} to this instance's [plugins.instances.grants]");
        }
        HostError::Denied(format!("{what} is not granted (add {how_to_grant})"))
    }
}

impl HostState {
    /// Linear memory the instance has grown to, in bytes.
    pub fn memory_in_use(&self) -> usize {
        self.limits.in_use
    }
}

/// Caps the linear memory of one plugin instance. Growing past the cap traps (rather than
/// failing `memory.grow`), so a memory bomb ends the call at once and is reported as such.
pub struct MemoryLimiter {
    max_bytes: usize,
    in_use: usize,
}

/// Most table elements an instance may hold; generous for any real plugin.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.in_use.saturating_sub(current).saturating_add(desired);
        if total > self.max_bytes {
            return Err(wasmtime::Error::msg(format!(
                "memory limit exceeded: wanted {total} bytes, the cap is {} (max_memory_mb)",
                self.max_bytes
            )));
        }
        self.in_use = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        16
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        4
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl log::Host for HostState {
    async fn write(&mut self, level: log::Level, message: String) {
        if !self.grants.log_allowed() {
            return;
        }
        // Bounded so a plugin cannot write megabytes per line into the agent's log.
        let message: String = message.chars().take(4096).collect();
        let plugin = self.name.as_str();
        match level {
            log::Level::Error => tracing::error!(%plugin, "{message}"),
            log::Level::Warn => tracing::warn!(%plugin, "{message}"),
            log::Level::Info => tracing::info!(%plugin, "{message}"),
            log::Level::Debug => tracing::debug!(%plugin, "{message}"),
        }
    }
}

impl files::Host for HostState {
    async fn read(&mut self, path: String) -> Result<Vec<u8>, HostError> {
        if !self.grants.read_allows(&path) {
            return Err(self.deny(
                format!("read-file {path}"),
                format!("read_file = [\"{path}\"]"),
            ));
        }
        let cap = self.grants.read_file_max_bytes();
        let read = async {
            let file = tokio::fs::File::open(&path).await?;
            let mut buf = Vec::new();
            // One byte past the cap tells "exactly at the cap" from "too large".
            file.take(cap as u64 + 1).read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        match tokio::time::timeout(super::grants::DEFAULT_HOST_CALL_TIMEOUT, read).await {
            Err(_) => Err(HostError::Timeout),
            Ok(Err(e)) => Err(HostError::Failed(format!("{path}: {e}"))),
            Ok(Ok(buf)) if buf.len() > cap => Err(HostError::TooLarge),
            Ok(Ok(buf)) => Ok(buf),
        }
    }

    async fn glob(&mut self, pattern: String) -> Result<Vec<String>, HostError> {
        // The pattern itself must be granted (verbatim or inside a granted glob) and every
        // result is checked again, so a broad pattern cannot list beyond the grants.
        let granted = self.grants.read_file.iter().any(|g| g == &pattern)
            || self.grants.read_allows(&pattern);
        if !granted {
            return Err(self.deny(
                format!("glob {pattern}"),
                format!("read_file = [\"{pattern}\"]"),
            ));
        }
        let grants = self.grants.clone();
        let listed = tokio::task::spawn_blocking(move || {
            let paths = glob::glob_with(&pattern, super::grants::GLOB_OPTIONS)
                .map_err(|e| HostError::Failed(format!("bad pattern: {e}")))?;
            Ok::<_, HostError>(
                paths
                    .filter_map(Result::ok)
                    .filter_map(|p| p.to_str().map(str::to_owned))
                    .filter(|p| grants.read_allows(p))
                    .take(10_000)
                    .collect::<Vec<_>>(),
            )
        });
        match tokio::time::timeout(super::grants::DEFAULT_HOST_CALL_TIMEOUT, listed).await {
            Err(_) => Err(HostError::Timeout),
            Ok(Err(e)) => Err(HostError::Failed(e.to_string())),
            Ok(Ok(result)) => result,
        }
    }
}

impl exec::Host for HostState {
    async fn run(&mut self, program: String, args: Vec<String>) -> Result<exec::Output, HostError> {
        if !self.grants.exec_allows(&program, &args) {
            let what = format!("exec {program} {}", args.join(" "));
            let how = format!("exec = [{{ program = {program:?}, args = {args:?} }}]");
            return Err(self.deny(what, how));
        }
        let cap = self.grants.exec_max_output_bytes();
        let mut child = tokio::process::Command::new(&program)
            .args(&args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| HostError::Failed(format!("{program}: {e}")))?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(HostError::Failed("no pipes to the child".into()));
        };
        let run = async {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let mut stdout = stdout.take(cap as u64 + 1);
            let mut stderr = stderr.take(cap as u64 + 1);
            let (o, e) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
            o.and(e).map_err(|e| HostError::Failed(e.to_string()))?;
            if out.len() > cap || err.len() > cap {
                return Err(HostError::TooLarge);
            }
            let status = child
                .wait()
                .await
                .map_err(|e| HostError::Failed(e.to_string()))?;
            Ok(exec::Output {
                exit_code: status.code(),
                stdout: out,
                stderr: err,
            })
        };
        // On timeout or a too-large answer, dropping the child kills it.
        match tokio::time::timeout(self.grants.exec_timeout(), run).await {
            Err(_) => {
                self.stats.count_error("host_timeout");
                Err(HostError::Timeout)
            }
            Ok(result) => result,
        }
    }
}

impl http::Host for HostState {
    async fn get(
        &mut self,
        url: String,
        headers: Vec<(String, String)>,
    ) -> Result<http::Response, HostError> {
        if !self.grants.http_allows(&url) {
            let prefix = url.split('/').take(3).collect::<Vec<_>>().join("/") + "/";
            return Err(self.deny(
                format!("http GET {url}"),
                format!("http.allow = [\"{prefix}\"]"),
            ));
        }
        let timeout = self.grants.http_timeout();
        let cap = self.grants.http_max_bytes();
        match tokio::time::timeout(timeout, super::http_client::get(&url, &headers, cap)).await {
            Err(_) => {
                self.stats.count_error("host_timeout");
                Err(HostError::Timeout)
            }
            Ok(result) => result,
        }
    }
}

impl host_stats::Host for HostState {
    async fn read(&mut self) -> Result<host_stats::Snapshot, HostError> {
        if !self.grants.host_stats {
            return Err(self.deny("host-stats".into(), "host_stats = true".into()));
        }
        let snapshot = tokio::task::spawn_blocking(super::stats_snapshot::take);
        match tokio::time::timeout(Duration::from_secs(10), snapshot).await {
            Err(_) => Err(HostError::Timeout),
            Ok(Err(e)) => Err(HostError::Failed(e.to_string())),
            Ok(Ok(s)) => Ok(s),
        }
    }
}

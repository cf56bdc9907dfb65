//! The host functions a plugin can import, each checked against the instance's grants and
//! bounded by its own timeout and size cap.
//!
//! WASI is linked (Rust guests for `wasm32-wasip2` import it through std), but with a context
//! that grants nothing: no preopened directories, no environment, no arguments, no sockets,
//! no name lookups. Output a guest writes to stdout/stderr is discarded.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, ResourceTable, WasmList, WasmStr};
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
    /// Wall-clock deadline of the call in progress (see `runtime.rs`).
    pub deadline: Option<std::time::Instant>,
    /// Log lines left in the current minute; a chatty plugin cannot flood the agent's log.
    log_budget: (std::time::Instant, u32),
}

/// Log lines one plugin instance may write per minute.
const LOG_LINES_PER_MINUTE: u32 = 120;

/// Longest text from a plugin (log line, error) the agent repeats, in characters.
pub const MAX_PLUGIN_TEXT: usize = 1024;

/// Makes plugin-provided text safe to log: bounded, and with control characters (newlines
/// that could fake log lines, terminal escapes) escaped.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_PLUGIN_TEXT));
    for c in text.chars().take(MAX_PLUGIN_TEXT) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if text.chars().nth(MAX_PLUGIN_TEXT).is_some() {
        out.push('…');
    }
    out
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
            deadline: None,
            log_budget: (std::time::Instant::now(), LOG_LINES_PER_MINUTE),
        }
    }

    fn deny(&mut self, what: String, how_to_grant: String) -> HostError {
        let what = sanitize(&what);
        let how_to_grant = sanitize(&how_to_grant);
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

/// The error the limiter raises; recognised by type, never by message text (which a guest's
/// backtrace could imitate).
#[derive(Debug, thiserror::Error)]
#[error("memory limit exceeded: wanted {wanted} bytes, the cap is {cap} (max_memory_mb)")]
pub struct MemoryLimitExceeded {
    pub wanted: usize,
    pub cap: usize,
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
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                wanted: total,
                cap: self.max_bytes,
            }));
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
        let (since, left) = &mut self.log_budget;
        if since.elapsed() >= Duration::from_secs(60) {
            *since = std::time::Instant::now();
            *left = LOG_LINES_PER_MINUTE;
        }
        if *left == 0 {
            self.stats.count_error("log_dropped");
            return;
        }
        *left -= 1;
        let message = sanitize(&message);
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
        let grants = self.grants.clone();
        let read = async {
            // A symlink inside a granted directory must not lead outside the grants: the
            // resolved path is checked too.
            let real = tokio::fs::canonicalize(&path).await?;
            if !real.to_str().is_some_and(|r| grants.read_allows(r)) {
                return Ok(Err(format!("{} (the target of {path})", real.display())));
            }
            // Non-blocking open: a FIFO must not hang the call; only regular files are read.
            let file = tokio::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
                .open(&real)
                .await?;
            if !file.metadata().await?.is_file() {
                return Err(std::io::Error::other("not a regular file"));
            }
            // A directory on the resolved path could have been swapped for a symlink between
            // resolving and opening: check what was actually opened, by its descriptor.
            let opened =
                tokio::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).await?;
            if !opened.to_str().is_some_and(|o| grants.read_allows(o)) {
                return Ok(Err(format!("{} (the target of {path})", opened.display())));
            }
            let mut buf = Vec::new();
            // One byte past the cap tells "exactly at the cap" from "too large".
            file.take(cap as u64 + 1).read_to_end(&mut buf).await?;
            Ok(Ok(buf))
        };
        match tokio::time::timeout(super::grants::DEFAULT_HOST_CALL_TIMEOUT, read).await {
            Err(_) => Err(HostError::Timeout),
            Ok(Err(e)) => Err(HostError::Failed(format!("{path}: {e}"))),
            Ok(Ok(Err(target))) => Err(self.deny(
                format!("read-file {target}"),
                format!("read_file = [\"{target}\"]"),
            )),
            Ok(Ok(Ok(buf))) if buf.len() > cap => Err(HostError::TooLarge),
            Ok(Ok(Ok(buf))) => Ok(buf),
        }
    }

    async fn glob(&mut self, pattern: String) -> Result<Vec<String>, HostError> {
        // The pattern itself must be granted (verbatim or inside a granted glob) and every
        // result is checked again, so a broad pattern cannot list beyond the grants.
        // Only a granted glob, verbatim, may be listed: `**` or a wider pattern that happens
        // to match a grant's text would let the walk wander (/proc/*/root loops).
        let granted =
            !pattern.contains("**") && self.grants.read_file.iter().any(|g| g == &pattern);
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
                    // Bounded by entries visited, not only by results kept.
                    .take(10_000)
                    .filter_map(Result::ok)
                    .filter_map(|p| p.to_str().map(str::to_owned))
                    .filter(|p| grants.read_allows(p))
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

/// Most arguments an `exec` call may pass, and their total size in bytes.
pub const MAX_EXEC_ARGS: usize = 64;
pub const MAX_EXEC_ARG_BYTES: usize = 16 * 1024;
/// Most request headers an `http` call may pass, and the size of each (name and value).
pub const MAX_HTTP_HEADERS: usize = 32;
pub const MAX_HTTP_HEADER_BYTES: usize = 8 * 1024;

/// Registers `exec.run` and `http.get` by hand rather than through the generated bindings.
///
/// Why: the generated glue copies a `list<string>` argument element by element before the
/// host sees it, and a plugin can point every element at the same large buffer, so a list
/// of a million aliased entries would make the agent copy terabytes. Here the lists arrive
/// unlifted (`WasmList`/`WasmStr`), their counts and sizes are checked first, and only then
/// is anything copied.
pub fn add_bounded_imports(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker
        .instance("picket:plugin/exec@0.2.0")?
        .func_wrap_async(
            "run",
            |mut store: StoreContextMut<'_, HostState>,
             (program, args): (WasmStr, WasmList<WasmStr>)| {
                let lifted = lift_exec_args(&mut store, &program, &args);
                Box::new(async move {
                    let result = match lifted {
                        Ok((program, args)) => store.data_mut().exec_run(program, args).await,
                        Err(e) => Err(e),
                    };
                    Ok((result,))
                })
            },
        )?;
    linker
        .instance("picket:plugin/http@0.2.0")?
        .func_wrap_async(
            "get",
            |mut store: StoreContextMut<'_, HostState>,
             (url, headers): (WasmStr, WasmList<(WasmStr, WasmStr)>)| {
                let lifted = lift_http_request(&mut store, &url, &headers);
                Box::new(async move {
                    let result = match lifted {
                        Ok((url, headers)) => store.data_mut().http_get(url, headers).await,
                        Err(e) => Err(e),
                    };
                    Ok((result,))
                })
            },
        )?;
    Ok(())
}

/// Longest program path or URL a plugin may pass.
const MAX_TARGET_BYTES: usize = 8 * 1024;

/// Copies a guest string out, refusing it before the copy when it is longer than `max`
/// bytes (the guest's bytes are only borrowed until then).
fn lift_at_most(
    store: &StoreContextMut<'_, HostState>,
    text: &WasmStr,
    max: usize,
) -> Result<String, HostError> {
    let borrowed = text
        .to_str(store)
        .map_err(|e| HostError::Failed(format!("argument is not valid UTF-8: {e}")))?;
    if borrowed.len() > max {
        return Err(HostError::TooLarge);
    }
    Ok(borrowed.into_owned())
}

fn lift_exec_args(
    store: &mut StoreContextMut<'_, HostState>,
    program: &WasmStr,
    args: &WasmList<WasmStr>,
) -> Result<(String, Vec<String>), HostError> {
    if args.len() > MAX_EXEC_ARGS {
        return Err(HostError::TooLarge);
    }
    let mut lifted = Vec::with_capacity(args.len());
    let mut left = MAX_EXEC_ARG_BYTES;
    for i in 0..args.len() {
        let Some(arg) = args.get(&mut *store, i) else {
            break;
        };
        let arg = arg.map_err(|e| HostError::Failed(format!("bad argument list: {e}")))?;
        let arg = lift_at_most(store, &arg, left)?;
        left -= arg.len();
        lifted.push(arg);
    }
    Ok((lift_at_most(store, program, MAX_TARGET_BYTES)?, lifted))
}

fn lift_http_request(
    store: &mut StoreContextMut<'_, HostState>,
    url: &WasmStr,
    headers: &WasmList<(WasmStr, WasmStr)>,
) -> Result<(String, Vec<(String, String)>), HostError> {
    if headers.len() > MAX_HTTP_HEADERS {
        return Err(HostError::TooLarge);
    }
    let mut lifted = Vec::with_capacity(headers.len());
    for i in 0..headers.len() {
        let Some(header) = headers.get(&mut *store, i) else {
            break;
        };
        let (name, value) =
            header.map_err(|e| HostError::Failed(format!("bad header list: {e}")))?;
        let name = lift_at_most(store, &name, MAX_HTTP_HEADER_BYTES)?;
        let value = lift_at_most(store, &value, MAX_HTTP_HEADER_BYTES - name.len())?;
        lifted.push((name, value));
    }
    Ok((lift_at_most(store, url, MAX_TARGET_BYTES)?, lifted))
}

impl HostState {
    async fn exec_run(
        &mut self,
        program: String,
        args: Vec<String>,
    ) -> Result<exec::Output, HostError> {
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
            // Its own process group, so a timeout kills grandchildren too.
            .process_group(0)
            .spawn()
            .map_err(|e| HostError::Failed(format!("{program}: {e}")))?;
        let group = child.id();
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
        let result = tokio::time::timeout(self.grants.exec_timeout(), run).await;
        if !matches!(result, Ok(Ok(_))) {
            // Timed out or answered too much: end the whole group, not only the child.
            if let Some(pid) = group.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: killpg only sends a signal, to the group this call created.
                unsafe {
                    libc::killpg(pid, libc::SIGKILL);
                }
            }
        }
        match result {
            Err(_) => {
                self.stats.count_error("host_timeout");
                Err(HostError::Timeout)
            }
            Ok(result) => result,
        }
    }
}

impl HostState {
    async fn http_get(
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
        // The plugin may not steer the request elsewhere (Host) or around the body cap
        // (framing headers); their number and size were bounded when they were lifted.
        const REFUSED: &[&str] = &[
            "host",
            "connection",
            "transfer-encoding",
            "content-length",
            "upgrade",
            "te",
            "trailer",
            "proxy-authorization",
            "proxy-connection",
        ];
        let headers: Vec<(String, String)> = headers
            .into_iter()
            .filter(|(name, _)| !REFUSED.contains(&name.to_ascii_lowercase().as_str()))
            .collect();
        let timeout = self.grants.http_timeout();
        let cap = self.grants.http_max_bytes();
        match tokio::time::timeout(
            timeout,
            super::http_client::get(&url, &headers, cap, self.grants.http.ca.as_deref()),
        )
        .await
        {
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
        // One snapshot at a time in the whole agent: a read stuck in the kernel (a dead
        // mount) keeps holding the permit, so it ties up one blocking thread, not one more
        // per call; later calls wait for the permit and time out.
        static ONE_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
        let snapshot = async {
            let permit = ONE_AT_A_TIME
                .acquire()
                .await
                .map_err(|e| HostError::Failed(e.to_string()))?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                super::stats_snapshot::take()
            })
            .await
            .map_err(|e| HostError::Failed(e.to_string()))
        };
        match tokio::time::timeout(super::grants::DEFAULT_HOST_CALL_TIMEOUT, snapshot).await {
            Err(_) => {
                self.stats.count_error("host_timeout");
                Err(HostError::Timeout)
            }
            Ok(result) => result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_text_is_bounded_and_cannot_fake_log_lines() {
        assert_eq!(
            sanitize("ok\nFAKE INFO agent: all good\x1b[31m"),
            "ok\\nFAKE INFO agent: all good\\u{1b}[31m"
        );
        let long = "x".repeat(5000);
        assert_eq!(sanitize(&long).chars().count(), MAX_PLUGIN_TEXT + 1);
    }
}

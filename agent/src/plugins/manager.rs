//! Runs the plugin instances the config asks for and keeps them in step with it.
//!
//! - At start and on every config reload (SIGHUP) it compares the wanted instances with the
//!   running ones: new ones start, removed ones stop (their series go stale at once), and
//!   ones whose settings, grants, limits or schedule changed restart with the new values.
//! - Every `plugins.watch_interval` it checks the files of custom plugins; a file that was
//!   added or replaced is compiled, and only when that works are its instances restarted on
//!   the new code. A file that does not compile leaves the running code in place (and says
//!   so), so a half-copied or broken upload never takes a working collector down.
//!
//! Components are compiled once per (code, stack cap) and shared by all instances of them.
//!
//! Once the instances it started have collected, it gives back the memory starting them used
//! and the steady state does not: it drops the mapped read-only pages of the agent's binary
//! and libraries, and of the plugins' compiled code where that is mapped from a file
//! (`code_file.rs`), so that only what runs afterwards maps back ([`crate::image_pages`]),
//! and returns the heap glibc keeps after compiling.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use picket_core::model::{Family, now_ms};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::catalog::{self, FileStamp, Origin, PluginCode};
use super::compiler::Compiler;
use super::config::{InstanceConfig, PluginsConfig};
use super::runtime::{Compiled, PluginError, Runtime};
use super::supervisor::{InstanceTask, run_instance};
use crate::config::AgentConfig;
use crate::sources::StalenessTracker;
use crate::stats::AgentStats;

struct Running {
    config: InstanceConfig,
    interval: Duration,
    stack_bytes: usize,
    code: PluginCode,
    stop: watch::Sender<bool>,
    task: JoinHandle<StalenessTracker>,
}

pub struct PluginManager {
    runtime: Arc<Runtime>,
    stats: Arc<AgentStats>,
    rounds: mpsc::Sender<Vec<Family>>,
    running: HashMap<String, Running>,
    /// Compiled components by (code digest, stack cap).
    compiled: HashMap<([u8; 32], usize), Compiled>,
    /// Instances that could not start because their file was missing or did not compile,
    /// with the file's stamp then (`None`: missing). Retried when the file changes, so
    /// adding the file later starts them; the failure is logged once, not every check.
    waiting: HashMap<String, Option<FileStamp>>,
    /// When to try again after the compiler itself failed (crashed, killed, hung), and the
    /// wait after that one: the code may be fine, and embedded plugins have no file an
    /// operator could replace to trigger a retry.
    compiler_retry: Option<Instant>,
    compiler_backoff: Duration,
    /// `plugins.watch_interval` of the config applied last: the first retry's wait.
    watch_interval: Duration,
    /// When to give back what starting instances left resident: after the instances started
    /// last have collected at least once.
    settle_at: Option<tokio::time::Instant>,
}

/// The longest wait, after instances start, before the memory starting them used is given
/// back: an instance collecting every ten minutes has long collected once by then.
const MAX_SETTLE_WAIT: Duration = Duration::from_secs(60);

/// The longest wait between retries after the compiler failed.
const MAX_COMPILER_BACKOFF: Duration = Duration::from_secs(300);

impl PluginManager {
    pub fn new(
        runtime: Arc<Runtime>,
        stats: Arc<AgentStats>,
        rounds: mpsc::Sender<Vec<Family>>,
    ) -> Self {
        PluginManager {
            runtime,
            stats,
            rounds,
            running: HashMap::new(),
            compiled: HashMap::new(),
            waiting: HashMap::new(),
            compiler_retry: None,
            compiler_backoff: Duration::ZERO,
            watch_interval: PluginsConfig::default().watch_interval,
            settle_at: None,
        }
    }

    /// Keeps the instances in step with `config` and the plugin files until `stop`; then
    /// stops every instance (without stale markers: the agent is going away, not the series).
    pub async fn run(
        mut self,
        mut config: watch::Receiver<Arc<AgentConfig>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let current = Arc::clone(&config.borrow_and_update());
        self.apply(&current).await;
        // Also with no instance at all: the loader's tables and the set-up code go either way.
        self.settle_after(current.interval);
        let mut watch_interval = current.plugins.watch_interval;
        loop {
            tokio::select! {
                // Mapped to (): the guard `wait_for` returns must not live across the awaits
                // in the other branches.
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
                _ = until(self.settle_at) => {
                    self.settle_at = None;
                    self.give_back_start_up_memory().await;
                }
                changed = config.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = Arc::clone(&config.borrow_and_update());
                    watch_interval = current.plugins.watch_interval;
                    self.apply(&current).await;
                }
                _ = tokio::time::sleep(watch_interval) => {
                    let current = Arc::clone(&config.borrow());
                    self.reload_changed_files(&current).await;
                }
            }
        }
        // Stop all at once, then wait for all: shutdown takes the slowest instance's time,
        // not the sum.
        let running: Vec<Running> = self.running.drain().map(|(_, r)| r).collect();
        for r in &running {
            let _ = r.stop.send(true);
        }
        for r in running {
            if let Err(e) = r.task.await {
                tracing::error!(instance = %r.config.name, error = %e, "plugin supervisor failed");
            }
        }
    }

    /// Starts, stops and restarts instances so that what runs is what `config` says.
    pub async fn apply(&mut self, config: &AgentConfig) {
        let plugins = &config.plugins;
        self.watch_interval = plugins.watch_interval;
        let wanted = plugins.effective_instances();
        let removed: Vec<String> = self
            .running
            .keys()
            .filter(|name| !wanted.iter().any(|w| &w.name == *name))
            .cloned()
            .collect();
        for name in removed {
            if let Some(running) = self.running.remove(&name) {
                tracing::info!(instance = %name, "plugin instance removed from the config; stopping it");
                self.stop_and_mark_stale(running).await;
            }
        }
        let stats = self.stats.clone();
        self.waiting.retain(|name, _| {
            let keep = wanted.iter().any(|w| &w.name == name);
            if !keep {
                stats.unregister_instance(name);
            }
            keep
        });
        for instance in wanted {
            let interval = instance.interval.unwrap_or(config.interval);
            let stack_bytes = plugins.stack_bytes(&instance);
            if let Some(running) = self.running.get(&instance.name) {
                // A custom plugin must still come from the configured directory.
                let same_source = match &running.code.origin {
                    Origin::Embedded => true,
                    Origin::File(path) => {
                        catalog::file_path(&instance.plugin, plugins.directory.as_deref())
                            .is_ok_and(|p| &p == path)
                    }
                };
                let same = running.config == instance
                    && running.interval == interval
                    && running.stack_bytes == stack_bytes
                    && same_source;
                if same {
                    continue;
                }
                tracing::info!(instance = %instance.name, "plugin instance settings changed; restarting it");
            }
            let code = match catalog::load(&instance.plugin, plugins.directory.as_deref()) {
                Ok(code) => code,
                Err(e) => {
                    if self.waiting.insert(instance.name.clone(), None).is_none() {
                        let stats = self.stats.register_plugin(&instance.plugin, &instance.name);
                        stats.count_error("compile");
                        tracing::error!(instance = %instance.name, error = %e,
                            "plugin instance not started; it starts when its file appears");
                    }
                    continue;
                }
            };
            self.start(instance, interval, stack_bytes, code).await;
        }
    }

    /// Restarts the instances whose plugin file was replaced since it was read, and starts
    /// the waiting ones whose file appeared or changed.
    pub async fn reload_changed_files(&mut self, config: &AgentConfig) {
        let directory = config.plugins.directory.as_deref();
        let wanted = config.plugins.effective_instances();
        let compiler_retry_due = self.compiler_retry.is_some_and(|due| Instant::now() >= due);
        if compiler_retry_due {
            self.compiler_retry = None;
        }
        let retry = compiler_retry_due
            || self.waiting.iter().any(|(name, seen)| {
                let now = wanted
                    .iter()
                    .find(|w| &w.name == name)
                    .and_then(|w| catalog::file_path(&w.plugin, directory).ok())
                    .and_then(|path| FileStamp::of(&path).ok());
                now.is_some() && now != *seen
            });
        if retry {
            self.apply(config).await;
        }
        if self.compiler_retry.is_some() {
            // The compiler is failing: replaced files wait for the same backoff.
            return;
        }
        let mut changed = Vec::new();
        for (name, running) in &self.running {
            let Origin::File(path) = &running.code.origin else {
                continue;
            };
            let now = FileStamp::of(path).ok();
            if now.is_some() && now != running.code.stamp {
                changed.push(name.clone());
            }
        }
        for name in changed {
            let Some(running) = self.running.get(&name) else {
                continue;
            };
            let (config, interval, stack_bytes, digest) = (
                running.config.clone(),
                running.interval,
                running.stack_bytes,
                running.code.digest,
            );
            let code = match catalog::load(&config.plugin, directory) {
                Ok(code) => code,
                Err(e) => {
                    tracing::warn!(instance = %name, error = %e, "plugin file changed but cannot be read; keeping the running code");
                    continue;
                }
            };
            let remember_stamp = |manager: &mut Self| {
                if let Some(running) = manager.running.get_mut(&name) {
                    running.code.stamp = code.stamp;
                }
            };
            if code.digest == digest {
                // Touched, not changed: remember the new stamp and carry on.
                remember_stamp(self);
                continue;
            }
            if let Err(e) = self.compile(&code, stack_bytes).await {
                if matches!(e, PluginError::Compiler(_)) {
                    // The code may be fine: leave the stamp, so the file counts as replaced
                    // again once the backoff is over.
                    let retry_in = self.retry_after_compiler_failure();
                    tracing::warn!(instance = %name, file = %code.origin, error = %e, ?retry_in,
                        "cannot compile the replaced plugin file now; the instance keeps running the previous code and the file is tried again");
                    continue;
                }
                remember_stamp(self);
                let stats = self.stats.register_plugin(&config.plugin, &name);
                stats.count_error(e.kind());
                tracing::error!(instance = %name, file = %code.origin, error = %e,
                    "the replaced plugin file does not compile; the instance keeps running the previous code");
                continue;
            }
            tracing::info!(instance = %name, file = %code.origin, sha256 = %catalog::hex(&code.digest),
                "plugin file replaced; reloading the instance");
            self.start(config, interval, stack_bytes, code).await;
        }
        // Drop compiled code no instance uses any more.
        let in_use: Vec<_> = self
            .running
            .values()
            .map(|r| (r.code.digest, r.stack_bytes))
            .collect();
        self.compiled.retain(|key, _| in_use.contains(key));
    }

    async fn compile(
        &mut self,
        code: &PluginCode,
        stack_bytes: usize,
    ) -> Result<Compiled, super::runtime::PluginError> {
        let key = (code.digest, stack_bytes);
        if let Some(compiled) = self.compiled.get(&key) {
            return Ok(compiled.clone());
        }
        let compiled = self
            .runtime
            .compile_async(code.wasm.clone(), stack_bytes)
            .await?;
        self.compiled.insert(key, compiled.clone());
        self.compiler_backoff = Duration::ZERO;
        release_freed_memory();
        Ok(compiled)
    }

    /// Schedules [`Self::give_back_start_up_memory`] for when instances collecting every
    /// `interval` have collected once more after starting (they collect first right away).
    fn settle_after(&mut self, interval: Duration) {
        let at = tokio::time::Instant::now() + (interval + interval / 2).min(MAX_SETTLE_WAIT);
        self.settle_at = Some(self.settle_at.map_or(at, |due| due.max(at)));
    }

    /// Drops the mapped read-only pages of the agent's binary and libraries, and of the
    /// plugins' compiled code where it is mapped from a file, most of them mapped by
    /// start-up (the steady state maps back what it runs), and returns the heap compiling
    /// freed. On a blocking thread: it reads files and `/proc`.
    async fn give_back_start_up_memory(&self) {
        // Held until the release is done, so that no image goes away (and its addresses get
        // reused) meanwhile.
        // Only code mapped from a file: dropping pages of code in anonymous memory would
        // destroy it (and under qemu-user, where the agent compiles in its own process,
        // pagemap cannot be relied on to show it as the process's own).
        let compiled: Vec<Compiled> = self
            .compiled
            .values()
            .filter(|c| c.is_mapped())
            .cloned()
            .collect();
        let released = tokio::task::spawn_blocking(move || {
            release_freed_memory();
            let loaded_objects = crate::image_pages::release();
            let images: Vec<_> = compiled
                .iter()
                .map(|c| {
                    let range = c.code_range();
                    range.start as usize..range.end as usize
                })
                .collect();
            // SAFETY: each range is a loaded component's image, which wasmtime maps
            // read-only, and `compiled` keeps them all mapped until this returns.
            let code = unsafe { crate::image_pages::release_mapped_code(&images) };
            drop(compiled);
            (loaded_objects, code)
        })
        .await
        .unwrap_or_default();
        let (released, code) = released;
        AgentStats::add(
            &self.stats.released_image_bytes,
            (released.bytes + code.bytes) as u64,
        );
        // picket-bench's symbol-order training waits for this message (START_UP_OVER in
        // tests/bench/src/symbol_order.rs): change both together.
        tracing::info!(
            bytes = released.bytes,
            plugin_code_bytes = code.bytes,
            written_pages_kept = released.written_pages_kept,
            pagemap_usable = released.pagemap_usable,
            "dropped the mapped read-only pages of the agent's binary and libraries"
        );
    }

    /// Schedules another attempt after the compiler failed: after `watch_interval` first,
    /// then twice as long each time, up to [`MAX_COMPILER_BACKOFF`].
    fn retry_after_compiler_failure(&mut self) -> Duration {
        self.compiler_backoff = (self.compiler_backoff * 2)
            .max(self.watch_interval)
            .min(MAX_COMPILER_BACKOFF);
        let due = Instant::now() + self.compiler_backoff;
        self.compiler_retry = Some(self.compiler_retry.map_or(due, |d| d.min(due)));
        self.compiler_backoff
    }

    /// Starts `instance` on `code`, replacing (and handing over from) a running one of the
    /// same name.
    async fn start(
        &mut self,
        instance: InstanceConfig,
        interval: Duration,
        stack_bytes: usize,
        code: PluginCode,
    ) {
        let stats = self.stats.register_plugin(&instance.plugin, &instance.name);
        let compiled = match self.compile(&code, stack_bytes).await {
            Ok(compiled) => compiled,
            Err(e @ PluginError::Compiler(_)) => {
                stats.count_error(e.kind());
                let retry_in = self.retry_after_compiler_failure();
                tracing::warn!(instance = %instance.name, plugin = %code.origin, error = %e, ?retry_in,
                    "plugin instance not started: the compiler failed; trying again");
                return;
            }
            Err(e) => {
                if self.waiting.insert(instance.name.clone(), code.stamp) != Some(code.stamp) {
                    stats.count_error(e.kind());
                    tracing::error!(instance = %instance.name, plugin = %code.origin, error = %e,
                        "plugin instance not started: its code does not compile; it starts when the file is replaced");
                }
                return;
            }
        };
        self.waiting.remove(&instance.name);
        let staleness = match self.running.remove(&instance.name) {
            Some(previous) => {
                let _ = previous.stop.send(true);
                if previous.config.plugin != instance.plugin {
                    // Health series are keyed by plugin too: end the old plugin's.
                    self.stats
                        .unregister_plugin(&previous.config.plugin, &previous.config.name);
                }
                match previous.task.await {
                    Ok(staleness) => staleness,
                    Err(e) => {
                        tracing::error!(instance = %instance.name, error = %e, "plugin supervisor failed; its series will expire at the aggregator");
                        StalenessTracker::default()
                    }
                }
            }
            None => StalenessTracker::default(),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = InstanceTask {
            compiled,
            config: instance.clone(),
            interval,
            stats,
            agent_stats: self.stats.clone(),
            staleness,
        };
        let handle = tokio::spawn(run_instance(task, self.rounds.clone(), stop_rx));
        self.settle_after(interval);
        tracing::info!(instance = %instance.name, plugin = %instance.plugin, code = %code.origin, ?interval, "plugin instance started");
        self.running.insert(
            instance.name.clone(),
            Running {
                config: instance,
                interval,
                stack_bytes,
                // Compiled now: keep what identifies the code, not its bytes.
                code: PluginCode {
                    wasm: bytes::Bytes::new(),
                    ..code
                },
                stop: stop_tx,
                task: handle,
            },
        );
    }

    /// Stops an instance for good: every series it reported is marked stale.
    async fn stop_and_mark_stale(&self, running: Running) {
        let _ = running.stop.send(true);
        let result = running.task.await;
        self.stats
            .unregister_plugin(&running.config.plugin, &running.config.name);
        match result {
            Ok(mut staleness) => {
                let mut stale = Vec::new();
                staleness.mark(&mut stale, now_ms());
                if !stale.is_empty() {
                    let _ = self.rounds.send(stale).await;
                }
            }
            Err(e) => {
                tracing::error!(instance = %running.config.name, error = %e, "plugin supervisor failed; its series will expire at the aggregator");
            }
        }
    }

    /// Names of the running instances, for tests and logs.
    pub fn running(&self) -> Vec<String> {
        let mut names: Vec<_> = self.running.keys().cloned().collect();
        names.sort();
        names
    }
}

/// The runtime for a config: compiling where `compiler` says, with the compile cache when one
/// is configured and can be opened (otherwise it compiles on every start, and says why).
pub fn runtime_for(plugins: &PluginsConfig, compiler: Compiler) -> Arc<Runtime> {
    let cache = match &plugins.cache_directory {
        None => None,
        Some(dir) => match super::cache::CompileCache::open(dir) {
            Ok(cache) => Some(cache),
            Err(e) => {
                tracing::warn!(error = %e, "plugin compile cache unavailable; compiling on every start");
                None
            }
        },
    };
    Runtime::with(cache, compiler)
}

/// Completes at `at`; never, without one.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Compiling a plugin in the agent's process makes Cranelift allocate and free many megabytes;
/// glibc keeps freed memory mapped for reuse, so without this an agent stays that much bigger
/// for good (measured: a host-only agent at 31 MiB resident, 18 MiB when nothing is
/// compiled). Cheap when compilation ran in a child process and there is nothing to return.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

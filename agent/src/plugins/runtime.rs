//! The wasmtime side: one engine per agent, one store per plugin instance.
//!
//! - Cranelift compiles plugins to native code on x86_64 and aarch64; on 32-bit ARM, where
//!   Cranelift has no backend, it compiles them to Pulley bytecode, which wasmtime interprets.
//! - Deadlines use epoch interruption: while a call runs, a thread ticks the engine's epoch
//!   every [`EPOCH_TICK`], and each call gets a deadline in ticks; a guest still running then
//!   traps. Between calls the thread sleeps (see [`EpochTicker`]).
//!   Host calls enforce their own timeouts (see `host.rs`), and the whole call is also wrapped
//!   in a tokio timeout as a backstop.
//! - Memory: a per-store limiter caps linear memory; growth beyond it traps.
//! - Stack: the engine caps wasm stack depth, so deep recursion traps instead of crashing.
//!   wasmtime sets that cap per engine, so there is one engine per distinct cap.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, EngineWeak, Store, UpdateDeadline};

use picket_core::model::Family;

use super::bindings::Plugin;
use super::bindings::picket::plugin::types::Description;
use super::cache::CompileCache;
use super::code_file;
use super::compiler::{ChildError, Compiler, compile_in_child};
use super::convert::{self, OutputLimits};
use super::grants::Grants;
use super::host::HostState;
use crate::plugin_stats::PluginStats;

/// How often the engine's epoch advances; deadlines are whole ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Upper bound of `plugins.max_stack_bytes`; wasmtime's default async stack is 2 MiB.
pub const MAX_STACK_BYTES: usize = 1024 * 1024;

/// Why a plugin instance failed. `kind()` is the `picket_plugin_errors_total` label.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot set up the plugin engine: {0}")]
    Engine(String),
    #[error("cannot compile plugin: {0}")]
    Compile(String),
    /// The compiler failed, not the plugin (crashed, killed, hung): worth retrying.
    #[error("the plugin compiler failed: {0}")]
    Compiler(String),
    #[error("cannot instantiate plugin: {0}")]
    Instantiate(String),
    #[error("plugin refused its settings: {0}")]
    Init(String),
    #[error("plugin ran past its {0:?} deadline")]
    Timeout(Duration),
    #[error("plugin exceeded its memory limit: {0}")]
    Memory(String),
    #[error("plugin trapped: {0}")]
    Trap(String),
    #[error("plugin output refused: {0}")]
    Output(#[from] convert::OutputError),
    #[error("plugin reported: {0}")]
    Collect(String),
}

impl PluginError {
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Engine(_) | PluginError::Compile(_) | PluginError::Compiler(_) => {
                "compile"
            }
            PluginError::Instantiate(_) => "instantiate",
            PluginError::Init(_) => "init",
            PluginError::Timeout(_) => "timeout",
            PluginError::Memory(_) => "memory",
            PluginError::Trap(_) => "trap",
            PluginError::Output(_) => "limit",
            PluginError::Collect(_) => "collect",
        }
    }

    /// Whether the instance must be torn down (its state can no longer be trusted). A plugin
    /// that merely reports an error (the Flink REST API was down) keeps running.
    pub fn needs_restart(&self) -> bool {
        !matches!(self, PluginError::Collect(_))
    }
}

/// The agent's plugin engines: one per distinct stack cap (wasmtime sets the cap per engine,
/// and a component belongs to the engine that compiled it), created on first use.
pub struct Runtime {
    engines: Mutex<HashMap<usize, Arc<EngineSet>>>,
    cache: Option<CompileCache>,
    /// Where to compile; falls back to [`Compiler::in_process`] for good once a child
    /// compiler turns out to be unavailable.
    compiler: Mutex<Compiler>,
    /// Where the child compiler's output is mapped from when there is no cache
    /// ([`code_file::SCRATCH_DIRECTORY`] but in tests).
    scratch_directory: PathBuf,
    /// Whether [`Runtime::note_code_in_memory`] has spoken.
    said_code_in_memory: AtomicBool,
}

/// An engine with the linker that provides the host functions.
pub struct EngineSet {
    engine: Engine,
    linker: Linker<HostState>,
    ticker: Arc<EpochTicker>,
}

impl Drop for EngineSet {
    fn drop(&mut self) {
        self.ticker.close();
    }
}

/// A component ready to instantiate, with the engine that compiled it.
#[derive(Clone)]
pub struct Compiled {
    component: Component,
    engines: Arc<EngineSet>,
    /// Whether the code is mapped from a file ([`super::code_file`]), not in memory.
    mapped: bool,
}

impl Compiled {
    fn new(loaded: code_file::Loaded, engines: Arc<EngineSet>) -> Self {
        Compiled {
            component: loaded.component,
            engines,
            mapped: loaded.mapped,
        }
    }

    /// Whether the code is mapped from a file; only then may its pages be dropped
    /// (`image_pages::release_mapped_code`).
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    /// Where the compiled code lies in this process's memory (tests check what it is a
    /// mapping of; see [`super::code_file`]).
    pub fn code_range(&self) -> std::ops::Range<*const u8> {
        self.component.image_range()
    }
}

impl Runtime {
    /// A runtime that compiles in this process and keeps nothing on disk.
    pub fn new() -> Arc<Self> {
        Self::with(None, Compiler::in_process())
    }

    /// A runtime with an optional compile cache that compiles where `compiler` says.
    pub fn with(cache: Option<CompileCache>, compiler: Compiler) -> Arc<Self> {
        Self::with_scratch_directory(cache, compiler, code_file::SCRATCH_DIRECTORY.into())
    }

    /// As [`Runtime::with`], with the child compiler's output mapped from unnamed files in
    /// `scratch` when there is no cache (tests use a directory of their own).
    pub fn with_scratch_directory(
        cache: Option<CompileCache>,
        compiler: Compiler,
        scratch: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Runtime {
            engines: Mutex::new(HashMap::new()),
            cache,
            compiler: Mutex::new(compiler),
            scratch_directory: scratch,
            said_code_in_memory: AtomicBool::new(false),
        })
    }

    fn engines(&self, max_stack_bytes: usize) -> Result<Arc<EngineSet>, PluginError> {
        let mut engines = self.engines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = engines.get(&max_stack_bytes) {
            return Ok(set.clone());
        }
        let set = Arc::new(EngineSet::new(max_stack_bytes)?);
        engines.insert(max_stack_bytes, set.clone());
        Ok(set)
    }

    /// Compiles a component (or loads it from the cache) without blocking the async workers:
    /// in a child process when the runtime has one (see [`super::compiler`]), otherwise
    /// [`Runtime::compile`] on the blocking pool.
    pub async fn compile_async(
        self: &Arc<Self>,
        wasm: bytes::Bytes,
        max_stack_bytes: usize,
    ) -> Result<Compiled, PluginError> {
        let started = Instant::now();
        let program = self
            .compiler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .program()
            .map(Path::to_path_buf);
        // Engine set-up and the cache read are blocking work too.
        let (runtime, cached_wasm) = (self.clone(), wasm.clone());
        let (engines, cached) = self
            .blocking(move || {
                let engines = runtime.engines(max_stack_bytes)?;
                let cached = runtime
                    .cache
                    .as_ref()
                    .and_then(|cache| cache.load_entry(&engines.engine, &cached_wasm));
                Ok::<_, PluginError>((engines, cached))
            })
            .await??;
        if let Some(loaded) = cached {
            return Ok(Compiled::new(loaded, engines));
        }
        if let Some(program) = program {
            let why_not_in_child = match compile_in_child(&program, &wasm, max_stack_bytes).await {
                Ok(code) => {
                    let (runtime, loading_engines, loading_wasm) =
                        (self.clone(), engines.clone(), wasm.clone());
                    let loaded = self
                        .blocking(move || {
                            runtime.load_child_output(&loading_engines, &loading_wasm, &code)
                        })
                        .await?;
                    match loaded {
                        Ok(loaded) => {
                            log_compiled("child-process", started);
                            return Ok(Compiled::new(loaded, engines));
                        }
                        Err(why) => why,
                    }
                }
                Err(ChildError::DoesNotCompile(message)) => {
                    return Err(PluginError::Compile(message));
                }
                Err(e @ ChildError::Failed(_)) => return Err(PluginError::Compiler(e.to_string())),
                Err(ChildError::Unavailable(why)) => why,
            };
            tracing::warn!(reason = %why_not_in_child, "cannot compile plugins in a child process; compiling them in the agent's own process from now on (it keeps the compiler's memory)");
            *self.compiler.lock().unwrap_or_else(|p| p.into_inner()) = Compiler::in_process();
        }
        let (runtime, compiling_engines) = (self.clone(), engines.clone());
        let component = self
            .blocking(move || runtime.compile_here(&compiling_engines, &wasm))
            .await??;
        log_compiled("agent-process", started);
        Ok(Compiled::new(
            code_file::Loaded::in_memory(component),
            engines,
        ))
    }

    /// Compiles in this process, and caches the result when the runtime has a cache.
    fn compile_here(&self, engines: &EngineSet, wasm: &[u8]) -> Result<Component, PluginError> {
        let component = Component::new(&engines.engine, wasm)
            .map_err(|e| PluginError::Compile(format!("{e:#}")))?;
        if let Some(cache) = &self.cache {
            match component.serialize() {
                // The component compiled here is already in memory: the entry is for the
                // next start.
                Ok(code) => drop(cache.store(&engines.engine, wasm, &code)),
                Err(e) => tracing::warn!(error = %e, "cannot serialise the compiled plugin"),
            }
        }
        Ok(component)
    }

    /// Whether the next compilation runs in a child process (false once that turned out to be
    /// unavailable).
    pub fn compiles_in_child(&self) -> bool {
        self.compiler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .program()
            .is_some()
    }

    /// Runs `work` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PluginError> {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| PluginError::Compiler(format!("its thread panicked: {e}")))
    }

    /// Loads what a child compiler produced, and caches it when the runtime has a cache. An
    /// error says why the child's code is unusable here.
    ///
    /// The code is mapped from a file where one can be had (the cache entry just written, or
    /// an unnamed file in [`code_file::SCRATCH_DIRECTORY`]; see [`super::code_file`] for why),
    /// and loaded from memory otherwise.
    fn load_child_output(
        &self,
        engines: &EngineSet,
        wasm: &[u8],
        code: &[u8],
    ) -> Result<code_file::Loaded, String> {
        let file = match &self.cache {
            // A failed store has been logged; the code then stays in memory.
            Some(cache) => cache.store(&engines.engine, wasm, code).ok_or(None),
            None => code_file::unnamed_file(&self.scratch_directory, code).map_err(Some),
        };
        // SAFETY: `code` followed the MAGIC line of a program the runtime was told to trust
        // (`Compiler::trusted_program`: the agent's own executable, `/proc/self/exe`), read
        // from a pipe only this process holds; the file holds exactly those bytes (and, for a
        // cache entry, the tag after them), written by this process and never again; wasmtime
        // also refuses code built for other engine settings or wasmtime versions.
        let mapped = file.and_then(|file| {
            let len = file
                .metadata()
                .map_err(|e| Some(code_file::MapError::Load(e.to_string())))?
                .len();
            unsafe { code_file::load(&engines.engine, &file, len) }.map_err(Some)
        });
        match mapped {
            Ok(component) => return Ok(code_file::Loaded::mapped(component)),
            Err(Some(why)) => self.note_code_in_memory(&why),
            Err(None) => {}
        }
        // SAFETY: as above, for the bytes themselves.
        let loaded = unsafe { Component::deserialize(&engines.engine, code) }
            .map(code_file::Loaded::in_memory)
            .map_err(|e| format!("the child compiler's output does not load: {e:#}"));
        if loaded.is_err()
            && let Some(cache) = &self.cache
        {
            cache.discard(&engines.engine, wasm);
        }
        loaded
    }

    /// Says once per runtime why compiled code is kept in memory rather than mapped.
    fn note_code_in_memory(&self, why: &code_file::MapError) {
        if !self.said_code_in_memory.swap(true, Ordering::Relaxed) {
            tracing::info!(reason = %why, "keeping compiled plugin code in memory, where all of it stays resident");
        }
    }

    /// Compiles a component for an engine with the given stack cap, or loads it from the
    /// cache (blocking, CPU-heavy: see [`Runtime::compile_async`]).
    pub fn compile(&self, wasm: &[u8], max_stack_bytes: usize) -> Result<Compiled, PluginError> {
        let engines = self.engines(max_stack_bytes)?;
        let cached = self
            .cache
            .as_ref()
            .and_then(|cache| cache.load_entry(&engines.engine, wasm));
        let loaded = match cached {
            Some(loaded) => loaded,
            None => code_file::Loaded::in_memory(self.compile_here(&engines, wasm)?),
        };
        Ok(Compiled::new(loaded, engines))
    }
}

impl EngineSet {
    /// `max_stack_bytes` caps the wasm stack (at most [`MAX_STACK_BYTES`]: the wasm stack
    /// lives on the async fiber stack, which must keep room for host calls).
    fn new(max_stack_bytes: usize) -> Result<Self, PluginError> {
        let engine_error = |e: wasmtime::Error| PluginError::Engine(format!("{e:#}"));
        let engine = Engine::new(&engine_config(max_stack_bytes)?).map_err(engine_error)?;
        let ticker = EpochTicker::start(&engine)
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch thread: {e}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_error)?;
        // Every import but `exec` and `http`, whose list arguments are lifted by hand.
        {
            use super::bindings::picket::plugin::{files, host_stats, log, types};
            type Host = HasSelf<HostState>;
            types::add_to_linker::<HostState, Host>(&mut linker, |s| s).map_err(engine_error)?;
            files::add_to_linker::<HostState, Host>(&mut linker, |s| s).map_err(engine_error)?;
            host_stats::add_to_linker::<HostState, Host>(&mut linker, |s| s)
                .map_err(engine_error)?;
            log::add_to_linker::<HostState, Host>(&mut linker, |s| s).map_err(engine_error)?;
        }
        super::host::add_bounded_imports(&mut linker).map_err(engine_error)?;
        Ok(EngineSet {
            engine,
            linker,
            ticker,
        })
    }
}

/// Says where and how fast a plugin was compiled (operators compare the two on slow Pis).
fn log_compiled(compiled_in: &'static str, started: Instant) {
    tracing::info!(
        compiled_in,
        millis = started.elapsed().as_millis() as u64,
        "plugin compiled"
    );
}

/// The engine settings for a stack cap. A child compiler (`super::compiler`) builds its engine
/// from the same function, so the code it returns loads into the agent's engine.
pub(super) fn engine_config(max_stack_bytes: usize) -> Result<Config, PluginError> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.max_wasm_stack(max_stack_bytes.min(MAX_STACK_BYTES));
    if cfg!(target_arch = "arm") {
        config
            .target("pulley32")
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
    }
    Ok(config)
}

/// Advances an engine's epoch every [`EPOCH_TICK`] while at least one call runs on it, and
/// sleeps otherwise.
///
/// Why not tick all the time: a thread waking 100 times a second was almost half of an
/// agent's CPU time between collections (measured with `perf` in docs/performance.md), and
/// deadlines only matter while a guest runs.
struct EpochTicker {
    state: Mutex<TickerState>,
    wake: Condvar,
    /// Epoch increments so far (tests check the thread idles between calls).
    ticks: AtomicU64,
}

#[derive(Default)]
struct TickerState {
    /// Calls in flight (each holds a [`Ticking`]).
    calls: usize,
    /// The engine set is gone: the thread ends once no call is left.
    closed: bool,
}

impl EpochTicker {
    fn start(engine: &Engine) -> std::io::Result<Arc<Self>> {
        let ticker = Arc::new(EpochTicker {
            state: Mutex::new(TickerState::default()),
            wake: Condvar::new(),
            ticks: AtomicU64::new(0),
        });
        let thread_ticker = Arc::clone(&ticker);
        let engine = engine.weak();
        std::thread::Builder::new()
            .name("picket-plugin-epoch".into())
            .spawn(move || thread_ticker.run(engine))?;
        Ok(ticker)
    }

    fn run(&self, engine: EngineWeak) {
        while self.wait_for_a_call() {
            let Some(engine) = engine.upgrade() else {
                return;
            };
            engine.increment_epoch();
            drop(engine);
            self.ticks.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(EPOCH_TICK);
        }
    }

    /// Blocks until a call is in flight; false once the ticker is closed and idle.
    fn wait_for_a_call(&self) -> bool {
        let mut state = self.lock();
        loop {
            if state.calls > 0 {
                return true;
            }
            if state.closed {
                return false;
            }
            state = self
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Keeps the epoch ticking until the returned guard is dropped.
    fn enter(self: &Arc<Self>) -> Ticking {
        let mut state = self.lock();
        state.calls += 1;
        if state.calls == 1 {
            self.wake.notify_one();
        }
        Ticking(Arc::clone(self))
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, TickerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One call in flight on an engine: its epoch ticks until this is dropped (also when the
/// call's future is dropped half-way).
struct Ticking(Arc<EpochTicker>);

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.lock().calls -= 1;
    }
}

/// Limits of one plugin instance.
#[derive(Debug, Clone)]
pub struct InstanceLimits {
    pub call_timeout: Duration,
    pub max_memory_bytes: usize,
    pub output: OutputLimits,
}

/// A running plugin instance: its own store, so nothing is shared with other plugins.
pub struct Instance {
    store: Store<HostState>,
    plugin: Plugin,
    limits: InstanceLimits,
    stats: Arc<PluginStats>,
    ticker: Arc<EpochTicker>,
}

impl Instance {
    /// Instantiates `component` and calls its `init` with `settings` (JSON).
    pub async fn start(
        compiled: &Compiled,
        name: String,
        grants: Arc<Grants>,
        settings: &str,
        limits: InstanceLimits,
        stats: Arc<PluginStats>,
    ) -> Result<Self, PluginError> {
        let mut instance = Self::instantiate(compiled, name, grants, limits, stats).await?;
        let timeout = instance.limits.call_timeout;
        let _ticking = instance.ticker.enter();
        set_deadline(&mut instance.store, timeout);
        let init = guard(
            timeout,
            instance.plugin.call_init(&mut instance.store, settings),
        )
        .await
        .map_err(|e| classify(e, timeout, PluginError::Trap))?;
        init.map_err(|e| PluginError::Init(super::host::sanitize(&e)))?;
        Ok(instance)
    }

    /// Instantiates `component` without calling `init` (enough for `describe`).
    pub async fn instantiate(
        compiled: &Compiled,
        name: String,
        grants: Arc<Grants>,
        limits: InstanceLimits,
        stats: Arc<PluginStats>,
    ) -> Result<Self, PluginError> {
        let state = HostState::new(name, grants, limits.max_memory_bytes, stats.clone());
        let mut store = Store::new(&compiled.engines.engine, state);
        store.limiter(|state| &mut state.limits);
        // Every tick: yield to the async runtime (a spinning plugin must not hold a worker
        // thread the shipper and signal handling need), and stop the call once its wall-clock
        // deadline has passed.
        store.epoch_deadline_callback(|context| {
            let expired = context.data().deadline.is_some_and(|d| Instant::now() >= d);
            Ok(if expired {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        let ticker = Arc::clone(&compiled.engines.ticker);
        let ticking = ticker.enter();
        set_deadline(&mut store, limits.call_timeout);
        let plugin = guard(
            limits.call_timeout,
            Plugin::instantiate_async(&mut store, &compiled.component, &compiled.engines.linker),
        )
        .await
        .map_err(|e| classify(e, limits.call_timeout, PluginError::Instantiate))?;
        drop(ticking);
        Ok(Instance {
            store,
            plugin,
            limits,
            stats,
            ticker,
        })
    }

    /// The plugin's own description: name, version, the capabilities it wants, defaults.
    pub async fn describe(&mut self) -> Result<Description, PluginError> {
        let timeout = self.limits.call_timeout;
        let _ticking = self.ticker.enter();
        set_deadline(&mut self.store, timeout);
        let description = guard(timeout, self.plugin.call_describe(&mut self.store))
            .await
            .map_err(|e| classify(e, timeout, PluginError::Trap))?;
        Ok(description)
    }

    /// One collection round, converted and checked against the output limits.
    pub async fn collect(&mut self, now_ms: i64) -> Result<Vec<Family>, PluginError> {
        let timeout = self.limits.call_timeout;
        let ticking = self.ticker.enter();
        set_deadline(&mut self.store, timeout);
        let started = Instant::now();
        let result = guard(timeout, self.plugin.call_collect(&mut self.store))
            .await
            .map_err(|e| classify(e, timeout, PluginError::Trap));
        drop(ticking);
        PluginStats::set(
            &self.stats.last_collect_micros,
            started.elapsed().as_micros() as u64,
        );
        PluginStats::set(&self.stats.memory_bytes, self.memory_in_use() as u64);
        let output = result?.map_err(|e| PluginError::Collect(super::host::sanitize(&e)))?;
        Ok(convert::families(&output, now_ms, self.limits.output)?)
    }

    /// Linear memory the instance has grown to, as the limiter saw it.
    fn memory_in_use(&self) -> usize {
        self.store.data().memory_in_use()
    }
}

fn set_deadline(store: &mut Store<HostState>, timeout: Duration) {
    store.data_mut().deadline = Some(Instant::now() + timeout);
    store.set_epoch_deadline(1);
}

/// Backstop: a call that is still pending (inside a host call that ignores its own timeout)
/// well after the deadline is abandoned.
async fn guard<T>(
    timeout: Duration,
    call: impl Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    match tokio::time::timeout(timeout + Duration::from_secs(1), call).await {
        Ok(result) => result,
        Err(_) => Err(wasmtime::Error::new(Abandoned)),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("call abandoned after its deadline")]
struct Abandoned;

fn classify(
    e: wasmtime::Error,
    timeout: Duration,
    otherwise: fn(String) -> PluginError,
) -> PluginError {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        if *trap == wasmtime::Trap::Interrupt {
            return PluginError::Timeout(timeout);
        }
        if *trap == wasmtime::Trap::StackOverflow {
            return PluginError::Trap(format!(
                "stack overflow (the stack cap is plugins.max_stack_bytes): {e:#}"
            ));
        }
    }
    if let Some(limit) = e.downcast_ref::<super::host::MemoryLimitExceeded>() {
        return PluginError::Memory(limit.to_string());
    }
    if e.downcast_ref::<Abandoned>().is_some() {
        return PluginError::Timeout(timeout);
    }
    // A guest's trap message carries its own symbol names: bounded and escaped.
    otherwise(super::host::sanitize(&format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticks(ticker: &EpochTicker) -> u64 {
        ticker.ticks.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until the ticker has advanced past `above`.
    fn wait_for_ticks_above(ticker: &EpochTicker, above: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while ticks(ticker) <= above {
            assert!(
                Instant::now() < deadline,
                "the epoch did not advance during a call"
            );
            std::thread::sleep(EPOCH_TICK);
        }
        ticks(ticker)
    }

    #[test]
    fn the_epoch_ticks_only_while_a_call_is_in_flight() {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).expect("engine");
        let ticker = EpochTicker::start(&engine).expect("ticker thread");

        // Idle: ten ticks' worth of time passes without a single increment.
        std::thread::sleep(EPOCH_TICK * 10);
        assert_eq!(ticks(&ticker), 0, "the ticker ran with no call in flight");

        // Two overlapping calls: ticking starts with the first and goes on until the last ends.
        let first = ticker.enter();
        let second = ticker.enter();
        let during = wait_for_ticks_above(&ticker, 0);
        drop(first);
        wait_for_ticks_above(&ticker, during + 2);
        drop(second);

        // Idle again: at most the tick already under way lands after the last call ended.
        let after = ticks(&ticker);
        std::thread::sleep(EPOCH_TICK * 10);
        assert!(
            ticks(&ticker) <= after + 1,
            "the ticker kept running after the calls ended: {after} -> {}",
            ticks(&ticker)
        );
    }
}

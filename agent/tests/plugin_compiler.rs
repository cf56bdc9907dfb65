//! Compiling plugins in a child process (`picket-agent compile-plugin`, `plugins/compiler.rs`)
//! against the real agent binary: the code it returns runs, a broken component is reported
//! with wasmtime's message, a compiler that crashes or is killed is a failure of that
//! compilation (retried by the manager, never repeated inside the agent), something that is
//! not the compiler makes the runtime compile in-process, and the compile cache is filled
//! from the child's output.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use picket_agent::config::AgentConfig;
use picket_agent::plugin_stats::PluginStats;
use picket_agent::plugins::cache::CompileCache;
use picket_agent::plugins::compiler::Compiler;
use picket_agent::plugins::grants::Grants;
use picket_agent::plugins::manager::PluginManager;
use picket_agent::plugins::runtime::{Compiled, Instance, PluginError, Runtime};
use picket_agent::stats::AgentStats;
use picket_core::model::{Family, Value};
use tokio::sync::{mpsc, watch};

const STACK: usize = 256 * 1024;
const AGENT: &str = env!("CARGO_BIN_EXE_picket-agent");

fn probe_wasm() -> bytes::Bytes {
    common::probe_wasm().into()
}

fn agent_compiler() -> Compiler {
    // SAFETY: the agent binary of this very build.
    unsafe { Compiler::trusted_program(PathBuf::from(AGENT)) }
}

/// A stand-in compiler written to `dir` as a shell script. It never writes the agent's
/// marker line, so nothing it prints is ever loaded as code.
fn script(dir: &Path, name: &str, body: &str) -> Compiler {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("#!/bin/sh\n[ \"$1\" = --ready ] && exit 0\n{body}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Readiness: a process forked by another test thread while the file was open for writing
    // holds it until its own exec, and exec'ing the script meanwhile fails with ETXTBSY.
    let mut attempts = 0;
    loop {
        match Command::new(&path)
            .arg("--ready")
            .stdin(Stdio::null())
            .status()
        {
            Ok(status) => {
                assert!(status.success(), "{name}: readiness run failed: {status}");
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 500 => {
                attempts += 1;
                std::thread::yield_now();
            }
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
    // SAFETY: see the function's comment: the script's output never carries the marker.
    unsafe { Compiler::trusted_program(path) }
}

/// The error of a compilation that must fail.
async fn compile_error(runtime: &Arc<Runtime>, wasm: bytes::Bytes) -> PluginError {
    match runtime.compile_async(wasm, STACK).await {
        Err(e) => e,
        Ok(_) => panic!("compiled although it must not"),
    }
}

/// Starts the compiled probe and returns its first `probe_up`.
async fn probe_up(compiled: &Compiled) -> Option<f64> {
    let mut instance = Instance::start(
        compiled,
        "probe/test".into(),
        Arc::new(Grants::default()),
        r#"{"mode":"ok"}"#,
        common::probe_limits(Duration::from_secs(5)),
        Arc::new(PluginStats::default()),
    )
    .await
    .expect("the probe starts");
    let families = instance.collect(1_700_000_000_000).await.expect("collects");
    let up = families.iter().find(|f| f.name == "probe_up")?;
    match up.points.first()?.value {
        Value::Number(v) => Some(v),
        _ => None,
    }
}

/// The line of `/proc/self/maps` whose mapping holds `compiled`'s code.
fn mapping_of(compiled: &Compiled) -> String {
    let inside = compiled.code_range().start as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .find(|line| {
            let range = line.split(' ').next().unwrap_or_default();
            let Some((start, end)) = range.split_once('-') else {
                return false;
            };
            let parse = |hex| usize::from_str_radix(hex, 16).unwrap();
            (parse(start)..parse(end)).contains(&inside)
        })
        .unwrap_or_else(|| panic!("no mapping holds {inside:#x}"))
        .to_owned()
}

/// Without a compile cache, the child's output is mapped from an unnamed file in the scratch
/// directory (plugins/code_file.rs), not copied into the agent's memory.
#[tokio::test(flavor = "multi_thread")]
async fn code_compiled_by_the_agent_binary_in_a_child_runs_from_a_file() {
    let scratch = Path::new(picket_agent::plugins::code_file::SCRATCH_DIRECTORY);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let on_tmpfs = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _device = fields.next()?;
            Some((fields.next()?, fields.next()?))
        })
        .filter(|(point, _)| scratch.starts_with(point))
        .max_by_key(|(point, _)| point.len())
        .is_some_and(|(_, kind)| kind == "tmpfs" || kind == "ramfs");
    assert!(
        !on_tmpfs,
        "{} is memory-backed here; this test needs it on disk, as on a Pi",
        scratch.display()
    );
    let runtime = Runtime::with(None, agent_compiler());
    let compiled = runtime.compile_async(probe_wasm(), STACK).await.unwrap();
    assert!(runtime.compiles_in_child(), "the child compiler worked");
    let mapping = mapping_of(&compiled);
    assert!(
        mapping.contains(&format!("{}/", scratch.display())) && mapping.ends_with("(deleted)"),
        "the code is not mapped from an unnamed file in {}: {mapping}",
        scratch.display()
    );
    assert_eq!(probe_up(&compiled).await, Some(1.0));
}

/// The child needs no config: the agent answers `compile-plugin` before reading one, so an
/// agent whose config file moved since it started can still compile.
#[test]
fn the_child_compiles_without_reading_a_config() {
    let mut child = Command::new(AGENT)
        .args(["compile-plugin", "--max-stack-bytes", &STACK.to_string()])
        .env("PICKET_AGENT_CONFIG", "/nonexistent/agent.toml")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, &probe_wasm()).unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output
            .stdout
            .starts_with(b"picket-agent compiled plugin v1\n")
    );
    assert!(output.stdout.len() > 10_000, "compiled code follows");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_that_does_not_compile_is_reported_and_the_child_stays_in_use() {
    let runtime = Runtime::with(None, agent_compiler());
    // A component preamble followed by a section id that does not exist.
    let broken = bytes::Bytes::from_static(b"\0asm\x0d\0\x01\0\x7f\x01\x00");
    let e = compile_error(&runtime, broken).await;
    assert!(matches!(e, PluginError::Compile(_)), "{e}");
    assert_eq!(e.kind(), "compile");
    let message = e.to_string();
    assert!(
        message.contains("section"),
        "wasmtime's message reaches the error: {message}"
    );
    assert!(
        runtime.compiles_in_child(),
        "a bad plugin is not a bad compiler"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compiler_that_is_killed_or_crashes_fails_that_compilation_only() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body, says) in [
        ("killed", "kill -KILL $$", "SIGKILL"),
        (
            "panics",
            "echo 'the plugin compiler panicked: at cranelift' >&2; exit 70",
            "panicked",
        ),
    ] {
        let runtime = Runtime::with(None, script(dir.path(), name, body));
        let e = compile_error(&runtime, probe_wasm()).await;
        assert!(matches!(e, PluginError::Compiler(_)), "{name}: {e}");
        assert!(
            e.to_string().contains(says),
            "{name}: the error says how the compiler ended: {e}"
        );
        assert!(
            runtime.compiles_in_child(),
            "{name}: compiling in-process after a crash would risk the agent itself"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_child_compiler_the_runtime_compiles_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let impostors = [
        // Answers, but not with compiled code (a wrapper such as qemu-user would).
        script(dir.path(), "silent", "cat >/dev/null; exit 0"),
        script(dir.path(), "usage", "echo 'unknown command' >&2; exit 1"),
        // Cannot be started at all.
        // SAFETY: the file does not exist.
        unsafe { Compiler::trusted_program(dir.path().join("missing")) },
    ];
    for compiler in impostors {
        let label = format!("{compiler:?}");
        let runtime = Runtime::with(None, compiler);
        let compiled = runtime
            .compile_async(probe_wasm(), STACK)
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(!runtime.compiles_in_child(), "{label}: falls back for good");
        assert_eq!(probe_up(&compiled).await, Some(1.0), "{label}");
    }
}

/// Where no file can be had for the child's output (a tmpfs scratch directory, whose pages
/// stay in memory anyway, or a missing one), the code is loaded into memory and the child
/// compiler stays in use: that is the file's problem, not the compiler's.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_usable_scratch_directory_the_code_stays_in_memory() {
    let missing = tempfile::tempdir().unwrap().path().join("gone");
    for scratch in [PathBuf::from("/dev/shm"), missing] {
        let runtime = Runtime::with_scratch_directory(None, agent_compiler(), scratch.clone());
        let compiled = runtime.compile_async(probe_wasm(), STACK).await.unwrap();
        assert!(
            runtime.compiles_in_child(),
            "{}: the child compiler was given up",
            scratch.display()
        );
        let mapping = mapping_of(&compiled);
        assert!(!compiled.is_mapped(), "{}", scratch.display());
        assert!(!mapping.contains('/'), "{}: {mapping}", scratch.display());
        assert_eq!(
            probe_up(&compiled).await,
            Some(1.0),
            "{}",
            scratch.display()
        );
    }
}

/// The page release drops the pages of code mapped from a file, which then runs on (its
/// pages map back); code compiled in the process is marked as in memory, which the manager
/// never hands to the release.
#[tokio::test(flavor = "multi_thread")]
async fn mapped_code_pages_are_released_and_code_in_memory_is_not_offered() {
    let mapped = Runtime::with(None, agent_compiler())
        .compile_async(probe_wasm(), STACK)
        .await
        .unwrap();
    assert!(mapped.is_mapped());
    assert!(
        mapping_of(&mapped).ends_with("(deleted)"),
        "{}",
        mapping_of(&mapped)
    );
    assert_eq!(probe_up(&mapped).await, Some(1.0));
    let range = mapped.code_range();
    let image = range.start as usize..range.end as usize;
    // SAFETY: the image of a component mapped from a file, kept mapped by `mapped`.
    let released =
        unsafe { picket_agent::image_pages::release_mapped_code(std::slice::from_ref(&image)) };
    assert!(
        released.pagemap_usable,
        "this test needs /proc/self/pagemap"
    );
    assert!(
        released.bytes > 0,
        "nothing of the mapped code was dropped: {released:?}"
    );
    assert_eq!(released.written_pages_kept, 0, "{released:?}");
    assert_eq!(
        probe_up(&mapped).await,
        Some(1.0),
        "runs on after the release"
    );

    let in_memory = Runtime::new().compile(&probe_wasm(), STACK).unwrap();
    assert!(!in_memory.is_mapped());
    assert!(
        !mapping_of(&in_memory).contains('/'),
        "{}",
        mapping_of(&in_memory)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_child_output_fills_the_compile_cache() {
    let cache_dir = tempfile::tempdir().unwrap();
    let first = Runtime::with(
        Some(CompileCache::open(cache_dir.path()).unwrap()),
        agent_compiler(),
    );
    let compiled = first.compile_async(probe_wasm(), STACK).await.unwrap();
    assert!(first.compiles_in_child());
    let entries: Vec<PathBuf> = std::fs::read_dir(cache_dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|path| path.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "one cached compilation");
    // The code runs from the entry just written, mapped (plugins/code_file.rs).
    let entry = entries[0].display().to_string();
    assert!(
        mapping_of(&compiled).ends_with(&entry),
        "{}",
        mapping_of(&compiled)
    );

    // A second agent whose compiler would die: it never runs, the cache answers.
    let programs = tempfile::tempdir().unwrap();
    let second = Runtime::with(
        Some(CompileCache::open(cache_dir.path()).unwrap()),
        script(programs.path(), "dies", "kill -KILL $$"),
    );
    let compiled = second.compile_async(probe_wasm(), STACK).await.unwrap();
    assert!(
        mapping_of(&compiled).ends_with(&entry),
        "{}",
        mapping_of(&compiled)
    );
    assert_eq!(probe_up(&compiled).await, Some(1.0));
}

/// The manager retries an instance whose compiler failed, without any file change: the code
/// may be fine, and embedded plugins have no file to replace.
#[tokio::test(flavor = "multi_thread")]
async fn the_manager_retries_after_the_compiler_failed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("custom.wasm"), probe_wasm()).unwrap();
    let marker = dir.path().join("failed-once");
    let flaky = script(
        dir.path(),
        "flaky-compiler",
        &format!(
            "if [ ! -e '{marker}' ]; then : > '{marker}'; kill -KILL $$; fi\nexec '{AGENT}' \"$@\"",
            marker = marker.display()
        ),
    );
    let text = format!(
        "[plugins]\ndefaults = false\ndirectory = \"{}\"\nwatch_interval = \"100ms\"\n\
         [[plugins.instances]]\nname = \"custom\"\nplugin = \"custom\"\ninterval = \"100ms\"\n\
         settings = {{ mode = \"ok\" }}\n",
        dir.path().display()
    );
    let config: Arc<AgentConfig> =
        Arc::new(picket_core::config::parse("agent.toml", &text).expect("valid config"));
    let stats = Arc::new(AgentStats::default());
    let (rounds_tx, mut rounds) = mpsc::channel::<Vec<Family>>(64);
    let (_config_tx, config_rx) = watch::channel(config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let manager = PluginManager::new(Runtime::with(None, flaky), stats.clone(), rounds_tx);
    let task = tokio::spawn(manager.run(config_rx, stop_rx));

    let first_up = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let round = rounds.recv().await.expect("the manager is running");
            if round.iter().any(|f| f.name == "probe_up") {
                return;
            }
        }
    })
    .await;
    assert!(
        first_up.is_ok(),
        "the instance never started after the compiler failed once"
    );
    assert!(marker.exists(), "the first compilation did fail");
    let compile_errors: u64 = stats
        .plugins
        .lock()
        .unwrap()
        .iter()
        .map(|(_, _, s)| s.errors().get("compile").copied().unwrap_or(0))
        .sum();
    assert_eq!(compile_errors, 1, "the failure was counted once");
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

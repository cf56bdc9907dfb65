//! Compiles plugins in a short-lived child process, so the long-running agent never holds the
//! compiler.
//!
//! Why: compiling with Cranelift pulls about 8 MiB of the compiler's own code into the process
//! and leaves the allocator with megabytes of freed heap; both stay resident for the agent's
//! whole life (docs/performance.md, "Agent memory"). A child that exits takes them with it,
//! and the agent only receives the compiled code: an agent that compiled its plugins at start
//! is then as small as one that loaded them from the compile cache. A compiler crash, or an
//! out-of-memory kill while compiling a hostile plugin, also ends the child, not the agent.
//!
//! Protocol: the agent runs its own executable (`/proc/self/exe`: the same build even when the
//! file has been replaced by an upgrade since it started) as
//! `picket-agent compile-plugin --max-stack-bytes N`, writes the component to its stdin, and
//! reads [`MAGIC`] and the serialised component from its stdout (exit 0). A component that does
//! not compile makes the child exit [`EXIT_DOES_NOT_COMPILE`] with wasmtime's message on
//! stderr; a compiler that panics exits [`EXIT_COMPILER_CRASHED`]. A panic, a kill (the child
//! volunteers first for the out-of-memory killer) and a hang fail only this one compilation:
//! the plugin manager retries it with backoff, and the agent never repeats it in its own
//! process, which is what the child is there to protect. Any other
//! outcome (cannot start it, another exit code, no [`MAGIC`], code that does not load: a
//! wrapper such as qemu-user answering instead of the agent) means there is no usable child
//! compiler here, and the agent compiles in its own process from then on, once saying why.

use std::io::{Read as _, Write as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use wasmtime::Engine;
use wasmtime::component::Component;

use super::runtime::engine_config;

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "compile-plugin";

/// What a successful child writes before the serialised component, so output from anything
/// that is not the agent's compiler is never mistaken for code.
const MAGIC: &[u8] = b"picket-agent compiled plugin v1\n";

/// The child's exit code when the component itself is at fault (`EX_DATAERR`).
const EXIT_DOES_NOT_COMPILE: u8 = 65;

/// The child's exit code when the compiler panicked (`EX_SOFTWARE`).
const EXIT_COMPILER_CRASHED: i32 = 70;

/// How long one compilation may take before the child is killed. Cranelift compiles the three
/// first-party plugins in about a second on this project's x86_64 test machine, and a Pi's
/// cores are several times slower; this bound only catches a compiler that hangs.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(300);

/// At most this much of the child's stderr goes into an error message.
const MAX_MESSAGE_BYTES: usize = 4096;

/// Where plugins are compiled: in the agent's own process, or in child processes running a
/// program whose output is trusted as native code.
#[derive(Clone, Debug)]
pub struct Compiler {
    program: Option<PathBuf>,
}

impl Compiler {
    /// In the agent's own process (tests, one-off commands).
    pub fn in_process() -> Self {
        Compiler { program: None }
    }

    /// Child processes running this very executable (`/proc/self/exe`); in-process, with a
    /// warning, where `/proc` is not mounted (a path to the file could name a newer build
    /// than the one running).
    pub fn own_executable() -> Self {
        let own = Path::new("/proc/self/exe");
        if own.exists() {
            // SAFETY: /proc/self/exe is the executable this process runs, whose
            // `compile-plugin` writes what `Component::serialize` produced.
            unsafe { Self::trusted_program(own.to_path_buf()) }
        } else {
            tracing::warn!(
                "/proc is not mounted: compiling plugins in the agent's own process (it keeps the compiler's memory)"
            );
            Self::in_process()
        }
    }

    /// Child processes running `program`.
    ///
    /// # Safety
    ///
    /// What `program compile-plugin` writes after [`MAGIC`] is loaded as native code without
    /// verification: it must be this agent build's own `compile-plugin` (or a program that
    /// never writes [`MAGIC`], as tests use).
    pub unsafe fn trusted_program(program: PathBuf) -> Self {
        Compiler {
            program: Some(program),
        }
    }

    /// The program child compilers run, if any.
    pub fn program(&self) -> Option<&Path> {
        self.program.as_deref()
    }
}

/// Why a compilation in a child process produced no code.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The component does not compile (wasmtime's message).
    #[error("{0}")]
    DoesNotCompile(String),
    /// The child compiler crashed, was killed or hung: worth retrying later.
    #[error("the compiler process {0}")]
    Failed(String),
    /// There is no working child compiler here (cannot start it, or something else answered).
    #[error("{0}")]
    Unavailable(String),
}

/// Compiles `wasm` in a child process running `program`; returns the serialised component.
pub async fn compile_in_child(
    program: &Path,
    wasm: &[u8],
    max_stack_bytes: usize,
) -> Result<Vec<u8>, ChildError> {
    let shown = shown(program);
    let mut child = tokio::process::Command::new(program)
        .arg(SUBCOMMAND)
        .arg("--max-stack-bytes")
        .arg(max_stack_bytes.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: Ctrl-C on the agent's terminal is the agent's to handle.
        .process_group(0)
        // Dropped on timeout or cancellation: the child must not outlive the wait for it.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ChildError::Unavailable(format!("cannot start {shown}: {e}")))?;
    let mut stdin = child.stdin.take();
    let feed = async move {
        if let Some(stdin) = stdin.as_mut() {
            // A child that exits early closes the pipe: its exit status says why, so a
            // failed write needs no message of its own.
            let _ = stdin.write_all(wasm).await;
        }
        drop(stdin);
    };
    // Feeding and reading at once: neither side can block the other on a full pipe.
    let outcome = tokio::time::timeout(COMPILE_TIMEOUT, async {
        let ((), output) = tokio::join!(feed, child.wait_with_output());
        output
    })
    .await;
    let output = match outcome {
        Err(_) => {
            return Err(ChildError::Failed(format!(
                "did not finish within {COMPILE_TIMEOUT:?} and was killed"
            )));
        }
        Ok(Err(e)) => return Err(ChildError::Failed(format!("could not be waited for: {e}"))),
        Ok(Ok(output)) => output,
    };
    let message = || {
        let end = output.stderr.len().min(MAX_MESSAGE_BYTES);
        String::from_utf8_lossy(&output.stderr[..end])
            .trim()
            .to_owned()
    };
    match output.status.code() {
        Some(0) if output.stdout.starts_with(MAGIC) => {
            let mut code = output.stdout;
            code.drain(..MAGIC.len());
            Ok(code)
        }
        Some(0) => Err(ChildError::Unavailable(format!(
            "{shown} compile-plugin answered without compiled code"
        ))),
        Some(code) if code == i32::from(EXIT_DOES_NOT_COMPILE) => {
            Err(ChildError::DoesNotCompile(message()))
        }
        Some(EXIT_COMPILER_CRASHED) => Err(ChildError::Failed(format!("crashed: {}", message()))),
        Some(code) => Err(ChildError::Unavailable(format!(
            "{shown} compile-plugin exited with status {code}: {}",
            message()
        ))),
        None => {
            let signal = output.status.signal().unwrap_or(0);
            let hint = if signal == libc::SIGKILL {
                " (the kernel's out-of-memory killer?)"
            } else {
                ""
            };
            Err(ChildError::Failed(format!(
                "was killed by {}{hint}",
                signal_name(signal)
            )))
        }
    }
}

/// The program as an operator should read it: where `/proc/self/exe` points.
fn shown(program: &Path) -> String {
    std::fs::read_link(program)
        .unwrap_or_else(|_| program.to_path_buf())
        .display()
        .to_string()
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGILL => "SIGILL",
        _ => return format!("signal {signal}"),
    };
    format!("{name} (signal {signal})")
}

/// The child's side: `picket-agent compile-plugin --max-stack-bytes N`. Reads a component from
/// stdin, writes [`MAGIC`] and the serialised component to stdout.
pub fn serve(max_stack_bytes: usize) -> ExitCode {
    // A compiler bug is this compilation's failure, not a sign that there is no compiler here.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("the plugin compiler panicked: {info}");
        std::process::exit(EXIT_COMPILER_CRASHED);
    }));
    // If memory runs out while compiling, the kernel should pick this process, not the agent.
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    let mut wasm = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut wasm) {
        eprintln!("cannot read the component from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let engine = match engine_config(max_stack_bytes).and_then(|config| {
        Engine::new(&config).map_err(|e| super::runtime::PluginError::Engine(format!("{e:#}")))
    }) {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let component = match Component::new(&engine, &wasm) {
        Ok(component) => component,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(EXIT_DOES_NOT_COMPILE);
        }
    };
    let code = match component.serialize() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cannot serialise the compiled plugin: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(MAGIC)
        .and_then(|()| stdout.write_all(&code))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write the compiled plugin to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

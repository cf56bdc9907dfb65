//! `picket-agent` command line: run, collect once, or check a config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use picket_agent::config;

#[derive(Parser)]
#[command(
    name = "picket-agent",
    version,
    about = "Collects host and Flink metrics and streams them to a picket-aggregator"
)]
struct Cli {
    /// Config file (TOML). Without it, embedded defaults are used.
    #[arg(long, short, global = true, env = "PICKET_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Collect one round from every enabled source, print it as Prometheus text and exit.
    Once,
    /// Validate the config (and read the TLS files it names); exit 1 with a precise message
    /// on any error.
    CheckConfig,
    /// Work with plugins.
    Plugins {
        #[command(subcommand)]
        action: PluginsCommand,
    },
    /// Internal: compile a plugin read from stdin and write the compiled code to stdout. The
    /// running agent starts itself this way so the compiler's memory is never its own.
    #[command(name = picket_agent::plugins::compiler::SUBCOMMAND, hide = true)]
    CompilePlugin {
        #[arg(long)]
        max_stack_bytes: usize,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// Print what a plugin (or every embedded plugin and every file in plugins.directory)
    /// says about itself: version, the capabilities it wants, its default settings.
    Describe {
        /// One plugin: a first-party name or the stem of a .wasm file in plugins.directory.
        name: Option<String>,
    },
}

/// One malloc arena for the whole agent, unless the operator set `MALLOC_ARENA_MAX`.
///
/// glibc gives threads that allocate at the same time arenas of their own (up to eight per
/// core), and each keeps freed memory for reuse. The agent allocates little, so sharing one
/// arena costs nothing measurable, while the extra arenas were 3.2 MiB of a host-only agent's
/// 28 MiB resident (docs/performance.md). Runs before any other thread exists.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes an allocator tunable, and no other thread is running.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::CompilePlugin { max_stack_bytes } = command {
        // Before the config: the child needs none, and must not fail on the parent's.
        return picket_agent::plugins::compiler::serve(max_stack_bytes);
    }
    let loaded = match config::load(cli.config.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::CheckConfig = command {
        let text = &loaded.text;
        let checked = config::check_tls_files(&loaded.config, &loaded.origin, text);
        let checked =
            checked.and_then(|()| config::check_plugin_files(&loaded.config, &loaded.origin, text));
        return match checked {
            Ok(()) => {
                println!("{}: configuration is valid", loaded.origin);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    limit_malloc_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Command::Plugins {
            action: PluginsCommand::Describe { name },
        } => match runtime.block_on(picket_agent::describe::describe(
            &loaded.config,
            name.as_deref(),
        )) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(text) => {
                eprintln!("{text}");
                ExitCode::FAILURE
            }
        },
        Command::Once => {
            let families = runtime.block_on(picket_agent::collect_once(&loaded.config));
            let mut out = String::new();
            picket_core::exposition::write_families(&mut out, &families, false);
            print!("{out}");
            ExitCode::SUCCESS
        }
        _ => {
            let log = match loaded.config.log.init() {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!(config = %loaded.origin, version = env!("CARGO_PKG_VERSION"), "starting picket-agent");
            match runtime.block_on(picket_agent::run(
                loaded.config,
                cli.config,
                log,
                picket_agent::plugins::compiler::Compiler::own_executable(),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

//! `picket-bench`: Picket's benchmarks, each against a peer measured in the same run on the
//! same machine (node_exporter for the agent, vmagent for the aggregator, Prometheus' own
//! remote-write path for latency). It starts everything it needs on loopback, runs each
//! measurement several times, and prints Markdown tables of medians and ratios
//! (docs/performance.md explains every figure).
//!
//! ```text
//! cargo build --release --workspace --bins && cross/build.sh   # what is measured
//! target/release/picket-bench all                              # or one scenario
//! ```
//!
//! Timings here are never assertions: this is a measuring tool, not a test.

mod capacity;
mod footprint;
mod latency;
mod loadgen;
mod proc_stats;
mod receiver;
mod relay;
mod report;
mod setup;
mod symbol_order;
mod wire;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Picket's benchmarks against node_exporter, vmagent and Prometheus")]
struct Cli {
    /// Repetitions of each measurement; tables show medians.
    #[arg(long, default_value_t = 3, global = true)]
    runs: usize,
    /// Smaller loads and shorter windows: checks that every scenario works end to end in a
    /// few minutes (figures from it are not the published ones).
    #[arg(long, global = true)]
    quick: bool,
    /// Also append the tables to this Markdown file.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Record a `perf` profile of the aggregator during each measured relay and null-sink run
    /// into this directory (build with `--profile profiling` and set PICKET_BIN_DIR to
    /// `target/profiling` for symbols).
    #[arg(long, global = true)]
    perf: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Clone, PartialEq)]
enum Command {
    /// Agent vs node_exporter: memory, CPU per collection, binary size, start-up; arm64 and
    /// armv7 memory under qemu-user.
    Footprint,
    /// Aggregator vs vmagent relaying the same series to one remote-write endpoint: samples
    /// per CPU-second.
    Relay,
    /// Aggregator into a null sink: maximum samples/s, memory per 100k series, scaling from
    /// 10 to 10,000 agents and from 10k to 1M series.
    Capacity,
    /// Sample collected → visible in Prometheus, p50/p99 at 10 % and 80 % of the maximum
    /// load, against Prometheus' own remote-write path.
    Latency,
    /// Every scenario above.
    All,
    /// Not a benchmark: trains the agent's link-time symbol order (the functions a running
    /// agent executes, from callgrind) and writes it to `--out`. Defaults fit the commands
    /// in docs/performance.md.
    SymbolOrder {
        /// The agent to train on: the release build `cross/build.sh` makes, because symbol
        /// names differ between builds (features, target, profile). Default: its
        /// x86_64-unknown-linux-gnu build in the target directory this tool was built in.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// lld's link map of that build, which names its functions (`cross/build.sh` has it
        /// written beside the binary, as `picket-agent.map`).
        #[arg(long)]
        map: Option<PathBuf>,
        /// The order file. Default: `agent/symbol-order/x86_64-unknown-linux-gnu.txt` in
        /// this repository.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Settings every scenario reads.
pub struct Settings {
    pub runs: usize,
    pub quick: bool,
    pub perf: Option<PathBuf>,
    pub report: report::Report,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    use_binaries_beside_this_one();
    if let Command::SymbolOrder { agent, map, out } = &cli.command {
        let shipped = picket_tests::bin_dir().join("../x86_64-unknown-linux-gnu/release");
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        return symbol_order::run(
            &agent
                .clone()
                .unwrap_or_else(|| shipped.join("picket-agent")),
            &map.clone()
                .unwrap_or_else(|| shipped.join("picket-agent.map")),
            &out.clone()
                .unwrap_or_else(|| repo.join("agent/symbol-order/x86_64-unknown-linux-gnu.txt")),
        );
    }
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut settings = Settings {
        runs: cli.runs.max(1),
        quick: cli.quick,
        perf: cli.perf.clone(),
        report: report::Report::new(cli.out.clone()),
    };
    settings.report.machine()?;
    let all = cli.command == Command::All;
    if all || cli.command == Command::Footprint {
        runtime.block_on(footprint::run(&mut settings))?;
    }
    if all || cli.command == Command::Relay {
        runtime.block_on(relay::run(&mut settings))?;
    }
    if all || cli.command == Command::Capacity {
        runtime.block_on(capacity::run(&mut settings))?;
    }
    if all || cli.command == Command::Latency {
        runtime.block_on(latency::run(&mut settings))?;
    }
    Ok(())
}

/// The harness finds `picket-agent` and `picket-aggregator` through `PICKET_BIN_DIR`; by
/// default they are the ones built with this tool (`target/release/`).
fn use_binaries_beside_this_one() {
    if std::env::var_os("PICKET_BIN_DIR").is_some() {
        return;
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("PICKET_BIN_DIR", dir) };
    }
}

/// 10,000 simulated agents need 10,000 sockets here and in the aggregator (which inherits
/// the limit).
fn raise_open_file_limit() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

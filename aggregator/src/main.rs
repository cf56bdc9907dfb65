//! `picket-aggregator` command line: run, check a config, or manage certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use picket_aggregator::{certs, config, server};

#[derive(Parser)]
#[command(
    name = "picket-aggregator",
    version,
    about = "Receives metrics from Picket agents over gRPC/TLS and serves them to Prometheus and InfluxDB"
)]
struct Cli {
    /// Config file (TOML). Without it, embedded defaults are used.
    #[arg(long, short, global = true, env = "PICKET_AGGREGATOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the aggregator (the default).
    Run,
    /// Validate the config and exit: 0 when valid, 1 with a precise message otherwise.
    CheckConfig,
    /// Create a fleet CA and certificates, so nobody needs openssl.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create ca.pem, ca-key.pem, aggregator.pem and aggregator-key.pem.
    Init {
        /// Directory to write to.
        #[arg(long, default_value = config::DEFAULT_TLS_DIR)]
        dir: PathBuf,
        /// Extra DNS name or IP address agents use to reach this aggregator (repeatable).
        /// localhost, 127.0.0.1, ::1 and this host's name are always included.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity of the server certificate in days (the CA gets at least ten years).
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Issue a client certificate for agent NAME, signed by the CA in --dir.
    IssueAgent {
        /// The agent's identity; it becomes the `instance` label of everything it sends.
        name: String,
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long, default_value = config::DEFAULT_TLS_DIR)]
        dir: PathBuf,
        /// Where to write NAME.pem and NAME-key.pem (default: <dir>/agents).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config),
        Command::CheckConfig => match config::load(cli.config.as_deref()) {
            Ok(loaded) => {
                println!("{}: configuration is valid", loaded.origin);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Certs(CertsCommand::Init { dir, hosts, days }) => {
            report(certs::init(&dir, &hosts, days), &dir)
        }
        Command::Certs(CertsCommand::IssueAgent {
            name,
            dir,
            out,
            days,
        }) => {
            let out = out.unwrap_or_else(|| dir.join("agents"));
            report(
                certs::issue_agent(&dir, &out, &name, &certs::Validity::days_from_now(days)),
                &out,
            )
        }
    }
}

fn report(result: Result<Vec<PathBuf>, certs::CertError>, dir: &std::path::Path) -> ExitCode {
    match result {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            println!(
                "files in {} are private (0600); copy keys only over secure channels",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config_path: Option<PathBuf>) -> ExitCode {
    let loaded = match config::load(config_path.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log = match loaded.config.log.init() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(config = %loaded.origin, version = env!("CARGO_PKG_VERSION"), "starting picket-aggregator");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::run(loaded.config, config_path, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

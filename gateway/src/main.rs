//! The `fleetgate` command line.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleetgate::config::Config;
use fleetgate::config::loader::{ConfigSource, load};
use fleetgate::run::{Role, add_demo_endpoint, run};

/// mimalloc rather than the system allocator: cheaper small allocations on the per-message
/// path, and freed memory goes back to the system, so a gateway that held a burst of
/// connections does not keep their memory (BENCHMARKS.md, M4).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// fleetgate: a high-throughput IoT device gateway, wire-compatible with Kaa.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// YAML configuration file (else $FLEETGATE_CONFIG, else /srv/fleetgate/service-config.yml
    /// where it exists, else built-in defaults). Any setting can be overridden by FLEETGATE_<KEY>.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in one process: gateway with its transports, DCX and auth, on the
    /// in-process bus (or on NATS when nats.url is set).
    Up,
    /// Run the communication service and its device transports (needs nats.url).
    Gateway,
    /// Run the data collection extension (needs nats.url).
    Dcx,
    /// Run the 16/ECAP authentication provider (needs nats.url).
    Auth,
    /// Print the effective configuration (file, environment overrides and defaults) as YAML
    /// and exit.
    Config,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let source = ConfigSource::resolve(cli.config.as_deref(), &env);
    let mut config: Config = match load(&source, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleetgate: {e}");
            return ExitCode::from(2);
        }
    };
    let role = match cli.command {
        Command::Up => Role::Up,
        Command::Gateway => Role::Gateway,
        Command::Dcx => Role::Dcx,
        Command::Auth => Role::Auth,
        Command::Config => return print_config(&config),
    };
    init_logging(&config.process.log_filter);
    if source == ConfigSource::BuiltInDefaults && matches!(role, Role::Up | Role::Auth) {
        add_demo_endpoint(&mut config.auth);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleetgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(role, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("fleetgate: {e}");
            ExitCode::from(2)
        }
    }
}

fn print_config(config: &Config) -> ExitCode {
    match serde_yaml::to_string(config) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetgate: cannot print the configuration: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

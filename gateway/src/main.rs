//! The `fleetgate` command line: `up`, `config`, and one command per registered service.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Arg, ArgAction, Command};
use fleetgate::config::loader::{ConfigSource, load};
use fleetgate::config::{Config, LogFormat};
use fleetgate::registry::{SERVICES, service};
use fleetgate::reload::Origin;
use fleetgate::run::{Role, add_demo_application, add_demo_endpoint, allow_demo_anonymous, run};

/// mimalloc rather than the system allocator: cheaper small allocations on the per-message
/// path, and freed memory goes back to the system, so a gateway that held a burst of
/// connections does not keep their memory (BENCHMARKS.md, M4).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn cli() -> Command {
    let mut cli = Command::new("fleetgate")
        .version(env!("CARGO_PKG_VERSION"))
        .about("fleetgate: a high-throughput IoT device gateway, wire-compatible with Kaa")
        .subcommand_required(true)
        .arg(
            Arg::new("config")
                .long("config")
                .global(true)
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .action(ArgAction::Set)
                .help(
                    "YAML configuration file (else $FLEETGATE_CONFIG, else \
                     /srv/fleetgate/service-config.yml where it exists, else built-in defaults). \
                     Any setting can be overridden by FLEETGATE_<KEY>.",
                ),
        )
        .subcommand(Command::new("up").about(
            "Run every service in one process, on the in-process bus (or on NATS when nats.url \
             is set)",
        ))
        .subcommand(Command::new("config").about(
            "Print the effective configuration (file, environment overrides and defaults) as \
             YAML and exit",
        ))
        .subcommand(
            Command::new("keygen")
                .about(
                    "Write a new key pair for the custom UDP transport (FGU/1) to --out (else \
                     transports.udp.private_key_path, else ./fleetgate-udp.key) and its public \
                     key, which devices pin, to <file>.pub; never overwrites",
                )
                .arg(
                    Arg::new("out")
                        .long("out")
                        .value_name("FILE")
                        .value_parser(clap::value_parser!(PathBuf))
                        .action(ArgAction::Set),
                ),
        );
    for s in SERVICES {
        cli = cli.subcommand(Command::new(s.name).about(s.about));
    }
    cli
}

fn main() -> ExitCode {
    let matches = cli().get_matches();
    let env: HashMap<String, String> = std::env::vars().collect();
    let path = matches.get_one::<PathBuf>("config").cloned();
    let source = ConfigSource::resolve(path.as_deref(), &env);
    let mut config: Config = match load(&source, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleetgate: {e}");
            return ExitCode::from(2);
        }
    };
    let role = match matches.subcommand_name() {
        Some("config") => return print_config(&config),
        Some("keygen") => {
            let out =
                matches.subcommand_matches("keygen").and_then(|m| m.get_one::<PathBuf>("out"));
            return keygen(out.cloned(), &config);
        }
        Some("up") => Role::Up,
        Some(name) => match service(name) {
            Some(entry) => Role::One(entry),
            None => {
                eprintln!("fleetgate: unknown command `{name}`");
                return ExitCode::from(2);
            }
        },
        None => return ExitCode::from(2),
    };
    let log = std::sync::Arc::new(fleetgate::logging::init(&config.log));
    let json_logs = config.log.format == LogFormat::Json;
    for name in fleetgate::config::loader::ignored_service_links(&env) {
        tracing::debug!(variable = name, "ignored: a Kubernetes service link, not a setting");
    }
    // Built-in defaults: the demo endpoint and application, added again on every reload.
    // The demo lets clients without credentials in, unless the environment says otherwise.
    let builtin = source == ConfigSource::BuiltInDefaults;
    let anonymous = !env.contains_key("FLEETGATE_AUTH_ALLOW_ANONYMOUS");
    let amend: fn(&mut Config) = match (builtin, role.name(), anonymous) {
        (true, "up", true) => |c| {
            add_demo_endpoint(&mut c.auth);
            allow_demo_anonymous(&mut c.auth);
            add_demo_application(c);
        },
        (true, "up", false) => |c| {
            add_demo_endpoint(&mut c.auth);
            add_demo_application(c);
        },
        (true, "auth", true) => |c| {
            add_demo_endpoint(&mut c.auth);
            allow_demo_anonymous(&mut c.auth);
        },
        (true, "auth", false) => |c| add_demo_endpoint(&mut c.auth),
        (true, "epts", _) => add_demo_application,
        _ => |_| {},
    };
    amend(&mut config);
    // One rustls crypto provider for the process (ring), for libraries that ask for the default.
    fleetgate_tls::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleetgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let origin = Origin { source, env, amend, log: Some(log) };
    match runtime.block_on(run(role, config, origin)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = error_chain(&e);
            tracing::error!("{message}");
            // With JSON logs every line on stderr stays a JSON object for the log collector.
            if !json_logs {
                eprintln!("fleetgate: {message}");
            }
            ExitCode::from(2)
        }
    }
}

/// The error and its sources, `: `-separated, for one line of log.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

fn keygen(out: Option<PathBuf>, config: &Config) -> ExitCode {
    let path = out
        .or_else(|| config.transports.udp.private_key_path.clone())
        .unwrap_or_else(|| PathBuf::from("fleetgate-udp.key"));
    match fleetgate_transport_udp::keys::generate(&path) {
        Ok(keys) => {
            let public = fleetgate_transport_udp::keys::public_path(&path);
            println!("private key: {}", path.display());
            println!(
                "public key:  {} (also in {})",
                fleetgate_transport_udp::handshake::hex(&keys.public),
                public.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetgate: keygen: {e}");
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

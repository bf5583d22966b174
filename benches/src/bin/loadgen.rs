//! `fleetgate-loadgen`: simulated device fleets against fleetgate or any MQTT broker.
//!
//! ```sh
//! fleetgate-loadgen --target fleetgate --mqtt 127.0.0.1:11883 --nats-url nats://127.0.0.1:4222 \
//!     --devices 1000 --rates 10000,20000,40000 --step-secs 5 --out run.json --fail-if 'p99_ms>50'
//! fleetgate-loadgen --target broker --mqtt 127.0.0.1:21883 --qos 1 --rates 10000,20000
//! fleetgate-loadgen --transport coap --coap 127.0.0.1:5683 --qos 1 --nats-url nats://127.0.0.1:4222
//! fleetgate-loadgen --transport http --http 127.0.0.1:8080 --nats-url nats://127.0.0.1:4222
//! fleetgate-loadgen --idle --devices 15000 --source-ips 127.0.0.2-127.0.0.20 --hold-secs 30
//! fleetgate-loadgen merge gen0.json gen1.json --out all.json
//! ```
//!
//! Exit status: 0 done, 1 a `--fail-if` threshold was crossed, 2 the run could not be done (or
//! was cut short by `--max-secs`), 130 / 143 stopped by SIGINT / SIGTERM (the partial result is
//! written all the same; a second signal exits at once).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleetgate_benches::loadgen::{LoadgenArgs, run_until, summary_table};
use fleetgate_benches::report::Report;
use fleetgate_benches::threshold::Threshold;

/// Simulates a fleet of MQTT, CoAP or HTTP devices publishing 1/KP data samples at open-loop
/// stepped rates, counts delivery at the far end, and reports rates, loss, failures and
/// latency per step.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: LoadgenArgs,
    /// Runtime threads (default: the CPUs this process may run on).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Combines the JSON results of several generator processes that loaded the same system at
    /// the same time into one result (counts add up, latency histograms merge).
    Merge(MergeArgs),
}

#[derive(clap::Args)]
struct MergeArgs {
    /// The JSON results to merge.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Write the merged JSON here (and beside it the CSV and HTML report).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the CSV here (default: the JSON path with `.csv`).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the HTML report here (default: the JSON path with `.html`).
    #[arg(long)]
    html: Option<PathBuf>,
    /// Thresholds on the merged result, as for a run.
    #[arg(long = "fail-if", value_name = "METRIC OP VALUE")]
    fail_if: Vec<String>,
    /// No summary table on stderr.
    #[arg(long)]
    quiet: bool,
}

/// The first SIGINT or SIGTERM, by name; a second one exits at once.
async fn first_signal() -> String {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    };
    eprintln!("fleetgate-loadgen: {name}: stopping, writing the partial result (again to quit)");
    tokio::spawn(async move {
        let code = tokio::select! {
            _ = int.recv() => 130,
            _ = term.recv() => 143,
        };
        std::process::exit(code);
    });
    name.to_owned()
}

fn finish(report: &Report, quiet: bool) -> ExitCode {
    if !quiet {
        eprint!("{}", summary_table(report));
    }
    let held = report.idle.as_ref().map_or(0, |i| i.held);
    let thresholds_failed = report.thresholds.iter().filter(|t| t.failed).count();
    println!(
        "{{\"event\":\"done\",\"run_id\":\"{}\",\"delivered\":{},\"sent\":{},\"lost\":{},\"failures\":{},\"held\":{},\"msr\":{},\"interrupted\":{},\"thresholds_failed\":{}}}",
        report.run_id,
        report.totals.delivered,
        report.totals.sent,
        report.totals.lost,
        report.totals.failure_count(),
        held,
        report.msr.as_ref().map_or(0, |m| m.rate),
        report.interrupted.as_deref().map_or_else(|| "null".into(), |w| format!("\"{w}\"")),
        thresholds_failed
    );
    match report.interrupted.as_deref() {
        Some("SIGINT") => ExitCode::from(130),
        Some("SIGTERM") => ExitCode::from(143),
        // Cut short by --max-secs: not the run asked for (its partial result is written).
        Some(_) => ExitCode::from(2),
        None if thresholds_failed > 0 => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    }
}

fn merge(m: &MergeArgs) -> Result<Report, String> {
    let thresholds =
        m.fail_if.iter().map(|t| t.parse::<Threshold>()).collect::<Result<Vec<_>, _>>()?;
    let reports = m
        .inputs
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            serde_json::from_str::<Report>(&text).map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut merged = fleetgate_benches::merge::merge(&reports)?;
    fleetgate_benches::threshold::apply(&mut merged, &thresholds);
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
    };
    if let Some(out) = &m.out {
        write(out, serde_json::to_string_pretty(&merged).unwrap_or_default())?;
    }
    let beside = |given: &Option<PathBuf>, ext: &str| {
        given.clone().or_else(|| m.out.as_ref().map(|p| p.with_extension(ext)))
    };
    if let Some(p) = beside(&m.csv, "csv") {
        write(&p, fleetgate_benches::output::csv(&merged))?;
    }
    if let Some(p) = beside(&m.html, "html") {
        write(&p, fleetgate_benches::output::html(&merged))?;
    }
    Ok(merged)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Merge(m)) = &cli.command {
        return match merge(m) {
            Ok(report) => finish(&report, m.quiet),
            Err(e) => {
                eprintln!("fleetgate-loadgen merge: {e}");
                ExitCode::from(2)
            }
        };
    }
    let threads = cli
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
        .max(1);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleetgate-loadgen: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_until(&cli.args, first_signal())) {
        Ok(report) => finish(&report, cli.args.quiet),
        Err(e) => {
            eprintln!("fleetgate-loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

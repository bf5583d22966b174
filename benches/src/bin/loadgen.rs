//! `fleetgate-loadgen`: simulated device fleets against fleetgate or any MQTT broker.
//!
//! ```sh
//! fleetgate-loadgen --target fleetgate --mqtt 127.0.0.1:11883 --nats-url nats://127.0.0.1:4222 \
//!     --devices 1000 --rates 10000,20000,40000 --step-secs 5 --out run.json
//! fleetgate-loadgen --target broker --mqtt 127.0.0.1:21883 --qos 1 --rates 10000,20000
//! fleetgate-loadgen --transport coap --coap 127.0.0.1:5683 --qos 1 --nats-url nats://127.0.0.1:4222
//! fleetgate-loadgen --transport http --http 127.0.0.1:8080 --nats-url nats://127.0.0.1:4222
//! fleetgate-loadgen --idle --devices 15000 --source-ips 127.0.0.2-127.0.0.20 --hold-secs 30
//! ```

use std::process::ExitCode;

use clap::Parser;
use fleetgate_benches::loadgen::{LoadgenArgs, run, summary_table};

/// Simulates a fleet of MQTT, CoAP or HTTP devices publishing 1/KP data samples at open-loop
/// stepped rates, counts delivery at the far end, and reports rates, loss and latency per step.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: LoadgenArgs,
    /// Runtime threads (default: the CPUs this process may run on).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match runtime.block_on(run(&cli.args)) {
        Ok(report) => {
            if !cli.args.quiet {
                eprint!("{}", summary_table(&report));
            }
            let held = report.idle.as_ref().map_or(0, |i| i.held);
            println!(
                "{{\"event\":\"done\",\"delivered\":{},\"sent\":{},\"held\":{},\"msr\":{}}}",
                report.totals.delivered,
                report.totals.sent,
                held,
                report.msr.as_ref().map_or(0, |m| m.rate)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetgate-loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

//! `fleetgate-compare`: fleetgate against Mosquitto and rumqttd (and optionally a second
//! fleetgate build) in one run, alternating, with the generator pinned to its own core; prints
//! medians and ratios.
//!
//! ```sh
//! export CARGO_TARGET_DIR=target
//! cargo build --release -p fleetgate -p fleetgate-benches
//! target/release/fleetgate-compare --out compare-results              # M1, M2, M4, M5
//! target/release/fleetgate-compare --scenarios m1 --pairs 2 --peers mosquitto
//! # A/B of two fleetgate builds in one run (fleetgate / fleetgate-b ratios), no broker:
//! target/release/fleetgate-compare --scenarios m1,m5 --peers '' --fleetgate-b-bin old/fleetgate
//! ```

use std::process::ExitCode;

use clap::Parser;
use fleetgate_benches::compare::{CompareArgs, run};

/// Compares fleetgate with MQTT brokers, or with a second fleetgate build, on this machine:
/// maximum sustainable rate (M1 QoS 0, M2 QoS 1), idle connections and memory per connection
/// (M4), latency at 10k msg/s (M5).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: CompareArgs,
}

fn main() -> ExitCode {
    match run(Cli::parse().args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetgate-compare: {e}");
            ExitCode::from(2)
        }
    }
}

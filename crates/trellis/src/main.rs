//! The `trellis` command.

mod args;
mod bench;
mod generate;
mod serve;

use std::process::ExitCode;

use clap::Parser;

use args::{BenchCommand, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Serve(a) => serve::run(*a),
        Command::Bench(BenchCommand::Throughput(a)) => bench::throughput(a),
        Command::Bench(BenchCommand::Latency(a)) => bench::latency(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One plain line: the chain of causes joined, no backtrace.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

//! The `trellis` command.

mod args;
mod bench;
mod bench_serve;
mod bench_structured;
mod constraint_args;
mod embed;
mod generate;
mod lora_args;
mod machine;
mod platforms;
mod plugins;
mod serve;

use std::process::ExitCode;

use clap::Parser;

use args::{BenchCommand, Cli, Command, PluginsCommand};

// Compiled-in example plugins: naming the crate makes the linker keep its registrations.
#[cfg(feature = "example-plugins")]
use custom_attention as _;
#[cfg(feature = "example-plugins")]
use dummy_model as _;
#[cfg(feature = "example-plugins")]
use dummy_platform as _;
#[cfg(feature = "example-plugins")]
use index_lora_resolver as _;
#[cfg(feature = "example-plugins")]
use json_stat_logger as _;

/// Keeps freed heap memory mapped instead of returning it to the kernel: a step allocates
/// and frees the same few megabytes per layer (the tensors at the attention backend's
/// boundary), and glibc's default trimming made every layer fault in fresh zeroed pages
/// (~8% of a prefill in the kernel's `clear_page`). Memory stays bounded by the peak in use.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    trellis_plugin::set_host_cargo_lock(plugins::HOST_CARGO_LOCK);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Serve(a) => serve::run(*a),
        Command::Bench(BenchCommand::Throughput(a)) => bench::throughput(a),
        Command::Bench(BenchCommand::Latency(a)) => bench::latency(a),
        Command::Bench(BenchCommand::Serve(a)) => bench_serve::run(a),
        Command::Plugins(PluginsCommand::List { json }) => plugins::list(json),
        Command::Plugins(PluginsCommand::Build {
            path,
            debug,
            target_dir,
        }) => plugins::build(&path, debug, target_dir),
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

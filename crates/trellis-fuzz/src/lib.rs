//! # trellis-fuzz — fuzzing the parsers that read other people's bytes
//!
//! Model files, tokenizer and config JSON, chat templates and HTTP requests come from other
//! people. Each [target](targets::TARGETS) feeds mutated inputs through the code that reads
//! them, the way `trellis serve` would, and looks for panics, server errors and slow inputs.
//!
//! The harness runs on stable Rust: a mutational fuzzer ([`mutate`]) seeded from real files
//! (the default model's tokenizer and chat template, a tiny Llama built from it as GGUF and as
//! safetensors, the embedding model's JSON files, OpenAI requests), with a crude novelty
//! signal instead of coverage: an input whose outcome (the error it is refused with) is new
//! joins the corpus. Aborts (an allocation the memory cap refuses) cannot be caught in
//! process: the binary writes each input to a file first, so `scripts/fuzz.sh` keeps the one
//! that killed it.
//!
//! ```sh
//! scripts/fuzz.sh 600               # every target for 600 s each
//! cargo run --release -p trellis-fuzz -- gguf-model --seconds 60
//! ```

pub mod mutate;
pub mod targets;
pub mod tiny;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mutate::{Rng, mutate};
pub use targets::{Ctx, TARGETS};

/// The system allocator with a cap on any single allocation, for the fuzz binaries to install
/// as `#[global_allocator]`: a parser that trusts a size field and asks for more is a finding
/// (the process aborts; `scripts/fuzz.sh` keeps the input that did it).
pub struct CappedAlloc;

/// Largest single allocation allowed (the real model's biggest tensor is ~30 MB).
pub const MAX_ALLOC: usize = 2 << 30;

/// Whether an allocation of `size` bytes is over the cap (said on stderr without allocating).
fn over_cap(size: usize) -> bool {
    let over = size > MAX_ALLOC;
    if over {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"trellis-fuzz: refused an allocation over the 2 GiB cap\n",
        );
    }
    over
}

// SAFETY: forwards to the system allocator, refusing (null) only oversized requests, which
// is what an allocator may do.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if over_cap(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if over_cap(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if over_cap(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// How long a target runs.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// This many inputs (seeds included).
    Iterations(u64),
    /// This much time.
    Time(Duration),
}

/// Something a target must never do.
#[derive(Debug, Clone)]
pub struct Finding {
    /// What happened: a panic message, a server error, a slow input.
    pub what: String,
    /// Where the input was saved, if a directory was given.
    pub saved: Option<PathBuf>,
}

/// One target's run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The target.
    pub target: String,
    /// Inputs run.
    pub execs: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Distinct outcomes seen (the novelty signal).
    pub outcomes: usize,
    /// Inputs kept in the corpus.
    pub corpus: usize,
    /// The slowest input's time.
    pub slowest: Duration,
    /// Panics, server errors and inputs slower than [`SLOW`].
    pub findings: Vec<Finding>,
}

/// An input slower than this is a finding (a hang in the making).
pub const SLOW: Duration = Duration::from_secs(10);

static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Records panic messages instead of printing them (call once per process).
pub fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let msg = match info.payload().downcast_ref::<&str>() {
            Some(s) => s.to_string(),
            None => info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default(),
        };
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut p) = PANIC.lock() {
            *p = Some(format!("{msg}{at}"));
        }
    }));
}

/// The novelty key of an outcome: its text without numbers, cut short.
fn key(outcome: &str) -> String {
    outcome
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(120)
        .collect()
}

fn save(dir: Option<&Path>, target: &str, n: usize, input: &[u8]) -> Option<PathBuf> {
    let dir = dir?;
    std::fs::create_dir_all(dir).ok()?;
    let p = dir.join(format!("{target}-{n}.bin"));
    std::fs::write(&p, input).ok()?;
    Some(p)
}

/// Fuzzes `target` for `budget` from PRNG seed `seed`. Each input is first written to
/// `current` (if given) so that an abort leaves it behind; findings are saved in `crashes`.
pub fn fuzz(
    ctx: &mut Ctx,
    target: &str,
    budget: Budget,
    seed: u64,
    crashes: Option<&Path>,
    current: Option<&Path>,
) -> anyhow::Result<Report> {
    ctx.prepare(target)?;
    let mut corpus = ctx.seeds(target)?;
    let n_seeds = corpus.len() as u64;
    let mut seen = HashSet::new();
    let mut rng = Rng::new(seed);
    let mut report = Report {
        target: target.to_string(),
        execs: 0,
        elapsed: Duration::ZERO,
        outcomes: 0,
        corpus: 0,
        slowest: Duration::ZERO,
        findings: Vec::new(),
    };
    let start = Instant::now();
    loop {
        let done = match budget {
            Budget::Iterations(n) => report.execs >= n,
            Budget::Time(t) => report.execs >= n_seeds && start.elapsed() >= t,
        };
        if done {
            break;
        }
        let input = if report.execs < n_seeds {
            corpus[report.execs as usize].clone()
        } else {
            let mut x = corpus[rng.below(corpus.len())].clone();
            let other = corpus[rng.below(corpus.len())].clone();
            mutate(&mut rng, &mut x, &other);
            x
        };
        if let Some(cur) = current {
            std::fs::write(cur, &input)?;
        }
        let t0 = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| ctx.run(target, &input)));
        let took = t0.elapsed();
        report.execs += 1;
        report.slowest = report.slowest.max(took);
        let problem = match result {
            Ok(Ok(outcome)) => {
                if seen.insert(key(&outcome)) && corpus.len() < 2000 {
                    corpus.push(input.clone());
                }
                (took > SLOW).then(|| format!("slow input: {:.1} s", took.as_secs_f64()))
            }
            Ok(Err(e)) => Some(format!("error: {e:#}")),
            Err(_) => {
                let msg = PANIC.lock().ok().and_then(|mut p| p.take());
                Some(format!("panic: {}", msg.unwrap_or_default()))
            }
        };
        if let Some(what) = problem {
            let saved = save(crashes, target, report.findings.len(), &input);
            report.findings.push(Finding { what, saved });
        }
    }
    report.elapsed = start.elapsed();
    report.outcomes = seen.len();
    report.corpus = corpus.len();
    Ok(report)
}

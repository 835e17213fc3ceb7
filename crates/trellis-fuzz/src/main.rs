//! `trellis-fuzz TARGET|all [--seconds N | --iterations N] [--seed S] [--crashes DIR]`:
//! see the crate docs and `scripts/fuzz.sh`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use trellis_fuzz::{Budget, Ctx, TARGETS, fuzz, quiet_panics};

#[global_allocator]
static ALLOC: trellis_fuzz::CappedAlloc = trellis_fuzz::CappedAlloc;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut target = None;
    let mut budget = Budget::Time(Duration::from_secs(60));
    let mut seed = 1u64;
    let mut crashes = PathBuf::from("target/fuzz/crashes");
    let mut models = PathBuf::from("models");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--seconds" => budget = Budget::Time(Duration::from_secs_f64(val(a)?.parse()?)),
            "--iterations" => budget = Budget::Iterations(val(a)?.parse()?),
            "--seed" => seed = val(a)?.parse()?,
            "--crashes" => crashes = PathBuf::from(val(a)?),
            "--models" => models = PathBuf::from(val(a)?),
            t if !t.starts_with('-') && target.is_none() => target = Some(t.to_string()),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let Some(target) = target else {
        bail!(
            "usage: trellis-fuzz TARGET|all [--seconds N | --iterations N] [--seed S] [--crashes DIR]\ntargets: {}",
            TARGETS.join(", ")
        );
    };
    let targets: Vec<&str> =
        match target.as_str() {
            "all" => TARGETS.to_vec(),
            t => {
                vec![TARGETS.iter().copied().find(|x| *x == t).with_context(|| {
                    format!("unknown target {t:?}: one of {}", TARGETS.join(", "))
                })?]
            }
        };
    quiet_panics();
    let mut ctx = Ctx::new(&models)?;
    std::fs::create_dir_all(&crashes)?;
    let current = crashes.join("current.bin");
    let mut total = 0;
    for t in targets {
        let r = fuzz(&mut ctx, t, budget, seed, Some(&crashes), Some(&current))?;
        println!(
            "{:<17} {:>9} execs in {:>7.1} s ({:>7.1}/s), {:>4} outcomes, corpus {:>4}, slowest {:.2} s, findings {}",
            r.target,
            r.execs,
            r.elapsed.as_secs_f64(),
            r.execs as f64 / r.elapsed.as_secs_f64().max(1e-9),
            r.outcomes,
            r.corpus,
            r.slowest.as_secs_f64(),
            r.findings.len()
        );
        for f in &r.findings {
            println!(
                "  FINDING {}: {}",
                f.saved
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                f.what
            );
        }
        total += r.findings.len();
    }
    let _ = std::fs::remove_file(&current);
    if total > 0 {
        bail!("{total} finding(s); inputs saved in {}", crashes.display());
    }
    Ok(())
}

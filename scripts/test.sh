#!/usr/bin/env bash
# Runs every test of the workspace. This is the command README.md shows and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x scripts/fetch-model.sh ]; then
  scripts/fetch-model.sh
fi
if [ -x scripts/fetch-embedding-model.sh ]; then
  scripts/fetch-embedding-model.sh
fi
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
# The OpenAI-compatible server against the official `openai` client (python/requirements.txt).
# `--no-run` with the same selection as above is a no-op that guarantees target/debug/trellis
# exists with the workspace's feature set (a plain `cargo build -p trellis` would rebuild deps).
cargo test --workspace --no-run
python3 -m pytest -q python/tests
# The example plugins compiled into the binary (the run above loads them at run time).
cargo test -p trellis --features example-plugins --test plugin_examples --test plugins

#!/usr/bin/env bash
# Runs every test of the workspace. This is the command README.md shows and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x scripts/fetch-model.sh ]; then
  scripts/fetch-model.sh
fi
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
cargo test --workspace --doc
# The OpenAI-compatible server against the official `openai` client (python/requirements.txt).
cargo build -p trellis
python3 -m pytest -q python/tests

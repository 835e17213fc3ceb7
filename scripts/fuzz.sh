#!/usr/bin/env bash
# Fuzzes the parsers that read other people's bytes (GGUF, safetensors, config/tokenizer JSON,
# chat templates, OpenAI requests) with crates/trellis-fuzz, each target for SECONDS.
#   scripts/fuzz.sh [SECONDS] [TARGET|all]        (default: 300 s each, all targets)
# Findings (panics, server errors, slow inputs) are saved in target/fuzz/crashes/. An abort (an
# allocation over the harness's 2 GiB cap, a stack overflow) kills the process: the input that
# did it is kept as target/fuzz/crashes/<target>-abort-<time>.bin and the next target runs.
set -uo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-300}"
WHICH="${2:-all}"
[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] || { echo "$0: the default model is missing: run scripts/fetch-model.sh" >&2; exit 1; }
cargo build --release -q -p trellis-fuzz || exit 1
BIN=target/release/trellis-fuzz
CRASHES=target/fuzz/crashes
mkdir -p "$CRASHES"
if [ "$WHICH" = all ]; then
  TARGETS=$("$BIN" 2>&1 | sed -n 's/^targets: //p' | tr -d ',')
else
  TARGETS="$WHICH"
fi
status=0
for t in $TARGETS; do
  SEED=$(date +%s)
  RUST_BACKTRACE=0 "$BIN" "$t" --seconds "$SECS" --seed "$SEED" --crashes "$CRASHES" 2>"$CRASHES/$t.stderr" \
    | grep -v '^INFO'
  rc=${PIPESTATUS[0]}
  if [ "$rc" -gt 1 ] && [ -f "$CRASHES/current.bin" ]; then
    keep="$CRASHES/$t-abort-$SEED.bin"
    mv "$CRASHES/current.bin" "$keep"
    echo "$t: ABORTED (exit $rc); input kept as $keep; stderr: $(tail -1 "$CRASHES/$t.stderr")"
    status=1
  elif [ "$rc" -ne 0 ]; then
    status=1
  fi
done
exit $status

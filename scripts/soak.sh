#!/usr/bin/env bash
# Soak test (issue 14): SOAK_MINUTES (default 30) of mixed traffic against a real release
# `trellis serve` on the default model — completions and chat, streamed and not, n>1, logprobs,
# shared prefixes, mid-stream disconnects, bad requests — sampling its RSS and open file
# descriptors every 10 s. Passes when every good request succeeds, no request gets a 5xx, RSS
# after the warm-up (SOAK_WARMUP_MINUTES, default 5) grows less than 10% and no descriptor
# leaks. Prints the samples and a JSON summary.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${SOAK_MINUTES:-30}"
WARMUP="${SOAK_WARMUP_MINUTES:-5}"
PY="${TRELLIS_VENV:-.venv}/bin/python"
[ -x "$PY" ] || { echo "$0: no venv at ${TRELLIS_VENV:-.venv}: run scripts/test.sh once first" >&2; exit 1; }
[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] || { echo "$0: the default model is missing: run scripts/fetch-model.sh" >&2; exit 1; }
cargo build --release -q -p trellis
PORT="${SOAK_PORT:-8391}"
LOG=target/soak-server.log
target/release/trellis serve --host 127.0.0.1 --port "$PORT" --served-model-name smollm2 \
  --max-model-len 2048 --kv-cache-memory 128M >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $PID 2>/dev/null || { echo "$0: the server exited: $(tail -3 "$LOG")" >&2; exit 1; }
  sleep 1
done
"$PY" python/soak.py --base "http://127.0.0.1:$PORT" --pid "$PID" \
  --seconds "$((MINUTES * 60))" --warmup "$((WARMUP * 60))"

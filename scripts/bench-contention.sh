#!/usr/bin/env bash
# Contention benchmark (issue 14 item 3): the decode step of `trellis bench latency` alone and
# with HOGS busy-loop processes (default 2) running beside it, in one run, alternating RUNS
# times (default 3); prints the medians and their ratio (goal: within 3x). Then the CPU an idle
# `trellis serve` uses over 10 s (goal: none).
#   RUNS=3 HOGS=2 scripts/bench-contention.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
HOGS="${HOGS:-2}"
BIN="${TRELLIS_BIN:-target/release/trellis}"
[ -n "${TRELLIS_BIN:-}" ] || cargo build --release -q -p trellis
step_ms() {
  "$BIN" bench latency --input-len 32 --output-len 128 --num-iters 3 2>/dev/null \
    | sed -n 's/.*decode step mean \([0-9.]*\) ms.*/\1/p'
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
quiet=(); busy=()
echo "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$RUNS"); do
  quiet+=("$(step_ms)")
  pids=()
  for _ in $(seq "$HOGS"); do (while :; do :; done) & pids+=($!); done
  busy+=("$(step_ms)")
  kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true
  echo "run $r: decode step ${quiet[-1]} ms alone, ${busy[-1]} ms beside $HOGS busy loops"
done
q=$(printf '%s\n' "${quiet[@]}" | median)
b=$(printf '%s\n' "${busy[@]}" | median)
echo "median decode step: $q ms alone, $b ms with $HOGS hogs: $(awk -v q="$q" -v b="$b" 'BEGIN {printf "%.2fx", b/q}') (goal: within 3x)"

PORT=$((20000 + RANDOM % 20000))
"$BIN" serve --host 127.0.0.1 --port "$PORT" --kv-cache-memory 256M >/dev/null 2>&1 &
SPID=$!
trap 'kill $SPID 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
  -d '{"prompt": "Hello", "max_tokens": 16}' >/dev/null
sleep 3
ticks() { awk '{print $14 + $15}' "/proc/$SPID/stat"; }
t0=$(ticks); sleep 10; t1=$(ticks)
echo "idle server: $(awk -v a="$t0" -v b="$t1" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.3f", (b-a)/hz}') CPU seconds in 10 s (goal: ~0)"

#!/usr/bin/env bash
# Embeddings per second: Trellis against sentence-transformers on the same CPU, in one run, on
# all-MiniLM-L6-v2 (scripts/fetch-embedding-model.sh), with the same number of prompts of the
# same token length and the same threads. Runs of the two alternate; medians and the ratio
# Trellis / sentence-transformers are printed.
#
#   scripts/bench-vs-sentence-transformers.sh                  # RUNS=3, THREADS=$(nproc)
#   RUNS=1 THREADS=2 NUM_PROMPTS=256 INPUT_LEN=128 scripts/bench-vs-sentence-transformers.sh
#
# sentence-transformers (and torch, from PyPI) is installed into a virtualenv in
# ${TRELLIS_BENCH_CACHE:-~/.cache/trellis-bench}/st-venv on the first run (a large download).
# Trellis is built with `cargo build --release -p trellis` unless TRELLIS_BIN names a binary.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${RUNS:-3}"
THREADS="${THREADS:-$(nproc)}"
NUM_PROMPTS="${NUM_PROMPTS:-128}"
INPUT_LEN="${INPUT_LEN:-64}"
CACHE="${TRELLIS_BENCH_CACHE:-$HOME/.cache/trellis-bench}"
VENV="$CACHE/st-venv"
MODEL="models/all-MiniLM-L6-v2"

mkdir -p "$CACHE"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sentence_transformers' 2>/dev/null; then
  echo "installing sentence-transformers (and torch) into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check sentence-transformers
fi
PYTHON="$VENV/bin/python" scripts/fetch-embedding-model.sh
if [[ -z "${TRELLIS_BIN:-}" ]]; then
  cargo build --release -p trellis
  TRELLIS_BIN=target/release/trellis
fi

st_run() {
  "$VENV/bin/python" - "$MODEL" "$NUM_PROMPTS" "$INPUT_LEN" "$THREADS" <<'EOF'
import sys, time
import torch
from sentence_transformers import SentenceTransformer
model_dir, n, length, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = SentenceTransformer(model_dir, device="cpu")
# length tokens each: [CLS] + (length - 2) one-token words + [SEP].
texts = [" ".join(["hello"] * (length - 2)) for _ in range(n)]
assert len(model.tokenizer(texts[0])["input_ids"]) == length
model.encode(texts[:8])  # warm-up
start = time.perf_counter()
model.encode(texts, batch_size=32)
print(n / (time.perf_counter() - start))
EOF
}

trellis_run() {
  local out
  out="$(mktemp)"
  TRELLIS_NUM_THREADS="$THREADS" "$TRELLIS_BIN" bench throughput --model "$MODEL" \
    --num-prompts "$NUM_PROMPTS" --input-len "$INPUT_LEN" --output-json "$out" >/dev/null 2>&1
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["requests_per_second"])' "$out"
  rm -f "$out"
}

median() { sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

st=()
tr=()
for ((i = 1; i <= RUNS; i++)); do
  st+=("$(st_run)")
  tr+=("$(trellis_run)")
  echo "run $i: sentence-transformers ${st[-1]} embeddings/s, Trellis ${tr[-1]} embeddings/s" >&2
done
st_med="$(printf '%s\n' "${st[@]}" | median)"
tr_med="$(printf '%s\n' "${tr[@]}" | median)"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), threads $THREADS, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-24s %12s %12s %8s\n' "embeddings/s" "sent.-transf." "Trellis" "ratio"
printf '%-24s %12.1f %12.1f %8.2f\n' "$NUM_PROMPTS x $INPUT_LEN tokens" "$st_med" "$tr_med" \
  "$(python3 -c "print($tr_med / $st_med)")"

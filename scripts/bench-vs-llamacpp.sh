#!/usr/bin/env bash
# Trellis against llama.cpp on this machine, same model (SmolLM2-135M-Instruct Q4_1), same
# threads, runs alternated: single-stream decode, prefill, and serving 8 concurrent streams.
#
#   scripts/bench-vs-llamacpp.sh            # RUNS=3, THREADS=$(nproc)
#   RUNS=1 THREADS=2 scripts/bench-vs-llamacpp.sh
#
# Environment:
#   RUNS                 runs of each measure per engine, alternated (default 3); medians printed
#   THREADS              threads for both engines (default: nproc)
#   TRELLIS_BENCH_CACHE  where llama.cpp is built and logs go (default ~/.cache/trellis-bench)
#   TRELLIS_BIN          a trellis binary to use instead of `cargo build --release -p trellis`
#   MODEL                a GGUF file (default: models/SmolLM2-135M-Instruct.Q4_1.gguf, fetched)
#   IK_LLAMA_BENCH       an ik_llama.cpp llama-bench binary: also run for decode and prefill
#
# llama.cpp comes from the llama-cpp-python 0.3.36 sdist on PyPI (it vendors llama.cpp with
# ggml 0.25.3), built once into the cache with -DGGML_NATIVE=ON and AMX switched off: on CPUs
# that list AMX, ggml 0.25.3's AMX Q4_1 kernel dies with SIGILL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RUNS="${RUNS:-3}"
THREADS="${THREADS:-$(nproc)}"
CACHE="${TRELLIS_BENCH_CACHE:-$HOME/.cache/trellis-bench}"
LLAMA_CPP_PY_VERSION="0.3.36"
SRC="$CACHE/llama_cpp_python-$LLAMA_CPP_PY_VERSION/vendor/llama.cpp"
BUILD="$CACHE/llama.cpp-build"
LLAMA_BENCH="$BUILD/bin/llama-bench"
LLAMA_SERVER="$BUILD/bin/llama-server"
LOGS="$CACHE/logs"
# Serving load: 32 requests of 100 random prompt tokens x 128 output tokens (EOS ignored),
# 8 in flight.
SERVE_PROMPTS=32
SERVE_IN=100
SERVE_OUT=128
SERVE_CONC=8

mkdir -p "$CACHE" "$LOGS"

say() { echo "==> $*"; }
die() {
    echo "bench-vs-llamacpp: $*" >&2
    exit 1
}

PY="$(command -v python3 || true)"
[[ -n "$PY" ]] || die "python3 is required (pip download, JSON parsing)"
command -v curl >/dev/null || die "curl is required (server readiness)"

# ---------------------------------------------------------------------------------------------
# llama.cpp
# ---------------------------------------------------------------------------------------------
find_cmake() {
    if command -v cmake >/dev/null 2>&1; then
        command -v cmake
    elif [[ -x "$CACHE/tools-venv/bin/cmake" ]]; then
        echo "$CACHE/tools-venv/bin/cmake"
    else
        say "cmake not found: installing it with pip into $CACHE/tools-venv" >&2
        { "$PY" -m venv "$CACHE/tools-venv" && "$CACHE/tools-venv/bin/python" -m pip install --quiet cmake; } \
            >"$LOGS/pip-cmake.log" 2>&1 \
            || die "could not install cmake; run: python3 -m pip install cmake (log: $LOGS/pip-cmake.log)"
        echo "$CACHE/tools-venv/bin/cmake"
    fi
}

build_llama_cpp() {
    if [[ -x "$LLAMA_BENCH" && -x "$LLAMA_SERVER" ]]; then
        return
    fi
    local sdist="$CACHE/llama_cpp_python-$LLAMA_CPP_PY_VERSION.tar.gz"
    if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
        if [[ ! -f "$sdist" ]]; then
            say "downloading the llama-cpp-python $LLAMA_CPP_PY_VERSION sdist (pip)"
            # --no-binary for this package only: with `:all:` pip also builds the sdist's
            # build requirements (cmake, ninja) from source just to read its metadata.
            "$PY" -m pip download --no-deps --no-binary llama-cpp-python \
                "llama-cpp-python==$LLAMA_CPP_PY_VERSION" -d "$CACHE" >"$LOGS/pip-download.log" 2>&1 \
                || die "pip download failed (log: $LOGS/pip-download.log)"
        fi
        tar -xzf "$sdist" -C "$CACHE"
        [[ -f "$SRC/CMakeLists.txt" ]] || die "no vendor/llama.cpp in $sdist"
    fi
    local cmake
    cmake="$(find_cmake)"
    local noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    say "building llama.cpp (llama-bench, llama-server) in $BUILD: several minutes; log: $LOGS/llama-cpp-build.log"
    {
        "$cmake" -S "$SRC" -B "$BUILD" \
            -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
            -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            "-DCMAKE_C_FLAGS=$noamx" "-DCMAKE_CXX_FLAGS=$noamx" &&
            "$cmake" --build "$BUILD" -j2 --target llama-bench llama-server
    } >"$LOGS/llama-cpp-build.log" 2>&1 || die "llama.cpp build failed (log: $LOGS/llama-cpp-build.log)"
}

build_llama_cpp

# ---------------------------------------------------------------------------------------------
# Trellis and the model
# ---------------------------------------------------------------------------------------------
if [[ -n "${TRELLIS_BIN:-}" ]]; then
    [[ -x "$TRELLIS_BIN" ]] || die "TRELLIS_BIN=$TRELLIS_BIN is not an executable"
    TRELLIS="$TRELLIS_BIN"
else
    say "building Trellis (cargo build --release -p trellis); log: $LOGS/trellis-build.log"
    cargo build --release -p trellis >"$LOGS/trellis-build.log" 2>&1 \
        || die "cargo build failed (log: $LOGS/trellis-build.log)"
    TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
    [[ -x "$TARGET_DIR/release/trellis" ]] || die "no binary at $TARGET_DIR/release/trellis"
    # A copy: another build sharing the target directory cannot swap it during the runs.
    TRELLIS="$CACHE/trellis"
    cp -f "$TARGET_DIR/release/trellis" "$TRELLIS"
fi

if [[ -z "${MODEL:-}" ]]; then
    scripts/fetch-model.sh
    MODEL="$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
[[ -f "$MODEL" ]] || die "no model at $MODEL"

# Both engines get THREADS threads (Trellis: its compute pool and candle's).
export TRELLIS_NUM_THREADS="$THREADS" RAYON_NUM_THREADS="$THREADS"

# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------
cpu_model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
flags=""
for f in avx2 avx512f avx512_vnni avx_vnni amx_int8; do
    if grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -qx "$f"; then
        flags="$flags $f"
    fi
done
echo "Machine: $cpu_model; nproc $(nproc); flags:${flags:- none}; load average $(cut -d' ' -f1-3 /proc/loadavg)"
if "$PY" -c 'import os,sys; sys.exit(0 if os.getloadavg()[0] > 0.5 * os.cpu_count() else 1)'; then
    echo "warning: the machine is busy (load average above half the cores): figures will be noisy," \
        "and llama.cpp's spinning threads suffer more than most from sharing cores" >&2
fi
echo "Model: $MODEL; threads $THREADS; runs $RUNS (alternated); logs in $LOGS"
echo "llama.cpp: $LLAMA_BENCH (llama-cpp-python $LLAMA_CPP_PY_VERSION sdist); Trellis: $TRELLIS"

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
RES="$CACHE/results"
rm -rf "$RES"
mkdir -p "$RES"

# json_get FILE EXPR: evaluate a Python expression over the parsed JSON `j`.
json_get() {
    "$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# llama-bench (llama.cpp or ik_llama.cpp): prints the tok/s of the one test it ran.
run_llama_bench() {
    local bin="$1" tag="$2" run="$3"
    shift 3
    local out="$RES/$tag-$run.json"
    "$bin" -m "$MODEL" -t "$THREADS" -r 3 -o json "$@" >"$out" 2>"$LOGS/$tag-$run.log" \
        || die "$bin failed (log: $LOGS/$tag-$run.log)"
    json_get "$out" 'j[-1]["avg_ts"]'
}

# trellis bench latency: prints decode tok/s (1 / mean decode step) or prompt tok/s.
run_trellis_latency() {
    local tag="$1" run="$2" field="$3"
    shift 3
    local out="$RES/$tag-$run.json"
    "$TRELLIS" bench latency --model "$MODEL" --num-iters 3 --num-iters-warmup 1 \
        --output-json "$out" "$@" >"$LOGS/$tag-$run.log" 2>&1 \
        || die "trellis bench latency failed (log: $LOGS/$tag-$run.log)"
    json_get "$out" "j[\"$field\"]"
}

# median of the numbers given as arguments
median() {
    "$PY" -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"
}

fmt() { "$PY" -c 'import sys; print(f"{float(sys.argv[1]):.1f}")' "$1"; }
ratio() { "$PY" -c 'import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f"{b/a:.2f}" if a else "n/a")' "$1" "$2"; }

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# alive PID: the process runs (an exited child not yet reaped is a zombie, which kill -0 accepts).
alive() {
    local st
    st="$(ps -o stat= -p "$1" 2>/dev/null || true)"
    [[ -n "$st" && "$st" != Z* ]]
}

wait_ready() {
    local url="$1" pid="$2" log="$3"
    for _ in $(seq 1 600); do
        alive "$pid" || die "the server exited while starting (log: $log)"
        if curl -sf "$url/v1/models" >/dev/null 2>&1 && curl -sf "$url/health" >/dev/null 2>&1; then
            return
        fi
        sleep 0.2
    done
    die "the server at $url did not become ready in 120 s (log: $log)"
}

# bench_serve TAG RUN URL SERVER_PID SERVER_LOG: the same client (trellis bench serve) for both
# servers; prints "output_tok_per_s p50_ttft_ms".
bench_serve() {
    local tag="$1" run="$2" url="$3" pid="$4" slog="$5"
    local out="$RES/$tag-$run.json"
    if ! "$TRELLIS" bench serve --base-url "$url" --num-prompts "$SERVE_PROMPTS" --input-len "$SERVE_IN" \
        --output-len "$SERVE_OUT" --max-concurrency "$SERVE_CONC" --seed "$run" \
        --output-json "$out" >"$LOGS/$tag-$run.log" 2>&1; then
        if ! alive "$pid"; then
            die "the server at $url exited during the load (server log: $slog; client log: $LOGS/$tag-$run.log)"
        fi
        die "trellis bench serve against $url failed (log: $LOGS/$tag-$run.log; server log: $slog)"
    fi
    local got
    got="$(json_get "$out" 'j["total_output_tokens"]')"
    if [[ "$got" != "$((SERVE_PROMPTS * SERVE_OUT))" ]]; then
        echo "warning: $tag run $run produced $got output tokens, expected $((SERVE_PROMPTS * SERVE_OUT))" >&2
    fi
    json_get "$out" '"%s %s" % (j["output_throughput"], j["ttft"]["p50_ms"])'
}

# ---------------------------------------------------------------------------------------------
# a. decode, one stream; b. prefill
# ---------------------------------------------------------------------------------------------
declare -a L_DEC T_DEC I_DEC L_PP T_PP I_PP L_SRV T_SRV L_TTFT T_TTFT
IK="${IK_LLAMA_BENCH:-}"
if [[ -n "$IK" ]]; then
    [[ -x "$IK" ]] || die "IK_LLAMA_BENCH=$IK is not an executable"
fi

for run in $(seq 1 "$RUNS"); do
    say "decode, 1 stream, 128 tokens: run $run/$RUNS"
    v="$(run_llama_bench "$LLAMA_BENCH" llamacpp-decode "$run" -p 0 -n 128)"
    L_DEC+=("$v")
    echo "    llama.cpp    tg128 $(fmt "$v") tok/s"
    v="$(run_trellis_latency trellis-decode "$run" decode_tokens_per_second \
        --input-len 32 --output-len 128 --batch-size 1)"
    T_DEC+=("$v")
    echo "    Trellis      decode $(fmt "$v") tok/s"
    if [[ -n "$IK" ]]; then
        v="$(run_llama_bench "$IK" ik-decode "$run" -p 0 -n 128)"
        I_DEC+=("$v")
        echo "    ik_llama.cpp tg128 $(fmt "$v") tok/s"
    fi
done

for run in $(seq 1 "$RUNS"); do
    say "prefill, 512 prompt tokens: run $run/$RUNS"
    v="$(run_llama_bench "$LLAMA_BENCH" llamacpp-prefill "$run" -p 512 -n 0)"
    L_PP+=("$v")
    echo "    llama.cpp    pp512 $(fmt "$v") tok/s"
    v="$(run_trellis_latency trellis-prefill "$run" prompt_tokens_per_second \
        --input-len 512 --output-len 1 --batch-size 1)"
    T_PP+=("$v")
    echo "    Trellis      prefill $(fmt "$v") tok/s"
    if [[ -n "$IK" ]]; then
        v="$(run_llama_bench "$IK" ik-prefill "$run" -p 512 -n 0)"
        I_PP+=("$v")
        echo "    ik_llama.cpp pp512 $(fmt "$v") tok/s"
    fi
done

# ---------------------------------------------------------------------------------------------
# c. serving: both servers up, the same load alternately against each
# ---------------------------------------------------------------------------------------------
say "serving: starting llama-server and trellis serve"
LPORT="$(free_port)"
"$LLAMA_SERVER" -m "$MODEL" -t "$THREADS" -np "$SERVE_CONC" -c 8192 --host 127.0.0.1 --port "$LPORT" \
    >"$LOGS/llama-server.log" 2>&1 &
LPID=$!
PIDS+=("$LPID")
wait_ready "http://127.0.0.1:$LPORT" "$LPID" "$LOGS/llama-server.log"
TPORT="$(free_port)"
"$TRELLIS" serve --model "$MODEL" --host 127.0.0.1 --port "$TPORT" --disable-log-requests \
    >"$LOGS/trellis-serve.log" 2>&1 &
TPID=$!
PIDS+=("$TPID")
wait_ready "http://127.0.0.1:$TPORT" "$TPID" "$LOGS/trellis-serve.log"

# One short warm-up load each (not measured).
for u in "http://127.0.0.1:$LPORT" "http://127.0.0.1:$TPORT"; do
    "$TRELLIS" bench serve --base-url "$u" --num-prompts 4 --input-len 16 --output-len 8 \
        --max-concurrency 4 >>"$LOGS/warmup.log" 2>&1 || die "warm-up against $u failed (log: $LOGS/warmup.log)"
done

for run in $(seq 1 "$RUNS"); do
    say "serving, $SERVE_CONC streams, $SERVE_PROMPTS requests x $SERVE_IN in / $SERVE_OUT out: run $run/$RUNS"
    r="$(bench_serve llamacpp-serve "$run" "http://127.0.0.1:$LPORT" "$LPID" "$LOGS/llama-server.log")"
    read -r tp ttft <<<"$r"
    L_SRV+=("$tp")
    L_TTFT+=("$ttft")
    echo "    llama-server  $(fmt "$tp") output tok/s, TTFT p50 $(fmt "$ttft") ms"
    r="$(bench_serve trellis-serve "$run" "http://127.0.0.1:$TPORT" "$TPID" "$LOGS/trellis-serve.log")"
    read -r tp ttft <<<"$r"
    T_SRV+=("$tp")
    T_TTFT+=("$ttft")
    echo "    trellis serve $(fmt "$tp") output tok/s, TTFT p50 $(fmt "$ttft") ms"
done
cleanup
PIDS=()

# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
row() {
    # row MEASURE LLAMA_MEDIAN TRELLIS_MEDIAN [IK_MEDIAN]
    local l t
    l="$(fmt "$2")"
    t="$(fmt "$3")"
    if [[ -n "$IK" ]]; then
        printf '| %-42s | %12s | %12s | %6s | %12s |\n' "$1" "$l" "$t" "$(ratio "$2" "$3")" "${4:+$(fmt "$4")}"
    else
        printf '| %-42s | %12s | %12s | %6s |\n' "$1" "$l" "$t" "$(ratio "$2" "$3")"
    fi
}

echo
echo "Medians of $RUNS run(s), $THREADS threads; ratio = Trellis / llama.cpp (higher is better except TTFT)"
if [[ -n "$IK" ]]; then
    echo "| measure                                    |    llama.cpp |      Trellis |  ratio | ik_llama.cpp |"
    echo "|--------------------------------------------|-------------:|-------------:|-------:|-------------:|"
    row "decode tok/s, 1 stream (tg128)" "$(median "${L_DEC[@]}")" "$(median "${T_DEC[@]}")" "$(median "${I_DEC[@]}")"
    row "prefill tok/s (pp512)" "$(median "${L_PP[@]}")" "$(median "${T_PP[@]}")" "$(median "${I_PP[@]}")"
else
    echo "| measure                                    |    llama.cpp |      Trellis |  ratio |"
    echo "|--------------------------------------------|-------------:|-------------:|-------:|"
    row "decode tok/s, 1 stream (tg128)" "$(median "${L_DEC[@]}")" "$(median "${T_DEC[@]}")"
    row "prefill tok/s (pp512)" "$(median "${L_PP[@]}")" "$(median "${T_PP[@]}")"
fi
row "serving output tok/s, 8 streams" "$(median "${L_SRV[@]}")" "$(median "${T_SRV[@]}")"
row "serving TTFT p50 ms (lower is better)" "$(median "${L_TTFT[@]}")" "$(median "${T_TTFT[@]}")"

echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

# Trellis' own view of the hardware, from its last decode and prefill runs.
echo
json_get "$RES/trellis-decode-$RUNS.json" \
    '"Trellis decode: %.1f GB/s of weights read (machine: %.1f GB/s streaming read), %.1f int8 Gop/s (machine peak %.0f)" % (j["achieved"]["memory_bandwidth_gb_per_s"], j["machine"]["streaming_read_gb_per_s"], j["achieved"]["int8_gops_per_s_decode"], j["machine"]["int8_peak_gops_per_s"])' \
    2>/dev/null || true
json_get "$RES/trellis-prefill-$RUNS.json" \
    '"Trellis prefill: %.1f int8 Gop/s (machine peak %.0f)" % (j["achieved"]["int8_gops_per_s_prefill"], j["machine"]["int8_peak_gops_per_s"])' \
    2>/dev/null || true

"""/metrics and the stats log line of a real `trellis serve`, read the way vLLM users read them:
the exposition through `prometheus_client`'s own text parser, the log line with a regex written
for vLLM's format."""

import re
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL, Server

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
        10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
       20.0, 40.0, 80.0]
LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
ITERATION = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
LEN_2048 = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]  # build_1_2_5_buckets(2048)

HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": TTFT,
    "vllm:inter_token_latency_seconds": ITL,
    "vllm:request_time_per_output_token_seconds": ITL,
    "vllm:e2e_request_latency_seconds": LATENCY,
    "vllm:request_queue_time_seconds": LATENCY,
    "vllm:request_prefill_time_seconds": LATENCY,
    "vllm:request_decode_time_seconds": LATENCY,
    "vllm:request_inference_time_seconds": LATENCY,
    "vllm:iteration_tokens_total": ITERATION,
    "vllm:request_prompt_tokens": LEN_2048,
    "vllm:request_generation_tokens": LEN_2048,
    "vllm:request_max_num_generation_tokens": LEN_2048,
    "vllm:request_params_max_tokens": LEN_2048,
    "vllm:request_prefill_kv_computed_tokens": LEN_2048,
    "vllm:request_params_n": [1, 2, 5, 10, 20],
}
COUNTERS = ["vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
            "vllm:num_preemptions", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
            "vllm:prompt_tokens_by_source", "vllm:prompt_tokens_cached"]
GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
          "vllm:num_requests_waiting_by_reason", "vllm:cache_config_info",
          "vllm:engine_sleep_state"]

# A parser written for vLLM's line (spec §7.3); DEV is CPU on the CPU platform.
LOG_LINE = re.compile(
    r"^INFO \d\d-\d\d \d\d:\d\d:\d\d \[[\w.]+:\d+\] Engine 000: "
    r"Avg prompt throughput: (?P<prompt>\d+\.\d) tokens/s, "
    r"Avg generation throughput: (?P<gen>\d+\.\d) tokens/s, "
    r"Running: (?P<running>\d+) reqs, Waiting: (?P<waiting>\d+) reqs, "
    r"(Preemptions: \d+, )?"
    r"(GPU|CPU) KV cache usage: \d+\.\d%"
    r"(, Prefix cache hit rate: \d+\.\d%)?$"
)


@pytest.fixture(scope="module")
def stats_server():
    s = Server(env_extra={"VLLM_LOG_STATS_INTERVAL": "0.5"})
    yield s
    assert s.stop() == 0


def scrape(server):
    r = requests.get(server.base + "/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families, family, sample, **labels):
    for s in families[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{sample} {labels}")


def test_exposition_parses_with_vllm_families_and_buckets(stats_server):
    fams = scrape(stats_server)
    for name in COUNTERS:
        assert fams[name].type == "counter", name
    for name in GAUGES:
        assert fams[name].type == "gauge", name
    for name, buckets in HISTOGRAMS.items():
        fam = fams[name]
        assert fam.type == "histogram", name
        les = [s.labels["le"] for s in fam.samples if s.name == name + "_bucket"]
        assert les == [str(float(b)) for b in buckets] + ["+Inf"], name
    for fam in fams.values():
        if fam.name.startswith("vllm:"):
            for s in fam.samples:
                # As in vLLM, the info gauge carries the cache config and the engine only.
                if fam.name != "vllm:cache_config_info":
                    assert s.labels["model_name"] == MODEL, s
                assert s.labels["engine"] == "0", s
    info = fams["vllm:cache_config_info"].samples[0]
    assert info.value == 1 and info.labels["block_size"] == "16", info
    reasons = {s.labels["finished_reason"] for s in fams["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error", "repetition"}
    assert fams["process_resident_memory_bytes"].samples[0].value > 0


def test_counters_and_histograms_follow_the_workload(stats_server):
    client = stats_server.client()
    before = scrape(stats_server)
    prompt = completion = n = 0
    for text, max_tokens in [("The capital of France is", 7), ("List three colors:", 5)]:
        r = client.completions.create(model=MODEL, prompt=text, max_tokens=max_tokens,
                                      temperature=0, extra_body={"ignore_eos": True})
        prompt += r.usage.prompt_tokens
        completion += r.usage.completion_tokens
        n += 1
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=6, temperature=0)
    prompt += r.usage.prompt_tokens
    completion += r.usage.completion_tokens
    n += 1
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None][-1]
    prompt += usage.prompt_tokens
    completion += usage.completion_tokens
    n += 1
    after = scrape(stats_server)

    def d(family, sample, **labels):
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    assert d("vllm:prompt_tokens", "vllm:prompt_tokens_total") == prompt
    assert d("vllm:generation_tokens", "vllm:generation_tokens_total") == completion
    finished = sum(d("vllm:request_success", "vllm:request_success_total", finished_reason=r)
                   for r in ("stop", "length"))
    assert finished == n
    for name in HISTOGRAMS:
        if name in ("vllm:iteration_tokens_total", "vllm:inter_token_latency_seconds"):
            continue
        assert d(name, name + "_count") == n, name
    # One inter-token latency per generated token after each request's first.
    itl = "vllm:inter_token_latency_seconds"
    assert d(itl, itl + "_count") == completion - n
    assert d("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") == prompt
    assert d("vllm:iteration_tokens_total", "vllm:iteration_tokens_total_sum") == prompt + completion
    assert value(after, "vllm:num_requests_running", "vllm:num_requests_running") == 0


def test_log_line_matches_vllm_format(stats_server):
    client = stats_server.client()
    client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0,
                              extra_body={"ignore_eos": True})
    # One line every 0.5 s: wait for the interval that saw the tokens.
    for _ in range(600):
        lines = [l for l in stats_server.output().splitlines() if "Engine 000:" in l]
        busy = [m for m in map(LOG_LINE.match, lines) if m and float(m["gen"]) > 0]
        if busy:
            break
        time.sleep(0.1)
    assert lines, stats_server.output()
    for line in lines:
        assert LOG_LINE.match(line), line
    assert busy, lines


def test_disable_log_stats_turns_off_the_line_and_vllm_families():
    s = Server("--disable-log-stats", env_extra={"VLLM_LOG_STATS_INTERVAL": "0.2"})
    try:
        s.client().completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
        text = requests.get(s.base + "/metrics", timeout=30).text
        fams = {f.name for f in text_string_to_metric_families(text)}
        assert "process_cpu_seconds" in fams
        assert not any(f.startswith("vllm:") for f in fams), fams
        time.sleep(1.0)  # five intervals
        assert "Engine 000:" not in s.output()
    finally:
        assert s.stop() == 0

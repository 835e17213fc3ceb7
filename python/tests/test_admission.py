"""Admission limits of a real `trellis serve` (issue 14): `n` above the limit is a 400 naming the
parameter, a full waiting queue is a 503 with `Retry-After` while the admitted requests finish
with the outputs they get alone, and `/metrics` counts the refusals by reason."""

import concurrent.futures

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL, Server


def rejections(server: Server) -> dict:
    text = requests.get(server.base + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        if fam.name == "vllm:admission_rejections":
            return {s.labels["reason"]: s.value for s in fam.samples if s.name.endswith("_total")}
    raise AssertionError("vllm:admission_rejections is missing from /metrics")


def test_n_above_the_limit_is_a_400_naming_n(client, server):
    before = rejections(server)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=100000)
    assert e.value.status_code == 400
    body = e.value.body
    assert body["param"] == "n", body
    assert "n must be at most 128" in body["message"], body
    assert "100000" in body["message"], body
    # The limit itself is fine, and the server still serves.
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=1, n=128,
                                    temperature=1.0, seed=1)
    assert len(out.choices) == 128
    after = rejections(server)
    assert after["n_limit"] == before["n_limit"] + 1


@pytest.fixture(scope="module")
def small_queue():
    s = Server("--max-waiting-requests", "2", "--max-num-seqs", "1")
    yield s
    assert s.stop() == 0


def test_a_full_queue_is_a_503_with_retry_after_and_admitted_requests_are_unchanged(small_queue):
    s = small_queue
    prompts = [f"Count to ten, number {i}:" for i in range(10)]
    alone = {}
    for p in prompts[:3]:
        r = requests.post(s.base + "/v1/completions", timeout=300,
                          json={"model": MODEL, "prompt": p, "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        alone[p] = r.json()["choices"][0]["text"]

    # A request whose n alone is above the queue limit is refused at once.
    before = rejections(s)
    r = requests.post(s.base + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 3,
                            "temperature": 1.0})
    assert r.status_code == 503, r.text
    assert r.headers.get("Retry-After") == "1"
    err = r.json()["error"]
    assert err["type"] == "ServiceUnavailableError" and err["code"] == 503, err
    assert "--max-waiting-requests" in err["message"], err
    assert rejections(s)["queue_full"] == before["queue_full"] + 1

    # A burst: one runs, two wait, the rest are refused; the admitted ones are unchanged.
    def post(p):
        return p, requests.post(s.base + "/v1/completions", timeout=300,
                                json={"model": MODEL, "prompt": p, "max_tokens": 24,
                                      "temperature": 0})

    before = rejections(s)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(post, prompts))
    codes = [r.status_code for _, r in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1, codes
    assert codes.count(200) >= 1, codes
    for p, r in results:
        if r.status_code == 503:
            assert r.headers.get("Retry-After") == "1"
        elif p in alone:
            assert r.json()["choices"][0]["text"] == alone[p]
    after = rejections(s)
    assert after["queue_full"] - before["queue_full"] == codes.count(503)
    # And the server keeps serving.
    r = requests.post(s.base + "/v1/completions", timeout=300,
                      json={"model": MODEL, "prompt": prompts[0], "max_tokens": 24,
                            "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone[prompts[0]]


def test_a_dead_engine_is_visible_and_the_server_exits_non_zero():
    """Test-only fault injection: every engine step fails. Each request in flight gets a 500
    with an error body; after a few failed steps in a row the engine is dead: /health answers
    503, new requests 503, and the process exits non-zero (a supervisor restarts it)."""
    s = Server(env_extra={"TRELLIS_TEST_FAIL_EVERY_STEP": "1"})
    try:
        statuses = []
        for _ in range(10):
            try:
                r = requests.post(s.base + "/v1/completions", timeout=60,
                                  json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            except requests.ConnectionError:
                break  # already gone
            statuses.append(r.status_code)
            assert r.status_code in (500, 503), r.text
            assert r.json()["error"]["code"] == r.status_code, r.text
            if r.status_code == 503:
                break
        assert statuses and statuses[0] == 500, statuses
        try:
            health = requests.get(s.base + "/health", timeout=10).status_code
        except requests.ConnectionError:
            health = None  # already exited
        assert health in (503, None), (health, statuses)
        code = s.proc.wait(timeout=120)
        assert code not in (0, None), code
        assert "the engine is dead" in s.output()
        assert "the engine died" in s.output()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
        s.log.close()


def test_a_request_that_can_never_fit_the_kv_cache_is_refused_with_both_numbers():
    # 2 MiB of f16 cache on this model is 5 blocks of 16 tokens: 80 tokens in all.
    s = Server(kv_cache_memory="2M")
    try:
        client = s.client()
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="Hello there", max_tokens=500)
        msg = e.value.body["message"]
        assert "tokens of KV cache" in msg and "holds only 80 tokens" in msg, msg
        # Within the cache it runs; without max_tokens it may grow until the cache is full.
        out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop")
        out = client.completions.create(model=MODEL, prompt="Hello there", temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens + out.usage.completion_tokens == 80
    finally:
        assert s.stop() == 0

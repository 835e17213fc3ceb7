"""LoRA serving (issue 12, spec §5): real adapters from testdata/lora, a real `trellis serve`,
the official `openai` client — model resolution, /v1/models lineage, runtime load/unload with
vLLM's texts and codes, in-place reload, the filesystem resolver, LRU churn under load."""

import concurrent.futures
import json
import shutil

import openai
import pytest
import requests

from conftest import ROOT, Server

LORA = ROOT / "testdata" / "lora"
R8, QV, STRONG = (str(LORA / n) for n in ("lora-smollm2-r8", "lora-smollm2-r4-qv", "lora-smollm2-r8-strong"))
PROMPT = "The capital of France is"


def _variant(tmp, name, src, **changes):
    """A copy of adapter `src` under `tmp/name` with adapter_config.json fields changed."""
    dst = tmp / name
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644)
    dst.chmod(0o755)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-cache")


@pytest.fixture(scope="module")
def lora_server(cache):
    modules = json.dumps({"name": "qv", "path": QV, "base_model_name": "smollm2"})
    s = Server("--enable-lora", "--max-loras", "2", "--max-cpu-loras", "3", "--max-lora-rank", "16",
               "--lora-modules", f"r8={R8}", modules,
               env_extra={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                          "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache)})
    yield s
    assert s.stop() == 0


def _load(server, body, content_type="application/json"):
    return requests.post(server.base + "/v1/load_lora_adapter", data=json.dumps(body),
                         headers={"Content-Type": content_type}, timeout=120)


def _unload(server, body):
    return requests.post(server.base + "/v1/unload_lora_adapter", json=body, timeout=60)


def _greedy(client, model, prompt=PROMPT, n=10):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
    return r.choices[0].text


def test_models_lists_adapters_after_the_base(lora_server):
    models = lora_server.client().models.list().data
    assert [m.id for m in models[:3]] == ["smollm2", "r8", "qv"]
    base = models[0].model_dump()
    assert base["parent"] is None
    r8 = models[1].model_dump()
    assert r8["root"] == R8 and r8["parent"] == "smollm2"
    assert models[2].model_dump()["parent"] == "smollm2"


def test_model_selects_the_adapter_in_completions_chat_and_streams(lora_server):
    client = lora_server.client()
    assert _load(lora_server, {"lora_name": "strong", "lora_path": STRONG}).status_code == 200
    base, strong = _greedy(client, "smollm2"), _greedy(client, "strong")
    assert base != strong
    assert _greedy(client, "strong") == strong
    chunks = list(client.completions.create(
        model="strong", prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == strong
    # As vLLM: every response names the model the client asked for, the adapter included.
    assert {c.model for c in chunks} == {"strong"}
    r = client.completions.create(model="strong", prompt=PROMPT, max_tokens=4, temperature=0,
                                  logprobs=2, n=2)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text == strong[:len(r.choices[0].text)]
    assert len(r.choices[0].logprobs.token_logprobs) == 4
    assert r.model == "strong"
    assert client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=1).model == "smollm2"
    chat_r = client.chat.completions.create(model="strong", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=2, temperature=0)
    assert chat_r.model == "strong"
    chat_chunks = list(client.chat.completions.create(
        model="strong", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True))
    assert {c.model for c in chat_chunks} == {"strong"}
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    chat = lambda m: client.chat.completions.create(  # noqa: E731
        model=m, messages=msgs, max_tokens=12, temperature=0).choices[0].message.content
    assert chat("strong") != chat("smollm2")


def test_unknown_model_is_a_404_with_valid_aliases(lora_server):
    with pytest.raises(openai.NotFoundError) as e:
        lora_server.client().completions.create(model="nope", prompt="Hi", max_tokens=2)
    body = e.value.response.json()["error"]
    assert body["message"].startswith("The model `nope` does not exist. Valid aliases: smollm2, r8, qv")
    assert body["type"] == "NotFoundError" and body["param"] == "model" and body["code"] == 404


def test_load_and_unload_strings_and_codes(lora_server, tmp_path):
    s = lora_server
    r = _load(s, {"lora_name": "x1", "lora_path": R8})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'x1' added successfully."
    r = _load(s, {"lora_name": "x1", "lora_path": R8})
    assert r.status_code == 400 and "has already been loaded" in r.json()["error"]["message"]
    assert [m.id for m in s.client().models.list().data].count("x1") == 1
    for body in ({"lora_name": "", "lora_path": R8}, {"lora_name": "y"}):
        r = _load(s, body)
        assert r.status_code == 400
        assert r.json()["error"] == {"message": "Both 'lora_name' and 'lora_path' must be provided.",
                                     "type": "InvalidUserInput", "param": None, "code": 400}
    r = _load(s, {"lora_name": "smollm2", "lora_path": R8})
    assert r.status_code == 400 and "conflicts with a served base model" in r.text
    r = _load(s, {"lora_name": "gone", "lora_path": str(tmp_path / "nowhere")})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == f"Loading lora gone failed: No adapter found for {tmp_path / 'nowhere'}"
    bad_json = _variant(tmp_path, "badjson", QV)
    (bad_json / "adapter_config.json").write_text("{not json")
    for name, path, text in [
        ("badjson", bad_json, "invalid adapter_config.json"),
        ("rank", _variant(tmp_path, "rank", QV, r=1024), "LoRA rank 1024 is greater than max_lora_rank 16."),
        ("dora", _variant(tmp_path, "dora", QV, use_dora=True), "vLLM does not yet support DoRA."),
        ("save", _variant(tmp_path, "save", QV, modules_to_save=["lm_head"]), "modules_to_save"),
    ]:
        r = _load(s, {"lora_name": name, "lora_path": str(path)})
        assert r.status_code == 500 and text in r.json()["error"]["message"], r.text
    r = _load(s, {"lora_name": "z", "lora_path": R8}, content_type="text/plain")
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Unsupported Media Type: Only 'application/json' is allowed"
    r = _unload(s, {"lora_name": "x1"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'x1' removed successfully."
    r = _unload(s, {"lora_name": "x1"})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "The lora adapter 'x1' cannot be found."
    assert r.json()["error"]["type"] == "NotFoundError"
    r = _unload(s, {"lora_name": ""})
    assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidUserInput"
    # The server kept serving through all of it.
    assert _greedy(s.client(), "r8", n=3)


def test_in_place_reload_switches_behaviour(lora_server):
    client = lora_server.client()
    assert _load(lora_server, {"lora_name": "sw", "lora_path": R8}).status_code == 200
    before = _greedy(client, "sw")
    assert before == _greedy(client, "r8")
    r = _load(lora_server, {"lora_name": "sw", "lora_path": STRONG, "load_inplace": True})
    assert r.status_code == 200
    after = _greedy(client, "sw")
    assert after != before and after == _greedy(client, "strong")


def test_filesystem_resolver_and_path_confinement(lora_server, cache, tmp_path):
    base_root = lora_server.client().models.list().data[0].model_dump()["root"]
    (cache / "org").mkdir(exist_ok=True)
    _variant(cache / "org", "mild", QV, base_model_name_or_path=base_root)
    _variant(cache, "wrongbase", QV)  # base_model_name_or_path stays "SmolLM2-135M-Instruct"
    _variant(cache, "toobig", QV, base_model_name_or_path=base_root, r=1024)
    outside = _variant(tmp_path, "outside", QV, base_model_name_or_path=base_root)
    (cache / "escape").symlink_to(outside)
    client = lora_server.client()
    assert _greedy(client, "org/mild", n=4)
    assert "org/mild" in [m.id for m in client.models.list().data]
    for name in ["wrongbase", "../outside", "escape", str(outside), "missing"]:
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=name, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="toobig", prompt="Hi", max_tokens=2)
    assert e.value.response.json()["error"]["message"] == "LoRA adapter 'toobig' was found but could not be loaded."


def test_many_adapters_churn_under_concurrent_load(lora_server, tmp_path):
    """16 adapters with --max-loras 2 --max-cpu-loras 3: every request completes."""
    names = []
    for i in range(16):
        src = [R8, QV, STRONG][i % 3]
        path = _variant(tmp_path, f"a{i}", src)
        assert _load(lora_server, {"lora_name": f"a{i}", "lora_path": str(path)}).status_code == 200
        names.append(f"a{i}")
    client = lora_server.client()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda m: _greedy(client, m, n=6), names * 2))
    assert len(outs) == 32 and all(outs)
    # Same adapter weights, same greedy output, whatever ran beside it.
    for i, name in enumerate(names):
        assert outs[i] == outs[i + 16], name


def test_failed_loads_do_not_disturb_running_requests(lora_server, tmp_path):
    client = lora_server.client()
    want = _greedy(client, "r8", n=40)
    bad = _variant(tmp_path, "bad", QV, r=1024)

    def stream():
        chunks = client.completions.create(model="r8", prompt=PROMPT, max_tokens=40,
                                           temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream)
        for i in range(4):
            assert _load(lora_server, {"lora_name": f"bad{i}", "lora_path": str(bad)}).status_code == 500
            r = _load(lora_server, {"lora_name": f"gone{i}", "lora_path": str(tmp_path / "none")})
            assert r.status_code == 404
        assert running.result() == want


def test_runtime_routes_are_absent_without_the_env_var(server):
    assert requests.post(server.base + "/v1/load_lora_adapter", json={}, timeout=10).status_code == 404

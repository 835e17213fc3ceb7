"""IO processor plugins through `POST /pooling` (vLLM spec §6): the example plugin
examples/plugins/semantic-search, built with `trellis plugins build` and selected with
`--io-processor-plugin` or the model's config.json, and vLLM's startup errors."""

import json
import math
import os
import shutil
import subprocess

import pytest
import requests

from conftest import ROOT, Server
from test_embeddings import EMBED_MODEL, MODEL_DIR, embed_server  # noqa: F401 (a fixture)

BINARY = os.environ.get("TRELLIS_BIN", str(ROOT / "target" / "debug" / "trellis"))
QUERY = "How do I reset my password?"
DOCS = [
    "The weather is sunny today.",
    "To reset your password, click 'Forgot password' on the login page.",
    "Pizza is my favourite food.",
    "Password resets are sent to the email address on your account.",
]


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    assert (MODEL_DIR / "model.safetensors").is_file(), (
        f"embedding model {MODEL_DIR} is missing: run scripts/fetch-embedding-model.sh from the repository root")
    d = tmp_path_factory.mktemp("plugins")
    env = dict(os.environ, TRELLIS_PLUGIN_PATH=str(d), CARGO_TARGET_DIR=str(ROOT / "target"))
    out = subprocess.run([BINARY, "plugins", "build", "--debug", str(ROOT / "examples/plugins/semantic-search")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return d


def serve_fails(*args, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    out = subprocess.run([BINARY, "serve", "--port", "0", "--kv-cache-memory", "64M", *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, out.stderr
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def search_server(plugin_dir):
    s = Server("--model", str(MODEL_DIR), "--io-processor-plugin", "semantic_search",
               model=EMBED_MODEL, max_model_len="256", env_extra={"TRELLIS_PLUGIN_PATH": str(plugin_dir)})
    yield s
    assert s.stop() == 0


def model_naming(tmp_path, plugin):
    """A copy of MiniLM (weights linked) whose config.json names `plugin`."""
    model = tmp_path / f"minilm-{plugin}"
    shutil.copytree(MODEL_DIR, model, ignore=shutil.ignore_patterns("model.safetensors"))
    (model / "model.safetensors").symlink_to(MODEL_DIR / "model.safetensors")
    cfg = json.loads((model / "config.json").read_text())
    cfg["io_processor_plugin"] = plugin
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_semantic_search_ranks_by_cosine_of_embeddings(search_server):
    r = requests.post(search_server.base + "/pooling", json={"data": {"query": QUERY, "documents": DOCS, "top_k": 3}},
                      headers={"X-Request-Id": "abc"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == "pooling-abc"
    assert isinstance(body["created_at"], int)
    results = body["data"]["results"]
    assert len(results) == 3
    # The ranking equals the one computed from /v1/embeddings.
    emb = requests.post(search_server.base + "/v1/embeddings",
                        json={"model": EMBED_MODEL, "input": [QUERY, *DOCS]}).json()["data"]
    q = emb[0]["embedding"]
    scores = [cosine(q, d["embedding"]) for d in emb[1:]]
    expected = sorted(range(len(DOCS)), key=lambda i: -scores[i])[:3]
    assert [x["index"] for x in results] == expected
    for x in results:
        assert x["document"] == DOCS[x["index"]]
        assert x["score"] == pytest.approx(scores[x["index"]], abs=1e-6)
    assert results[0]["index"] in (1, 3)


def test_pooling_errors(search_server):
    bad = requests.post(search_server.base + "/pooling", json={"data": {"query": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequestError"
    dims = requests.post(search_server.base + "/pooling", json={"input": "hi", "dimensions": 3})
    assert dims.status_code == 400
    assert dims.json()["error"]["message"] == "dimensions is currently not supported"
    plain = requests.post(search_server.base + "/pooling", json={"input": ["hello", "world"]})
    assert plain.status_code == 200, plain.text
    assert [d["index"] for d in plain.json()["data"]] == [0, 1]
    assert len(plain.json()["data"][0]["data"]) == 384


def test_plugin_task_without_io_processor_is_400(embed_server):
    r = requests.post(embed_server.base + "/pooling", json={"data": {"query": "q", "documents": ["d"]}})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("No IOProcessor plugin installed. Please refer to the documentation")
    assert r.json()["error"]["param"] == "task"


def test_startup_errors(plugin_dir, tmp_path):
    env = {"TRELLIS_PLUGIN_PATH": str(plugin_dir)}
    assert serve_fails("--model", str(MODEL_DIR), "--io-processor-plugin", "wrong_plugin", env_extra=env) == [
        "error: The model requires the 'wrong_plugin' IO Processor plugin but it is not installed. "
        "Available plugins: ['semantic_search']"]
    # VLLM_PLUGINS excluding the plugin: vLLM's error for "none installed".
    assert serve_fails("--model", str(MODEL_DIR), "--io-processor-plugin", "semantic_search",
                       env_extra={**env, "VLLM_PLUGINS": "something_else"}) == [
        "error: No IOProcessor plugins installed but one is required (semantic_search)."]
    # config.json naming a plugin that is missing.
    model = model_naming(tmp_path, "missing_plugin")
    assert serve_fails("--model", str(model), env_extra=env) == [
        "error: The model requires the 'missing_plugin' IO Processor plugin but it is not installed. "
        "Available plugins: ['semantic_search']"]


def test_config_json_names_the_plugin(plugin_dir, tmp_path):
    model = model_naming(tmp_path, "semantic_search")
    s = Server("--model", str(model), model=EMBED_MODEL, max_model_len="256",
               env_extra={"TRELLIS_PLUGIN_PATH": str(plugin_dir)})
    try:
        r = requests.post(s.base + "/pooling", json={"data": {"query": QUERY, "documents": DOCS[:2]}})
        assert r.status_code == 200, r.text
        assert [x["index"] for x in r.json()["data"]["results"]] == [1, 0]
        assert "Using IO processor plugin semantic_search" in s.output()
    finally:
        assert s.stop() == 0

"""`/v1/embeddings` with the official `openai` client against `trellis serve` on
all-MiniLM-L6-v2, compared with sentence-transformers (the reference copied into
crates/trellis-engine/tests/data/minilm-embeddings.json)."""

import base64
import json
import math
import struct

import openai
import pytest

from conftest import ROOT, Server

EMBED_MODEL = "minilm"
MODEL_DIR = ROOT / "models" / "all-MiniLM-L6-v2"
REFERENCE = ROOT / "crates" / "trellis-engine" / "tests" / "data" / "minilm-embeddings.json"


@pytest.fixture(scope="module")
def embed_server():
    assert (MODEL_DIR / "model.safetensors").is_file(), (
        f"embedding model {MODEL_DIR} is missing: run scripts/fetch-embedding-model.sh from the repository root")
    s = Server("--model", str(MODEL_DIR), model=EMBED_MODEL, max_model_len="256")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def embed_client(embed_server):
    return embed_server.client()


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_match_sentence_transformers(embed_client):
    ref = json.loads(REFERENCE.read_text())["sentences"]
    texts = [s["text"] for s in ref]
    r = embed_client.embeddings.create(model=EMBED_MODEL, input=texts)
    assert r.object == "list" and r.model == EMBED_MODEL
    assert [d.index for d in r.data] == list(range(len(ref)))
    assert r.usage.prompt_tokens == sum(len(s["token_ids"]) for s in ref)
    assert r.usage.total_tokens == r.usage.prompt_tokens
    cosines = [cosine(d.embedding, s["embedding"]) for d, s in zip(r.data, ref)]
    assert min(cosines) > 0.99999, dict(zip([s["name"] for s in ref], cosines))
    # Token ids equal: the same sentences given as ids embed to the same vectors.
    tok = embed_client.embeddings.create(model=EMBED_MODEL, input=[s["token_ids"] for s in ref])
    assert [d.embedding for d in tok.data] == [d.embedding for d in r.data]


def test_single_string_token_ids_and_base64(embed_client):
    one = embed_client.embeddings.create(model=EMBED_MODEL, input="Hello world")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    ids = embed_client.embeddings.create(model=EMBED_MODEL, input=[101, 7592, 2088, 102])
    assert ids.data[0].embedding == one.data[0].embedding
    # The client decodes base64 itself when asked for it explicitly.
    b64 = embed_client.embeddings.create(model=EMBED_MODEL, input="Hello world", encoding_format="base64")
    raw = b64.data[0].embedding
    if isinstance(raw, str):
        raw = list(struct.unpack(f"<{len(base64.b64decode(raw)) // 4}f", base64.b64decode(raw)))
    assert raw == pytest.approx(one.data[0].embedding, abs=0)


@pytest.mark.parametrize("body, text", [
    ({"input": []}, "must not be empty"),
    ({"input": ""}, "must not be empty"),
    ({"input": [101, 40000, 102]}, "out of vocabulary"),
    ({"input": [[101] * 300]}, "maximum context length is 256 tokens"),
    ({"input": "hi", "dimensions": 8}, "does not support matryoshka representation"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_input_is_400(embed_client, body, text):
    with pytest.raises(openai.BadRequestError) as e:
        embed_client.embeddings.create(model=EMBED_MODEL, **body)
    assert e.value.status_code == 400
    err = e.value.body if isinstance(e.value.body, dict) and "message" in e.value.body else e.value.body["error"]
    assert text in err["message"], err
    assert err["type"] == "BadRequestError" and err["code"] == 400


def test_generative_model_refuses_embeddings(client):
    from conftest import MODEL
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="hi")
    assert "does not support Embeddings API" in str(e.value)

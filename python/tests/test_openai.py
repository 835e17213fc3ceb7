"""The official `openai` client against `trellis serve`."""

import openai
import pytest
import requests

from conftest import MODEL

PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]


def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "trellis"
    assert requests.get(server.base + "/health").status_code == 200
    assert "version" in requests.get(server.base + "/version").json()


def test_completion_and_usage(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert len(r.choices[0].text) > 0


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_continuous_usage_stats(client):
    # vLLM's extension: with include_usage, continuous_usage_stats puts the usage so far in
    # every chunk.
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                            stream_options=opts, extra_body={"ignore_eos": True}))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 5
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5
    chat = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                               stream=True, stream_options=opts))
    assert chat[0].usage.completion_tokens == 0
    assert all(c.usage is not None for c in chat)
    assert chat[-1].usage.completion_tokens == max(c.usage.completion_tokens for c in chat if c.choices)
    # Without include_usage it is off, as in vLLM.
    plain = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, stream=True,
                                           stream_options={"continuous_usage_stats": True}))
    assert all(c.usage is None for c in plain)


def test_chat_and_stream(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_n_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0.9, seed=1, n=2, logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3, temperature=0, n=2,
                                       logprobs=True, top_logprobs=3)
    assert len(r.choices) == 2
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 3
    assert r.choices[0].message.content == r.choices[1].message.content


def test_stop_string(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    stop = full.strip()[2:5]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert full.startswith(c.text) and stop not in c.text


def test_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5000)
    assert "maximum context length is 2048 tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="foo", prompt=PROMPT, max_tokens=1)


def test_api_key(keyed_server):
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client("wrong").models.list()
    assert [m.id for m in keyed_server.client("sk-test").models.list().data] == [MODEL]

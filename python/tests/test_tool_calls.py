"""Tool calling (issue 15) through the official `openai` client: named and required choices
(grammar-enforced, streamed and not), auto with the hermes parser, a full round trip through
the chat template, and bad input."""

import json

import jsonschema
import openai
import pytest

from conftest import MODEL, Server

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def tools_server():
    s = Server("--chat-template", "examples/tool_chat_template_hermes.jinja",
               "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    yield s
    assert s.stop() == 0


@pytest.fixture()
def tc(tools_server):
    return tools_server.client()


def _check_calls(calls, names=None):
    assert calls, "no tool calls"
    for c in calls:
        assert c.type == "function" and c.id.startswith("chatcmpl-tool-")
        assert names is None or c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def _stream_calls(stream):
    """Joins `delta.tool_calls` by index, as a client does; checks the first delta of each."""
    calls, finish, content = {}, None, ""
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.function.name, "the first delta carries the id and name"
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


def test_named_tool_choice(tc):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = tc.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                   temperature=0, max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    _check_calls(c.message.tool_calls, ["get_weather"])
    calls, finish, content = _stream_calls(tc.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=60, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == \
        [("get_weather", json.loads(c.message.tool_calls[0].function.arguments))]


def test_required_tool_choice(tc):
    # One call (a model this small, free to add calls, repeats the first one until max_tokens).
    r = tc.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                   parallel_tool_calls=False, temperature=0, max_tokens=120)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    _check_calls(c.message.tool_calls, SCHEMAS)
    calls, finish, _ = _stream_calls(tc.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=120, stream=True))
    assert finish == "tool_calls"
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls]
    # Parallel calls allowed: the model repeats its call until max_tokens; the cut array is
    # returned as content with `length`, never as half a call.
    r = tc.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                   temperature=0, max_tokens=40)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.tool_calls is None and c.message.content.startswith("[")


HERMES = r'''start: "<tool_call>\n" call "\n</tool_call>"
call: %json {"type": "object", "properties": {"name": {"const": "get_weather"},
  "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
  "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false}},
  "required": ["name", "arguments"], "additionalProperties": false}
'''


def test_auto_tool_choice_parses_hermes_calls(tc):
    # The grammar makes the small model write the hermes format, so the parser is exercised
    # end to end, streamed and not.
    body = {"structured_outputs": {"grammar": HERMES}}
    r = tc.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto",
                                   temperature=0, max_tokens=80, extra_body=body)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c.message
    _check_calls(c.message.tool_calls, ["get_weather"])
    calls, finish, content = _stream_calls(tc.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80, extra_body=body, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == \
        [("get_weather", json.loads(c.message.tool_calls[0].function.arguments))]
    # Unconstrained, the model may or may not call: either way the answer is well formed.
    r = tc.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80)
    c = r.choices[0]
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls"
        for t in c.message.tool_calls:
            json.loads(t.function.arguments)
    else:
        assert c.message.content and c.finish_reason in ("stop", "length")


def test_round_trip_tool_result_is_rendered_and_answered(tc):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    first = tc.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                       temperature=0, max_tokens=60).choices[0].message
    call = first.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    final = tc.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=40)
    c = final.choices[0]
    assert c.message.tool_calls is None and c.message.content
    assert c.finish_reason in ("stop", "length")
    # The call and the result are in the prompt: it is longer than the question's by both.
    ask_only = tc.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=1)
    assert final.usage.prompt_tokens > ask_only.usage.prompt_tokens + 20


@pytest.mark.parametrize("kwargs, param, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "`tools` must be set"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "nonsense"}}}}}], "tool_choice": "required"}, "tools", "nonsense"),
])
def test_bad_tool_requests_are_400(tc, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        tc.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **kwargs)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
    r = tc.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3)
    assert r.choices[0].finish_reason


def test_tools_need_a_template_that_renders_them_and_auto_needs_the_flags(client):
    # The default server: SmolLM2's own template never reads `tools`; no auto tool choice.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=5)
    assert e.value.body["param"] == "tools" and "chat template" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=5)
    assert "--enable-auto-tool-choice" in e.value.body["message"]
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3)
    assert r.choices[0].finish_reason

"""Structured outputs (issue 15) through the official `openai` client against `trellis serve`:
20 JSON schemas validated with `jsonschema`, regex and choice constraints, `response_format`,
`client.chat.completions.parse` with a Pydantic model, batch invariance, and bad input."""

import concurrent.futures as cf
import json
import re

import jsonschema
import openai
import pydantic
import pytest

from conftest import MODEL

S = {"type": "string", "maxLength": 24}

SCHEMAS = [
    # 1-4: flat objects, scalars, bounds, enums
    ("a short answer", {"type": "object", "properties": {"answer": S}, "required": ["answer"]}),
    ("an adult's age", {"type": "object", "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99}},
                        "required": ["age"]}),
    ("a shop: open or not, and a price", {"type": "object", "properties": {
        "is_open": {"type": "boolean"}, "price": {"type": "number", "minimum": 0, "maximum": 1000}},
        "required": ["is_open", "price"]}),
    ("a colour", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                  "required": ["color"]}),
    # 5-7: string patterns, arrays with min/max items
    ("a US zip code", {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                       "required": ["zip"]}),
    ("tags for a blog post", {"type": "object", "properties": {"tags": {
        "type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 4}},
        "required": ["tags"]}),
    ("three test scores", {"type": "object", "properties": {"scores": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 3, "maxItems": 3}},
        "required": ["scores"]}),
    # 8-10: nested objects, arrays of objects
    ("a person", {"type": "object", "properties": {"person": {
        "type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}}, "required": ["person"]}),
    ("a person with an address", {"type": "object", "properties": {
        "name": S,
        "address": {"type": "object", "properties": {"street": S, "city": S,
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False}),
    ("a shopping list", {"type": "object", "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"name": S, "qty": {"type": "integer", "minimum": 1, "maximum": 10}},
            "required": ["name", "qty"], "additionalProperties": False}}}, "required": ["items"]}),
    # 11-13: anyOf, $ref, const
    ("a value, number or word", {"type": "object", "properties": {"value": {
        "anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 10}]}}, "required": ["value"]}),
    ("a line segment", {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -100, "maximum": 100},
        "y": {"type": "integer", "minimum": -100, "maximum": 100}}, "required": ["x", "y"],
        "additionalProperties": False}},
        "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False}),
    ("a config", {"type": "object", "properties": {"version": {"const": "1.0"}, "level": {"enum": [1, 2, 3]}},
                  "required": ["version", "level"]}),
    # 14-16: patterns, optional properties, exclusive bounds
    ("a date", {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
                "required": ["date"]}),
    ("a book, maybe with a subtitle", {"type": "object", "properties": {"title": S, "subtitle": S,
                                                                        "pages": {"type": "integer", "minimum": 1, "maximum": 2000}},
                                       "required": ["title", "pages"], "additionalProperties": False}),
    ("a weather report", {"type": "object", "properties": {
        "temperature": {"type": "number", "exclusiveMinimum": -50, "exclusiveMaximum": 60},
        "sky": {"enum": ["sunny", "cloudy", "rainy"]}}, "required": ["temperature", "sky"]}),
    # 17-20: top-level array, anyOf of objects, definitions, everything together
    ("some digits", {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
                     "minItems": 2, "maxItems": 5}),
    ("a shape", {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0, "maximum": 100}},
         "required": ["kind", "radius"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0, "maximum": 100}},
         "required": ["kind", "side"], "additionalProperties": False}]}}, "required": ["shape"]}),
    ("a team", {"definitions": {"member": {"type": "object", "properties": {
        "name": S, "role": {"enum": ["dev", "ops", "lead"]}}, "required": ["name", "role"], "additionalProperties": False}},
        "type": "object", "properties": {"team": S, "members": {"type": "array", "items": {"$ref": "#/definitions/member"},
                                                               "minItems": 1, "maxItems": 3}},
        "required": ["team", "members"], "additionalProperties": False}),
    ("an order", {"$defs": {"customer": {"type": "object", "properties": {
        "name": S, "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}},
        "required": ["name", "email"], "additionalProperties": False}},
        "type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "customer": {"$ref": "#/$defs/customer"},
            "lines": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "object", "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                "price": {"type": "number", "minimum": 0, "maximum": 500}},
                "required": ["sku", "qty", "price"], "additionalProperties": False}},
            "status": {"enum": ["new", "paid", "shipped"]},
            "discount": {"anyOf": [{"type": "null"}, {"type": "number", "minimum": 0, "maximum": 50}]}},
        "required": ["id", "customer", "lines", "status", "discount"], "additionalProperties": False}),
]


def _closed(schema):
    """OpenAI's strict mode: objects allow no properties beyond those listed (a small model left
    free to add properties keeps adding them)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [_closed(v) for v in schema]
    return schema


SCHEMAS = [(what, _closed(schema)) for what, schema in SCHEMAS]


def _schema_request(client, i):
    what, schema = SCHEMAS[i]
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=200,
        messages=[{"role": "user", "content": f"Reply in JSON with {what}."}],
        response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}},
    )
    return r.choices[0]


def test_twenty_json_schemas_validate(client):
    with cf.ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(lambda i: _schema_request(client, i), range(len(SCHEMAS))))
    assert len(SCHEMAS) == 20
    for i, c in enumerate(choices):
        assert c.finish_reason == "stop", (i, c.message.content)
        value = json.loads(c.message.content)
        jsonschema.validate(value, SCHEMAS[i][1])


def test_structured_outputs_field_on_completions_and_chat(client):
    regex = r"[0-9]{3}-[0-9]{3}-[0-9]{4}"
    r = client.completions.create(model=MODEL, prompt="My phone number is", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"regex": regex}})
    assert re.fullmatch(regex, r.choices[0].text), r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    choices = ["Paris", "London", "Berlin"]
    r = client.chat.completions.create(model=MODEL, max_tokens=10, n=3, temperature=1.0, seed=3,
                                       messages=[{"role": "user", "content": "Capital of France?"}],
                                       extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.message.content in choices for c in r.choices), [c.message.content for c in r.choices]
    r = client.chat.completions.create(model=MODEL, max_tokens=40, temperature=0,
                                       messages=[{"role": "user", "content": "What is 12 + 30?"}],
                                       extra_body={"structured_outputs": {
                                           "grammar": 'start: "The answer is " NUM "."\nNUM: /[0-9]+/'}})
    assert re.fullmatch(r"The answer is [0-9]+\.", r.choices[0].message.content)


def test_json_object_and_streaming(client):
    msgs = [{"role": "user", "content": 'Return a JSON object with the key "color" set to "red".'}]
    r = client.chat.completions.create(model=MODEL, max_tokens=100, temperature=0, messages=msgs,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    stream = client.chat.completions.create(model=MODEL, max_tokens=100, temperature=0, messages=msgs,
                                            response_format={"type": "json_object"}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)
    likes_cats: bool


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model=MODEL, temperature=0, max_tokens=100, response_format=Person,
        messages=[{"role": "user", "content": "Invent a person: name, age, and whether they like cats."}],
    )
    person = r.choices[0].message.parsed
    assert isinstance(person, Person), r.choices[0].message.content
    assert 0 <= person.age <= 120


def test_length_finish_when_max_tokens_comes_first(client):
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=4,
        messages=[{"role": "user", "content": "Describe a person in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[8][1]}},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def test_constrained_greedy_output_is_the_same_alone_and_in_a_busy_batch(client):
    def constrained():
        return _schema_request(client, 19).message.content

    alone = constrained()

    def filler(i):
        return client.completions.create(model=MODEL, prompt="Once upon a time " * (i + 1), max_tokens=48,
                                         temperature=0.7 if i % 2 else 0, seed=i,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with cf.ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(filler, i) for i in range(5)]
        together = [pool.submit(constrained) for _ in range(3)]
        others = [pool.submit(_schema_request, client, i) for i in (5, 9)]
        results = [f.result() for f in together]
        for f in busy + others:
            f.result()
    assert results == [alone] * 3


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, "response_format", "nonsense"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "not": {"required": ["a"]}}}}}, "response_format", "not"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "xml"),
    ({"extra_body": {"structured_outputs": {"regex": "[0-9"}}}, "structured_outputs", "regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "start: ("}}}, "structured_outputs", "grammar"),
    ({"extra_body": {"structured_outputs": {"choice": []}}}, "structured_outputs", "choice"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs", "multiple"),
])
def test_bad_constraints_are_400_and_the_server_keeps_serving(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=5,
                                       messages=[{"role": "user", "content": "hi"}], **body)
    err = e.value.body
    assert e.value.status_code == 400
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "BadRequestError"
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4,
                                  extra_body={"structured_outputs": {"choice": ["ok"]}})
    assert r.choices[0].text == "ok"

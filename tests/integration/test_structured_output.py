"""response_format: JSON that always parses, and always validates when the schema's language is finite."""

import json

import jsonschema
import partial_json_parser
import pytest
from partial_json_parser import Allow

# Enums, booleans, bounded strings and arrays, no extra keys: a finite
# language, so a correct constrained decoder always finishes it.
FINITE = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]},
        "confident": {"type": "boolean"},
        "label": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "confident", "label", "tags", "score"],
    "additionalProperties": False,
}
OPEN_ENDED = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "items": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "items"],
}
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


def json_schema_format(schema, name="reply"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def test_a_finite_schema_validates_in_every_one_of_20_sampled_runs(client, service):
    samples = []
    for seed in range(5):
        response = client.chat.completions.create(
            model=service.model,
            messages=MESSAGES,
            response_format=json_schema_format(FINITE),
            n=4,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        samples += response.choices
    assert len(samples) == 20
    for choice in samples:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), FINITE)
    # Sampling, not one answer repeated: the runs differ.
    assert len({choice.message.content for choice in samples}) > 1


def test_compact_json_has_no_free_whitespace(client, service):
    response = client.chat.completions.create(
        model=service.model, messages=MESSAGES, response_format=json_schema_format(FINITE), max_tokens=200
    )
    content = response.choices[0].message.content
    assert content == json.dumps(json.loads(content), separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(
    "response_format",
    [json_schema_format(OPEN_ENDED), {"type": "json_object"}],
    ids=["open-schema", "json_object"],
)
def test_open_ended_json_is_always_a_valid_prefix_and_parses_when_finished(client, service, response_format):
    for seed in range(3):
        response = client.chat.completions.create(
            model=service.model,
            messages=MESSAGES,
            response_format=response_format,
            n=3,
            temperature=1.0,
            seed=seed,
            max_tokens=40,
        )
        for choice in response.choices:
            content = choice.message.content
            assert content.startswith("{")
            # Raises on anything that is not the beginning of valid JSON.
            partial_json_parser.loads(content, Allow.ALL)
            if choice.finish_reason == "stop":
                parsed = json.loads(content)
                assert isinstance(parsed, dict)
                if "json_schema" in response_format:
                    jsonschema.validate(parsed, OPEN_ENDED)


def test_streamed_json_equals_the_whole_answer(client, service):
    arguments = dict(
        model=service.model,
        messages=MESSAGES,
        response_format=json_schema_format(FINITE),
        max_tokens=200,
        seed=5,
    )
    whole = client.chat.completions.create(**arguments).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**arguments, stream=True)
        if c.choices
    )
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), FINITE)

"""Request parsing and the context-length budget: client mistakes are 4xx naming the field."""

import json

import pytest

from serve.errors import BadRequest
from serve.ingress import parse_body
from serve.messages import EngineInfo
from serve.sampling import completion_budget

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def body(**fields) -> bytes:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"model": "m"}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "model"),
        (body(messages=[]), "messages"),
        (body(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (
            body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages[0].content[0].image_url.url",
        ),
        (
            body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}]),
            "messages[0].content[0].image_url",
        ),
        (body(max_tokens="ten"), "max_tokens"),
        (body(max_tokens=0), "max_tokens"),
        (body(temperature=3.5), "temperature"),
        (body(top_p=0), "top_p"),
        (body(presence_penalty=-3), "presence_penalty"),
        (body(stop=""), "stop"),
        (body(seed="x"), "seed"),
        (body(stream="yes please"), "stream"),
        (body(stream_options={"include_usage": True}), "stream_options"),
        (body(n=0), "n"),
        (body(logit_bias={"hello": 3}), "logit_bias"),
        (body(logit_bias={"12": 300}), "logit_bias.12"),
        (body(top_logprobs=3), "top_logprobs"),
        (body(top_logprobs=30, logprobs=True), "top_logprobs"),
        (body(tool_choice="required"), "tool_choice"),
        (body(tool_choice="sometimes", tools=[TOOL]), "tool_choice"),
        (body(tools=[{"type": "function", "function": {"name": "has spaces"}}]), "tools[0].function.name"),
        (body(tools=[{"type": "function"}]), "tools[0].function"),
        (body(tools=[TOOL, TOOL]), "tools"),
        (body(response_format={"type": "yaml"}), "response_format.type"),
        (body(response_format={"type": "json_schema"}), "response_format.json_schema"),
        (
            body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            "response_format.json_schema.schema",
        ),
        (body(messages=[{"role": "tool", "content": "42"}]), "messages[0].tool_call_id"),
        (
            body(
                messages=[
                    {
                        "role": "user",
                        "content": "hi",
                        "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}],
                    }
                ]
            ),
            "messages[0].tool_calls",
        ),
    ],
)
def test_malformed_requests_name_the_field(raw, param):
    with pytest.raises(BadRequest) as caught:
        parse_body(raw)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    if param:
        assert caught.value.message.startswith(param)


def test_json_nested_past_the_parser_is_a_400_not_a_crash():
    with pytest.raises(BadRequest) as caught:
        parse_body(b'{"model": "m", "metadata": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    assert "nested too deeply" in caught.value.message


def test_unknown_fields_are_accepted_and_reported():
    request = parse_body(body(metadata={"a": 1}, store=False))
    assert request.unknown_fields() == ["metadata", "store"]
    assert request.unsupported_fields() == []


def test_fields_not_implemented_are_refused_not_ignored():
    request = parse_body(body(functions=[{"name": "f"}]))
    assert request.unsupported_fields() == ["functions"]
    assert parse_body(body(functions=None)).unsupported_fields() == []


def test_stop_and_token_limit_accessors():
    request = parse_body(body(stop="END", max_tokens=5, max_completion_tokens=7))
    assert request.stop_sequences == ["END"]
    assert request.completion_token_limit == 7


INFO = EngineInfo(max_model_len=100, vocab_size=131072, system_fingerprint="fp_test")


def test_budget_defaults_to_the_rest_of_the_context():
    assert completion_budget(30, None, INFO) == 70


def test_budget_over_the_context_is_refused_with_the_numbers():
    with pytest.raises(BadRequest) as caught:
        completion_budget(30, 80, INFO)
    assert caught.value.param == "max_tokens"
    assert "110" in caught.value.message and "100" in caught.value.message


def test_prompt_filling_the_context_is_refused():
    with pytest.raises(BadRequest) as caught:
        completion_budget(100, None, INFO)
    assert caught.value.param == "messages"
    assert caught.value.code == "context_length_exceeded"

"""Request parsing and the context-length budget: client mistakes are 4xx naming the field."""

import json

import pytest

from serve.config import LimitsConfig
from serve.errors import BadRequest
from serve.ingress import parse_body
from serve.messages import EngineInfo
from serve.protocol.chat import ChatCompletionRequest
from serve.protocol.completions import CompletionRequest
from serve.sampling import ResponseShape, completion_budget
from tests.unit.ingress_app import ingress_client

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
        # OpenAI's types, strictly: no coercion of strings, floats or numbers into other types.
        (body(stream="true"), "stream"),
        (body(stream=1), "stream"),
        (body(max_tokens="5"), "max_tokens"),
        (body(max_tokens=5.0), "max_tokens"),
        (body(temperature="0.5"), "temperature"),
        (body(n=True), "n"),
        (body(logprobs="yes"), "logprobs"),
        (body(messages=[{"role": "user", "content": None}]), "messages[0].content"),
        (body(messages=[{"role": "user"}]), "messages[0].content"),
        (
            body(messages=[{"role": "system", "content": None}, {"role": "user", "content": "hi"}]),
            "messages[0].content",
        ),
        (body(messages=[{"role": "user", "content": "hi"}, {"role": "assistant"}]), "messages[1].content"),
        (body(logit_bias={"\u00b2": 3}), "logit_bias"),
        (body(logit_bias={"\u0661": 3}), "logit_bias"),
        (body(logit_bias={"1" * 5000: 3}), "logit_bias"),
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


# What each endpoint refuses rather than ignores, as the README lists it.
README_REFUSED = {
    "/v1/chat/completions": {"functions", "audio", "prediction"},
    "/v1/completions": {"suffix", "best_of"},
}
SCHEMAS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
# A value of each as an OpenAI client sends it.
SAMPLE_VALUES = {
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "hi"},
    "web_search_options": {"search_context_size": "low"},
    "suffix": " the end",
    "best_of": 2,
}
REFUSED_FIELDS = sorted(
    {(path, field) for path, schema in SCHEMAS.items() for field in schema.UNSUPPORTED}
    | {(path, field) for path, fields in README_REFUSED.items() for field in fields}
)


def endpoint_body(path: str, **fields) -> bytes:
    if path == "/v1/completions":
        return json.dumps({"model": "m", "prompt": "hi", **fields}).encode()
    return body(**fields)


@pytest.mark.parametrize(("path", "field"), REFUSED_FIELDS)
def test_fields_not_implemented_are_refused_not_ignored(monkeypatch, path, field):
    assert field in SAMPLE_VALUES, f"{field}: give the test a value a client would send"
    value = SAMPLE_VALUES[field]
    assert parse_body(endpoint_body(path, **{field: value}), SCHEMAS[path]).unsupported_fields() == [field]
    assert parse_body(endpoint_body(path, **{field: None}), SCHEMAS[path]).unsupported_fields() == []
    # Through the ingress's own route: a 400 that names the field, before any stage is asked.
    with ingress_client(monkeypatch) as client:
        refused = client.post(path, content=endpoint_body(path, **{field: value}))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: ")
    assert error["type"] == "invalid_request_error"


def test_stop_and_token_limit_accessors():
    request = parse_body(body(stop="END", max_tokens=5, max_completion_tokens=7))
    assert request.stop_sequences == ["END"]
    assert request.completion_token_limit == 7


INFO = EngineInfo(max_model_len=100, vocab_size=131072, system_fingerprint="fp_test")
UNBOUNDED = LimitsConfig(default_max_tokens=None)


def test_a_big_integer_or_odd_digit_key_is_a_400_naming_the_field_not_a_crash():
    with pytest.raises(BadRequest) as caught:
        parse_body(
            b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000 + b"}"
        )
    assert caught.value.status_code == 400
    with pytest.raises(BadRequest) as caught:
        parse_body(body(logit_bias={"1" * 5000: 3}))
    assert len(caught.value.message) < 200, "the key is not echoed whole"


def test_an_assistant_message_calling_tools_needs_no_content():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    request = parse_body(
        body(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}])
    )
    assert request.messages[1].content is None


def test_an_integer_for_a_float_field_is_accepted_as_openai_does():
    assert parse_body(body(temperature=1)).temperature == 1.0


def test_budget_defaults_to_the_rest_of_the_context():
    assert completion_budget(30, None, INFO, UNBOUNDED) == 70


def test_budget_over_the_context_is_refused_with_the_numbers():
    with pytest.raises(BadRequest) as caught:
        completion_budget(30, 80, INFO, UNBOUNDED)
    assert caught.value.param == "max_tokens"
    assert "110" in caught.value.message and "100" in caught.value.message


def test_prompt_filling_the_context_is_refused():
    with pytest.raises(BadRequest) as caught:
        completion_budget(100, None, INFO, UNBOUNDED)
    assert caught.value.param == "messages"
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(BadRequest) as caught:
        completion_budget(100, 16, INFO, UNBOUNDED, prompt_field="prompt")
    assert caught.value.param == "prompt"


LONG_CONTEXT = EngineInfo(max_model_len=262_144, vocab_size=131072, system_fingerprint="fp_test")


def test_an_unset_max_tokens_is_the_default_within_the_rest_of_the_context():
    limits = LimitsConfig(default_max_tokens=1000)
    assert completion_budget(10, None, LONG_CONTEXT, limits) == 1000
    assert completion_budget(262_000, None, LONG_CONTEXT, limits) == 144


def test_an_unset_max_tokens_shrinks_to_keep_the_whole_request_within_its_limits():
    limits = LimitsConfig(default_max_tokens=None, max_total_completion_tokens=4096, max_logprob_entries=2100)
    assert completion_budget(10, None, LONG_CONTEXT, limits, ResponseShape(choices=16)) == 256
    assert (
        completion_budget(10, None, LONG_CONTEXT, limits, ResponseShape(choices=2, logprobs_per_token=21))
        == 50
    )


@pytest.mark.parametrize(
    ("shape", "requested", "setting"),
    [
        (ResponseShape(choices=16), 4097, "max_total_completion_tokens"),
        (ResponseShape(choices=2, logprobs_per_token=21), 3200, "max_logprob_entries"),
    ],
)
def test_a_request_that_would_hold_too_much_is_refused_naming_field_and_setting(shape, requested, setting):
    limits = LimitsConfig(max_total_completion_tokens=65_536, max_logprob_entries=131_072)
    with pytest.raises(BadRequest) as caught:
        completion_budget(10, requested, LONG_CONTEXT, limits, shape, field="max_completion_tokens")
    assert caught.value.param == "max_completion_tokens"
    assert caught.value.code == "limit_exceeded"
    assert f"limits.{setting}" in caught.value.message
    assert completion_budget(10, requested - 1 - requested // 2, LONG_CONTEXT, limits, shape) > 0


def test_echoed_prompt_logprobs_count_toward_the_reply():
    limits = LimitsConfig(max_logprob_entries=1000)
    with pytest.raises(BadRequest) as caught:
        completion_budget(
            90,
            1,
            LONG_CONTEXT,
            limits,
            ResponseShape(choices=2, logprobs_per_token=6, echoed_prompt_tokens=90),
        )
    assert caught.value.param == "logprobs"


def test_the_default_limits_bound_what_one_reply_holds():
    """The figures docs/reliability.md states: 65,536 tokens, 131,072 log-probabilities."""
    limits = LimitsConfig()
    n, top = limits.max_choices, 20
    budget = completion_budget(
        10, None, LONG_CONTEXT, limits, ResponseShape(choices=n, logprobs_per_token=top + 1)
    )
    assert n * budget * (top + 1) <= limits.max_logprob_entries
    assert n * completion_budget(10, None, LONG_CONTEXT, limits, ResponseShape(choices=n)) <= 65_536

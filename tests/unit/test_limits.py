"""Request limits: each refusal names the field and the setting; the defaults agree with each other."""

import asyncio
import contextlib
import gc
import json
import threading
import time

import pytest
from pydantic import ValidationError

from serve.config import AppConfig, LimitsConfig
from serve.errors import BadRequest, RequestTooLarge
from serve.grammar import CompiledGrammars
from serve.ingress import parse_body
from serve.limits import check_collection_sizes, check_json_values, check_limits, nesting_depth, read_body
from serve.protocol.completions import CompletionRequest, DetokenizeRequest

LIMITS = LimitsConfig(
    max_messages=4,
    max_content_parts=3,
    max_choices=2,
    max_stop_sequences=2,
    max_stop_sequence_chars=5,
    max_tools=2,
    max_schema_bytes=200,
    max_schema_depth=7,
    max_logit_bias=2,
)
USER = {"role": "user", "content": "hi"}
TEXT_PART = {"type": "text", "text": "hi"}


def tool(name: str, parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


def nested(levels: int) -> dict:
    """A schema of `levels` objects, one inside the next: 2 * levels - 1 levels of JSON."""
    schema: dict = {"type": "string"}
    for _ in range(levels - 1):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def chat(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [USER], **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "param", "setting"),
    [
        (chat(messages=[USER] * 5), "messages", "max_messages"),
        (chat(messages=[{"role": "user", "content": [TEXT_PART] * 2}] * 2), "messages", "max_content_parts"),
        (chat(n=3), "n", "max_choices"),
        (chat(stop=["a", "b", "c"]), "stop", "max_stop_sequences"),
        (chat(stop="longer"), "stop", "max_stop_sequence_chars"),
        (chat(stop=["ok", "longer"]), "stop[1]", "max_stop_sequence_chars"),
        (chat(tools=[tool("a"), tool("b"), tool("c")]), "tools", "max_tools"),
        (
            chat(tools=[tool("a"), tool("b", {"type": "object", "description": "x" * 300})]),
            "tools[1].function.parameters",
            "max_schema_bytes",
        ),
        (chat(tools=[tool("a", nested(5))]), "tools[0].function.parameters", "max_schema_depth"),
        (
            chat(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": nested(5)}}),
            "response_format.json_schema.schema",
            "max_schema_depth",
        ),
        (chat(logit_bias={"1": 1, "2": 1, "3": 1}), "logit_bias", "max_logit_bias"),
    ],
)
def test_a_request_past_a_limit_is_refused_naming_field_and_setting(raw, param, setting):
    with pytest.raises(BadRequest) as caught:
        check_limits(parse_body(raw, limits=LIMITS), LIMITS)
    assert caught.value.param == param
    assert caught.value.code == "limit_exceeded"
    assert caught.value.message.startswith(param)
    assert f"limits.{setting}" in caught.value.message


def test_a_request_at_every_limit_passes():
    at_the_limits = chat(
        messages=[USER, USER, {"role": "user", "content": [TEXT_PART] * 3}, USER],
        n=2,
        stop=["five5", "x"],
        tools=[tool("a", nested(4)), tool("b")],
        logit_bias={"1": 1, "2": -1},
    )
    check_limits(parse_body(at_the_limits, limits=LIMITS, max_model_len=100), LIMITS)


def test_completions_are_held_to_the_shared_limits():
    request = parse_body(json.dumps({"model": "m", "prompt": "hi", "n": 3}).encode(), CompletionRequest)
    with pytest.raises(BadRequest) as caught:
        check_limits(request, LIMITS)
    assert caught.value.param == "n"


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ({}, 1), ([[]], 2), ({"a": [1, {"b": {}}]}, 4), (nested(7), 13)],
)
def test_nesting_depth(value, depth):
    assert nesting_depth(value) == depth


def test_nesting_depth_of_a_hostile_value_does_not_recurse():
    value: list = []
    for _ in range(100_000):
        value = [value]
    assert nesting_depth(value) == 100_001


async def chunks_of(body: bytes, size: int, read: list[int]):
    for start in range(0, len(body), size):
        read.append(start + size)
        yield body[start : start + size]


def test_a_body_over_the_limit_stops_being_read_once_past_it():
    read: list[int] = []
    with pytest.raises(RequestTooLarge) as caught:
        asyncio.run(read_body(None, chunks_of(b"x" * 10_000, 1000, read), 2500))
    assert read == [1000, 2000, 3000], "reading went on past the limit"
    assert "limits.max_request_bytes" in caught.value.message
    assert caught.value.status_code == 413


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    read: list[int] = []
    with pytest.raises(RequestTooLarge) as caught:
        asyncio.run(read_body("10000", chunks_of(b"x" * 10_000, 1000, read), 2500))
    assert read == []
    assert "10000 bytes" in caught.value.message


def test_a_body_within_the_limit_is_read_whole():
    read: list[int] = []
    assert asyncio.run(read_body("2500", chunks_of(b"y" * 2500, 1000, read), 2500)) == b"y" * 2500


def test_the_default_limits_let_the_largest_image_through_as_a_data_url():
    config = AppConfig()
    assert config.limits.max_request_bytes >= 4 / 3 * config.images.max_image_bytes


def test_an_image_limit_no_request_could_carry_is_a_config_error():
    with pytest.raises(ValidationError, match=r"limits\.max_request_bytes") as refused:
        AppConfig.model_validate(
            {"images": {"max_image_bytes": 8_000_000}, "limits": {"max_request_bytes": 8_000_000}}
        )
    # It names both settings (docs/reliability.md), either of which fixes it: in its message, not
    # only in the input pydantic quotes back.
    (error,) = refused.value.errors()
    assert "images.max_image_bytes" in error["msg"] and "limits.max_request_bytes" in error["msg"]
    # Without images, the image limit constrains nothing.
    AppConfig.model_validate(
        {
            "images": {"max_images_per_request": 0, "max_image_bytes": 8_000_000},
            "limits": {"max_request_bytes": 8_000_000},
        }
    )


class CountingBuilder:
    """A stand-in for GrammarBuilder that records where and how often it compiles."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.calls: list[str] = []

    def for_chat(self, request):
        self.calls.append(threading.current_thread().name)
        time.sleep(self.seconds)
        if request.tools[0].function.name == "bad":
            raise BadRequest(
                "tools[0].function.parameters: cannot be enforced", param="tools[0].function.parameters"
            )
        return f"grammar of {request.tools[0].function.name}"


# Room for two of CountingBuilder's grammars ("grammar of a") and their entries, not three.
TWO_GRAMMARS = 2 * (len("grammar of a") + 256) + 1


def test_grammars_compile_off_the_event_loop_once_per_input():
    from concurrent.futures import ThreadPoolExecutor

    builder = CountingBuilder()
    grammars = CompiledGrammars(
        builder, ThreadPoolExecutor(1, thread_name_prefix="grammar"), max_bytes=TWO_GRAMMARS
    )

    async def run():
        first = await grammars.for_chat(parse_body(chat(tools=[tool("a")])))
        again = await grammars.for_chat(parse_body(chat(tools=[tool("a")])))
        free_text = await grammars.for_chat(parse_body(chat()))
        return first, again, free_text

    assert asyncio.run(run()) == ("grammar of a", "grammar of a", None)
    assert len(builder.calls) == 1
    assert builder.calls[0].startswith("grammar")


def test_a_refused_schema_is_refused_again_from_the_cache():
    from concurrent.futures import ThreadPoolExecutor

    builder = CountingBuilder()
    grammars = CompiledGrammars(builder, ThreadPoolExecutor(1), max_bytes=TWO_GRAMMARS)
    for _ in range(3):
        with pytest.raises(BadRequest) as caught:
            asyncio.run(grammars.for_chat(parse_body(chat(tools=[tool("bad")]))))
        assert caught.value.param == "tools[0].function.parameters"
    assert len(builder.calls) == 1


def test_the_cache_keeps_only_its_newest_entries():
    from concurrent.futures import ThreadPoolExecutor

    builder = CountingBuilder()
    grammars = CompiledGrammars(builder, ThreadPoolExecutor(1), max_bytes=TWO_GRAMMARS)

    async def run(names):
        for name in names:
            await grammars.for_chat(parse_body(chat(tools=[tool(name)])))

    asyncio.run(run(["a", "b", "c", "a"]))
    assert len(builder.calls) == 4, "a was evicted by c and compiled again"


def described_tool(name: str, description_chars: int) -> dict:
    return {"type": "function", "function": {"name": name, "description": "x" * description_chars}}


def test_the_cache_does_not_keep_what_a_grammar_was_compiled_from():
    """Four requests whose tools carry 4 MB descriptions, two of them refused: the cache keeps
    their grammars and refusals, not the requests (it once kept each request's tools as its key,
    and each refusal's traceback, whose frames held the request)."""
    import tracemalloc
    from concurrent.futures import ThreadPoolExecutor

    grammars = CompiledGrammars(CountingBuilder(), ThreadPoolExecutor(1), max_bytes=1024**2)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for serial, name in enumerate(["a", "bad", "b", "bad"]):
            request = parse_body(chat(tools=[described_tool(name, 4_000_000 + serial)]))
            with contextlib.suppress(BadRequest):
                asyncio.run(grammars.for_chat(request))
            del request
        # A raised error and its traceback's frames form cycles, freed by the collector.
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 1024**2, f"the cache kept {kept} bytes"


def test_collections_past_their_limit_are_refused_before_validation():
    tokens = json.dumps({"tokens": list(range(5000))}).encode()
    with pytest.raises(BadRequest) as caught:
        parse_body(tokens, DetokenizeRequest, LIMITS, max_model_len=4096)
    assert caught.value.param == "tokens"
    assert caught.value.code == "context_length_exceeded"
    assert "5000 tokens" in caught.value.message
    prompt = json.dumps({"model": "m", "prompt": list(range(5000))}).encode()
    with pytest.raises(BadRequest) as caught:
        parse_body(prompt, CompletionRequest, LIMITS, max_model_len=4096)
    assert caught.value.param == "prompt"
    parts = chat(messages=[{"role": "user", "content": [TEXT_PART] * 100_000}])
    with pytest.raises(BadRequest) as caught:
        parse_body(parts, limits=LIMITS, max_model_len=4096)
    assert "limits.max_content_parts" in caught.value.message


def test_a_slow_compilation_does_not_stall_the_event_loop():
    from concurrent.futures import ThreadPoolExecutor

    grammars = CompiledGrammars(CountingBuilder(seconds=0.5), ThreadPoolExecutor(1), max_bytes=TWO_GRAMMARS)

    async def run():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await grammars.for_chat(parse_body(chat(tools=[tool("slow")])))
        ticker.cancel()
        return ticks

    assert asyncio.run(run()) >= 20


def test_a_body_of_too_many_json_values_is_refused_before_it_is_parsed(monkeypatch):
    import msgspec

    decode = msgspec.json.decode

    def only_skimming(raw, **options):
        """msgspec's decoder, allowed only to skim the body into raw values, not to build them."""
        assert "type" in options, "the body was parsed"
        return decode(raw, **options)

    monkeypatch.setattr(msgspec.json, "decode", only_skimming)
    tokens = ("[" + ",".join(["12345"] * 5_000_000) + "]").encode()
    with pytest.raises(BadRequest) as caught:
        parse_body(b'{"model": "m", "tokens": ' + tokens + b"}", DetokenizeRequest, LimitsConfig(), 262_144)
    assert caught.value.param == "tokens"
    assert caught.value.code == "context_length_exceeded"
    assert "5000000 tokens" in caught.value.message
    with pytest.raises(BadRequest) as caught:
        parse_body(chat(metadata=[[]] * 1_100_000), limits=LimitsConfig(), max_model_len=262_144)
    assert "limits.max_json_values" in caught.value.message
    monkeypatch.undo()
    # A long text is one value however long it is.
    long_text = chat(messages=[{"role": "user", "content": "x" * 3_000_000}])
    assert parse_body(long_text, limits=LimitsConfig(), max_model_len=262_144).messages[0].content


@pytest.mark.parametrize(
    ("raw", "param", "count", "unit", "setting"),
    [
        (chat(messages=[USER] * 5), "messages", 5, "messages", "max_messages"),
        (
            chat(messages=[{"role": "user", "content": [TEXT_PART] * 2}] * 2),
            "messages",
            4,
            "content parts",
            "max_content_parts",
        ),
        (chat(n=3), "n", 3, "choices", "max_choices"),
        (chat(stop=["a", "b", "c"]), "stop", 3, "stop sequences", "max_stop_sequences"),
        (chat(stop="longer"), "stop", len("longer"), "characters", "max_stop_sequence_chars"),
        (chat(tools=[tool("a"), tool("b"), tool("c")]), "tools", 3, "tools", "max_tools"),
        (
            chat(tools=[tool("a", {"type": "object", "description": "x" * 300})]),
            "tools[0].function.parameters",
            len(json.dumps({"type": "object", "description": "x" * 300}, separators=(",", ":"))),
            "bytes as compact JSON",
            "max_schema_bytes",
        ),
        (
            chat(tools=[tool("a", nested(5))]),
            "tools[0].function.parameters",
            9,
            "levels deep",
            "max_schema_depth",
        ),
        (chat(logit_bias={"1": 1, "2": 1, "3": 1}), "logit_bias", 3, "entries", "max_logit_bias"),
    ],
)
def test_a_refusal_says_how_much_was_asked_for_and_what_is_allowed(raw, param, count, unit, setting):
    with pytest.raises(BadRequest) as caught:
        check_limits(parse_body(raw, limits=LIMITS), LIMITS)
    limit = getattr(LIMITS, setting)
    assert (
        caught.value.message
        == f"{param}: {count} {unit}; this service accepts at most {limit} (limits.{setting})"
    )


def test_a_scalar_beside_a_deeper_value_does_not_end_the_count():
    assert nesting_depth([1, [[]]]) == 3
    assert nesting_depth([[[]], 1]) == 3


def test_a_body_too_large_says_how_large_and_what_the_limit_is():
    with pytest.raises(RequestTooLarge) as declared:
        asyncio.run(read_body("10000", chunks_of(b"x" * 10_000, 1000, []), 2500))
    assert (
        declared.value.message
        == "the request body is 10000 bytes; the limit is 2500 bytes (limits.max_request_bytes)"
    )
    assert declared.value.code == "request_too_large"
    with pytest.raises(RequestTooLarge) as streamed:
        asyncio.run(read_body(None, chunks_of(b"x" * 10_000, 1000, []), 2500))
    assert streamed.value.message == (
        "the request body exceeds 2500 bytes; the limit is 2500 bytes (limits.max_request_bytes)"
    )
    assert streamed.value.code == "request_too_large"


FEWEST_VALUES = LimitsConfig(max_json_values=1024)  # the smallest limit the config accepts


def json_list(values: int) -> bytes:
    """A list of `values` one-digit numbers: the densest JSON, two bytes a value."""
    return b"[" + b",".join([b"0"] * values) + b"]"


def test_a_body_of_as_many_json_values_as_the_limit_passes():
    check_json_values(json_list(FEWEST_VALUES.max_json_values), FEWEST_VALUES, max_model_len=None)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(json_list(1025), id="one-value-past-the-limit"),
        # 682 empty objects, padded to exactly twice the limit in bytes.
        pytest.param((b"[" + b",".join([b"{}"] * 682) + b"]").ljust(2048), id="objects"),
        pytest.param(b"[" * 1100 + b"]" * 1100, id="nested-arrays"),
    ],
)
def test_a_body_of_more_json_values_than_the_limit_is_refused(raw):
    with pytest.raises(BadRequest) as caught:
        check_json_values(raw, FEWEST_VALUES, max_model_len=None)
    assert caught.value.code == "limit_exceeded"
    assert caught.value.message.endswith("this service accepts at most 1024 (limits.max_json_values)")


def completion(prompt) -> bytes:
    return json.dumps({"model": "m", "prompt": prompt}).encode()


def test_a_token_list_of_the_whole_context_is_not_past_it():
    # Past max_json_values, but as long as the context: the refusal is for the values.
    with pytest.raises(BadRequest) as caught:
        check_json_values(completion([0] * 1100), FEWEST_VALUES, max_model_len=1100)
    assert caught.value.code == "limit_exceeded"
    check_collection_sizes({"prompt": [0] * 8}, LIMITS, max_model_len=8)


def test_a_token_list_one_past_the_context_is_refused_as_such():
    with pytest.raises(BadRequest) as caught:
        check_json_values(completion([0] * 1101), FEWEST_VALUES, max_model_len=1100)
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "prompt")
    assert (
        caught.value.message == "prompt: 1101 tokens, but this model's maximum context length is 1100 tokens"
    )
    with pytest.raises(BadRequest) as caught:
        check_collection_sizes({"tokens": [0] * 9}, LIMITS, max_model_len=8)
    assert caught.value.message == "tokens: 9 tokens, but this model's maximum context length is 8 tokens"


def test_a_text_prompt_full_of_commas_is_not_a_token_list():
    with pytest.raises(BadRequest) as caught:
        check_json_values(completion("," * 2100), FEWEST_VALUES, max_model_len=1100)
    assert caught.value.code == "limit_exceeded"

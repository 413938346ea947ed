"""Tool calling through the openai client: round trips for auto, required and a named tool.

The demo weights are random, so `auto` would rarely choose a tool on its own:
those requests raise the logit of [TOOL_CALLS] with `logit_bias` (an OpenAI
field), and the grammar does the rest. `required` and named calls need no help.
"""

import asyncio
import json

import httpx
import jsonschema
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from openai import AsyncOpenAI

from tests.integration.test_errors import USER, assert_openai_error, post

# Finite argument languages: every constrained call ends well within max_tokens.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}, "precise": {"type": "boolean"}},
            "required": ["zone", "precise"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris, and what time is it?"}]


@pytest.fixture(scope="module")
def tool_calls_token(tekken) -> int:
    return tekken.get_special_token("[TOOL_CALLS]")


def choice_arguments(choice: str, tool_calls_token: int) -> dict:
    # One call, then the end: without parallel calls the grammar closes after
    # it (a random model would otherwise chain calls until max_tokens).
    if choice == "auto":
        return {"logit_bias": {str(tool_calls_token): 100}, "parallel_tool_calls": False}
    if choice == "named":
        return {
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            "parallel_tool_calls": False,
        }
    return {"tool_choice": "required", "parallel_tool_calls": False}


def check_calls(tool_calls, choice: str) -> None:
    # Every request here sets parallel_tool_calls: false.
    assert len(tool_calls) == 1, tool_calls
    for call in tool_calls:
        assert call.type == "function" and call.id
        if choice == "named":
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def collect_stream(stream):
    """Tool calls and finish reason rebuilt from streamed deltas, as OpenAI clients do."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = call.id or entry["id"]
            entry["name"] += (call.function.name or "") if call.function else ""
            entry["arguments"] += (call.function.arguments or "") if call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return calls, finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", ["auto", "required", "named"])
def test_round_trip(client, service, tokenizer, tool_calls_token, choice, stream):
    first = dict(model=service.model, messages=QUESTION, tools=TOOLS, max_tokens=80)
    first |= choice_arguments(choice, tool_calls_token)
    if stream:
        calls, finish = collect_stream(client.chat.completions.create(**first, stream=True))
        assert finish == "tool_calls"
        assert all(entry["id"] and entry["name"] for entry in calls.values())
        tool_calls = [
            {"id": e["id"], "type": "function", "function": {"name": e["name"], "arguments": e["arguments"]}}
            for e in calls.values()
        ]
        for call in tool_calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    else:
        response = client.chat.completions.create(**first)
        message = response.choices[0].message
        assert response.choices[0].finish_reason == "tool_calls"
        check_calls(message.tool_calls, choice)
        assert message.content is None
        tool_calls = [call.model_dump() for call in message.tool_calls]

    # The tool results go back; the model answers in text.
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": tool_calls},
        *({"role": "tool", "tool_call_id": call["id"], "content": '{"result": "ok"}'} for call in tool_calls),
    ]
    final = client.chat.completions.create(
        model=service.model,
        messages=history,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=8,
        extra_body={"return_token_ids": True},
    )
    assert final.choices[0].message.content
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason in ("stop", "length")
    # The follow-up prompt is mistral_common's own encoding of that conversation.
    expected = tokenizer.encode_chat_completion(
        MistralRequest.from_openai(
            [{"role": "system", "content": service.default_system_prompt}, *history],
            tools=TOOLS,
        )
    ).tokens
    assert final.model_extra["prompt_token_ids"] == expected


def test_parallel_calls_each_follow_their_schema(client, service):
    response = client.chat.completions.create(
        model=service.model, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=120
    )
    calls = response.choices[0].message.tool_calls
    assert calls
    # A choice cut by max_tokens may end inside its last call's arguments.
    complete = calls if response.choices[0].finish_reason == "tool_calls" else calls[:-1]
    for call in complete:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({call.id for call in calls}) == len(calls)


def test_required_with_the_async_client(service):
    async def call():
        async with AsyncOpenAI(base_url=service.openai_url, api_key="unused", max_retries=0) as client:
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=service.model,
                        messages=QUESTION,
                        tools=TOOLS,
                        tool_choice="required",
                        parallel_tool_calls=False,
                        max_tokens=80,
                        temperature=1.0,
                        seed=seed,
                    )
                    for seed in range(4)
                )
            )

    for response in asyncio.run(call()):
        check_calls(response.choices[0].message.tool_calls, "required")


def test_tool_choice_none_never_calls(client, service, tool_calls_token):
    response = client.chat.completions.create(
        model=service.model,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=12,
        logit_bias={str(tool_calls_token): 100},
    )
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].message.content


BAD_SCHEMA_TOOL = {
    "type": "function",
    "function": {"name": "broken", "parameters": {"type": "object", "properties": {"a": {"type": "strng"}}}},
}


@pytest.mark.parametrize(
    ("extra", "param", "text"),
    [
        (
            {"tools": [WEATHER, BAD_SCHEMA_TOOL], "tool_choice": "required"},
            "tools[1].function.parameters",
            "strng",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}},
            "tool_choice.function.name",
            "get_news",
        ),
        ({"tools": TOOLS, "tool_choice": "whenever"}, "tool_choice", "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_object"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format.json_schema.schema",
            "cannot be enforced",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "tool_choice is auto or none",
        ),
        (
            {"messages": [*USER, {"role": "tool", "tool_call_id": "call_1", "content": "42"}]},
            "messages[1].tool_call_id",
            "call_1",
        ),
        (
            {
                "messages": [
                    *USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{oops"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
            "not valid JSON",
        ),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(client, service, extra, param, text):
    response = post(service, {"model": service.model, "messages": USER, "max_tokens": 4} | extra)
    assert_openai_error(response, 400, param, text)
    assert httpx.get(f"{service.base_url}/health", timeout=30).status_code == 200


def split_character_tokens(tekken, character: str) -> tuple[int, int]:
    """Two tokens that spell `character` only together: its leading bytes, and a token
    that starts with its last byte and goes on with whole characters."""
    encoded = character.encode()
    lead = trail = None
    for token_id in range(tekken.num_special_tokens, tekken.n_words):
        piece = tekken.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP)
        if piece == encoded[:-1]:
            lead = token_id
        elif trail is None and len(piece) > 1 and piece.startswith(encoded[-1:]):
            try:
                piece[1:].decode()
            except UnicodeDecodeError:
                continue
            trail = token_id
    assert lead is not None and trail is not None, f"tekken has no split tokens for {character!r}"
    return lead, trail


def test_a_character_split_across_tokens_reaches_the_arguments_whole(client, service, tekken):
    # 靧 is three bytes in UTF-8; tekken has a token for its first two.
    lead, trail = split_character_tokens(tekken, "靧")
    response = client.chat.completions.create(
        model=service.model,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
        logit_bias={str(lead): 100, str(trail): 100},
        extra_body={"return_token_ids": True},
    )
    choice = response.choices[0]
    completion_ids = choice.model_extra["token_ids"]
    assert lead in completion_ids and trail in completion_ids
    city = json.loads(choice.message.tool_calls[0].function.arguments)["city"]
    # The grammar lets the lead token only start a character, so the trail token completes it.
    assert "靧" in city and "\ufffd" not in city
    generated = tekken.decode(completion_ids, SpecialTokenPolicy.IGNORE)
    assert json.dumps(city, ensure_ascii=False) in generated

"""A Reasoning-style checkpoint: [THINK] traces come back as reasoning_content and go back into the prompt.

The demo weights are random: a grammar plus `logit_bias` on [THINK] and
[/THINK] makes the model open a trace, write one token, and close it, which
is all the parsing needs to be exercised.
"""

import pytest
from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from openai import OpenAI
from ray import serve

from serve.app import build_app
from serve.config import AppConfig
from serve.demo_checkpoint import write_demo_checkpoint
from tests.integration.conftest import run_behind_the_front_door
from tests.integration.test_tools import WEATHER
from tests.prompts import SYSTEM_PROMPT_DATE
from tests.reference import checkpoint_system_prompt

APP = "reasoning"
QUESTION = [{"role": "user", "content": "Is 91 a prime number?"}]


@pytest.fixture(scope="module")
def reasoning(service, tmp_path_factory):
    """A second application on the same Ray cluster, on a reasoning demo checkpoint."""
    checkpoint = write_demo_checkpoint(
        tmp_path_factory.mktemp("checkpoints") / "demo-reasoning", seed=0, variant="reasoning"
    )
    config = AppConfig.model_validate(
        {
            "model": {"source": str(checkpoint), "served_name": "demo-reasoning"},
            "engine": {"dtype": "float32", "max_model_len": 1024, "cpu_kv_cache_space_gib": 1},
            "images": {"max_images_per_request": 0},
            "system_prompt_date": SYSTEM_PROMPT_DATE.isoformat(),
            "deployments": {"ingress": {"num_cpus": 0}, "decoder": {"num_cpus": 1}},
        }
    )
    url = run_behind_the_front_door(build_app(config), APP, f"/{APP}", service.base_url)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    yield client, checkpoint
    serve.delete(APP)


@pytest.fixture(scope="module")
def reasoning_tokenizer(reasoning):
    _, checkpoint = reasoning
    return MistralTokenizer.from_file(str(checkpoint / "tekken.json"))


@pytest.fixture(scope="module")
def think_bias(reasoning_tokenizer):
    tekken = reasoning_tokenizer.instruct_tokenizer.tokenizer
    return {str(tekken.get_special_token(token)): 100 for token in ("[THINK]", "[/THINK]")}


def thinking_request(think_bias, **kwargs):
    # tool_choice none: the grammar is `[THINK] text [/THINK]`-then-text, no calls.
    return dict(
        model="demo-reasoning",
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice="none",
        logit_bias=think_bias,
        max_tokens=12,
        extra_body={"return_token_ids": True},
        **kwargs,
    )


def test_reasoning_comes_back_separately(reasoning, think_bias, reasoning_tokenizer):
    client, _ = reasoning
    response = client.chat.completions.create(**thinking_request(think_bias))
    message = response.choices[0].message
    assert message.model_extra["reasoning_content"]
    assert message.content
    assert "[THINK]" not in message.content and "[/THINK]" not in message.content
    token_ids = response.choices[0].model_extra["token_ids"]
    tekken = reasoning_tokenizer.instruct_tokenizer.tokenizer
    end = token_ids.index(tekken.get_special_token("[/THINK]"))
    assert token_ids[0] == tekken.get_special_token("[THINK]")
    # vLLM's parser drops the whitespace that ends a trace.
    assert message.model_extra["reasoning_content"] == tekken.decode(token_ids[1:end]).rstrip()
    assert response.usage.completion_tokens_details.reasoning_tokens > 0


def test_streamed_reasoning_equals_the_whole(reasoning, think_bias):
    client, _ = reasoning
    whole = client.chat.completions.create(**thinking_request(think_bias, temperature=0)).choices[0].message
    reasoning_text, content = "", ""
    for chunk in client.chat.completions.create(**thinking_request(think_bias, temperature=0), stream=True):
        if chunk.choices:
            reasoning_text += chunk.choices[0].delta.model_extra.get("reasoning_content") or ""
            content += chunk.choices[0].delta.content or ""
    assert reasoning_text == whole.model_extra["reasoning_content"]
    assert content == whole.content


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_a_second_turn_keeps_the_trace_in_the_prompt(reasoning, think_bias, reasoning_tokenizer, field):
    client, checkpoint = reasoning
    first = client.chat.completions.create(**thinking_request(think_bias, temperature=0)).choices[0].message
    trace, answer = first.model_extra["reasoning_content"], first.content
    second = client.chat.completions.create(
        model="demo-reasoning",
        messages=[
            *QUESTION,
            {"role": "assistant", "content": answer, field: trace},
            {"role": "user", "content": "Are you sure?"},
        ],
        max_tokens=2,
        extra_body={"return_token_ids": True},
    )
    expected = reasoning_tokenizer.encode_chat_completion(
        MistralRequest(
            messages=[
                SystemMessage(content=checkpoint_system_prompt(checkpoint, SYSTEM_PROMPT_DATE)),
                UserMessage(content=QUESTION[0]["content"]),
                AssistantMessage(content=[ThinkChunk(thinking=trace), TextChunk(text=answer)]),
                UserMessage(content="Are you sure?"),
            ]
        )
    ).tokens
    assert second.model_extra["prompt_token_ids"] == expected


def test_reasoning_checkpoints_default_to_temperature_0_7(reasoning):
    client, _ = reasoning

    def sample(seed, **params):
        response = client.chat.completions.create(
            model="demo-reasoning",
            messages=QUESTION,
            max_tokens=10,
            seed=seed,
            extra_body={"return_token_ids": True},
            **params,
        )
        return response.choices[0].model_extra["token_ids"]

    seeds = (1, 2, 3)
    defaults = [sample(seed) for seed in seeds]
    assert defaults == [sample(seed, temperature=0.7) for seed in seeds]
    assert defaults != [sample(seed, temperature=0.15) for seed in seeds]

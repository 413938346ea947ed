"""/v1/completions (raw prompts), /tokenize and /detokenize, and the OpenAI paths this model cannot serve."""

import httpx
import openai
import pytest

from tests.integration.test_errors import assert_openai_error
from tests.reference import mistral_common_encoding

PROMPT = "The lighthouse keeper opened the door and"


def complete(client, service, **kwargs):
    return client.completions.create(model=service.model, **kwargs)


def test_completion_counts_and_default_length(client, service, tekken):
    response = complete(client, service, prompt=PROMPT, extra_body={"ignore_eos": True})
    assert response.object == "text_completion"
    # OpenAI's default for completions: 16 tokens.
    assert response.usage.completion_tokens == 16
    assert response.usage.prompt_tokens == len(tekken.encode(PROMPT, bos=True, eos=False))
    assert response.choices[0].finish_reason == "length"


def test_token_id_prompt_equals_the_text_prompt(client, service, tekken):
    ids = tekken.encode(PROMPT, bos=True, eos=False)
    by_text = complete(client, service, prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = complete(client, service, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_echo_with_logprobs_covers_prompt_and_completion(client, service, tekken):
    response = complete(client, service, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=3)
    choice = response.choices[0]
    assert choice.text.startswith(PROMPT)
    logprobs = choice.logprobs
    prompt_length = len(tekken.encode(PROMPT, bos=True, eos=False))
    assert len(logprobs.tokens) == prompt_length + 5
    # The first prompt token has nothing before it to be predicted from.
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(len(top) <= 3 for top in logprobs.top_logprobs[1:])
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_streamed_completion_equals_the_whole_one(client, service):
    whole = complete(client, service, prompt=PROMPT, max_tokens=10, temperature=0, echo=True)
    chunks = list(
        complete(
            client,
            service,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            echo=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, 999999999]}, "prompt"),
        ({"prompt": PROMPT, "suffix": "end"}, "suffix"),
        ({"prompt": PROMPT, "logprobs": 50}, "logprobs"),
        ({"prompt": PROMPT, "max_tokens": 4000}, "max_tokens"),
    ],
)
def test_bad_completion_requests(service, payload, param):
    response = httpx.post(
        f"{service.base_url}/v1/completions", json={"model": service.model, **payload}, timeout=60
    )
    assert_openai_error(response, 400, param, param)


def test_tokenize_a_prompt_and_a_conversation(service, tokenizer, tekken):
    raw = httpx.post(f"{service.base_url}/tokenize", json={"prompt": PROMPT}, timeout=30).json()
    assert raw["tokens"] == tekken.encode(PROMPT, bos=True, eos=False)
    assert raw["count"] == len(raw["tokens"]) and raw["max_model_len"] == service.max_model_len
    messages = [{"role": "user", "content": "Hello"}]
    chat = httpx.post(
        f"{service.base_url}/tokenize", json={"messages": messages, "return_token_strs": True}, timeout=30
    ).json()
    expected = mistral_common_encoding(tokenizer, messages, service.default_system_prompt).tokens
    assert chat["tokens"] == expected
    assert len(chat["token_strs"]) == len(expected)


def test_detokenize_round_trips(service, tekken):
    ids = tekken.encode(PROMPT, bos=False, eos=False)
    response = httpx.post(f"{service.base_url}/detokenize", json={"tokens": ids}, timeout=30)
    assert response.json() == {"prompt": PROMPT}
    bad = httpx.post(f"{service.base_url}/detokenize", json={"tokens": [1, 10**9]}, timeout=30)
    assert_openai_error(bad, 400, "tokens", "not in the vocabulary")


@pytest.mark.parametrize(
    ("path", "what"),
    [
        ("/v1/embeddings", "embeddings"),
        ("/v1/images/generations", "image generation"),
        ("/v1/audio/speech", "speech"),
        ("/v1/audio/transcriptions", "transcription"),
        ("/v1/video/generations", "video"),
        ("/v1/rerank", "reranking"),
    ],
)
def test_operations_the_model_cannot_do_are_explained(service, path, what):
    response = httpx.post(
        f"{service.base_url}{path}", json={"model": service.model, "input": "x"}, timeout=30
    )
    error = assert_openai_error(response, 400, "model", what)
    assert error["code"] == "unsupported_operation"


def test_the_openai_client_sees_a_bad_request_for_embeddings(client, service):
    with pytest.raises(openai.BadRequestError, match="does not support embeddings"):
        client.embeddings.create(model=service.model, input="hello")

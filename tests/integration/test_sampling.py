"""n, logprobs, stop, seed, logit_bias, top_k: as the OpenAI API documents them."""

import math

import pytest

from tests.integration.test_errors import USER

PROMPT = [{"role": "user", "content": "Write a few words about rivers."}]


def ask(client, service, **kwargs):
    return client.chat.completions.create(model=service.model, messages=PROMPT, **kwargs)


def test_n_returns_n_choices_and_counts_all_their_tokens(client, service):
    response = ask(
        client, service, n=3, max_tokens=6, temperature=1.0, seed=11, extra_body={"ignore_eos": True}
    )
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens == 3 * 6
    assert len({choice.message.content for choice in response.choices}) > 1
    again = ask(client, service, n=3, max_tokens=6, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]


def test_greedy_n_gives_identical_choices(client, service):
    response = ask(client, service, n=2, max_tokens=6, temperature=0)
    assert response.choices[0].message.content == response.choices[1].message.content


def test_streamed_n_choices_equal_the_whole_ones(client, service):
    arguments = dict(n=2, max_tokens=6, temperature=1.0, seed=4)
    whole = [c.message.content for c in ask(client, service, **arguments).choices]
    texts = ["", ""]
    for chunk in ask(client, service, **arguments, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == whole


def test_logprobs_bytes_spell_the_content_and_rank_the_sampled_token(client, service):
    response = ask(client, service, max_tokens=12, temperature=0, logprobs=True, top_logprobs=4)
    choice = response.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == response.usage.completion_tokens
    assert b"".join(bytes(entry.bytes) for entry in entries).decode() == choice.message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 4
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1.0 + 1e-4


def test_logprobs_without_top_logprobs_report_the_sampled_token_only(client, service):
    response = ask(client, service, max_tokens=5, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in response.choices[0].logprobs.content)
    assert all(entry.logprob <= 0 for entry in response.choices[0].logprobs.content)


def test_stop_list_ends_at_the_first_stop_string(client, service):
    full = ask(client, service, max_tokens=30, temperature=0).choices[0].message.content
    middle = full[len(full) // 3 :][:3]
    assert middle.strip(), full
    cut = ask(client, service, max_tokens=30, temperature=0, stop=["§never§", middle])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(middle)]


def test_logit_bias_steers_and_forbids_tokens(client, service):
    greedy = ask(client, service, max_tokens=5, temperature=0, extra_body={"return_token_ids": True})
    first = greedy.choices[0].model_extra["token_ids"][0]
    banned = ask(
        client,
        service,
        max_tokens=5,
        temperature=0,
        logit_bias={str(first): -100},
        extra_body={"return_token_ids": True},
    )
    assert banned.choices[0].model_extra["token_ids"][0] != first
    forced_token = 1784
    forced = ask(
        client,
        service,
        max_tokens=5,
        temperature=0,
        logit_bias={str(forced_token): 100},
        extra_body={"return_token_ids": True},
    )
    assert forced.choices[0].model_extra["token_ids"] == [forced_token] * 5


def test_top_k_one_is_greedy(client, service):
    greedy = ask(client, service, max_tokens=8, temperature=0).choices[0].message.content
    sampled = ask(
        client, service, max_tokens=8, temperature=1.5, seed=2, extra_body={"top_k": 1, "min_p": 0.0}
    )
    assert sampled.choices[0].message.content == greedy


def test_system_fingerprint_is_stable(client, service):
    first = client.chat.completions.create(model=service.model, messages=USER, max_tokens=1)
    second = client.chat.completions.create(model=service.model, messages=USER, max_tokens=1)
    assert first.system_fingerprint.startswith("fp_")
    assert first.system_fingerprint == second.system_fingerprint


def test_logit_bias_for_a_token_outside_the_vocabulary_is_a_400(client, service):
    import openai

    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        ask(client, service, max_tokens=2, logit_bias={"99999999": 5})

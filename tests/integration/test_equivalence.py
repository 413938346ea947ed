"""The service's greedy output equals the reference implementation's.

Reference: transformers' `Mistral3ForConditionalGeneration` (the monolithic
multimodal model) on the same checkpoint and the same prompt token ids.
Both run in float32 (the service via `engine.dtype`): in bfloat16, vLLM's
CPU kernels and torch's eager ops round differently, and near-ties between
the top two logits would flip greedy tokens for reasons unrelated to
correctness.
"""

import pytest
import torch
from transformers import Mistral3ForConditionalGeneration

from tests.reference import greedy_reference

MAX_NEW_TOKENS = 24

CONVERSATIONS = {
    "short": [{"role": "user", "content": "Hello there, how are you?"}],
    "system-and-turns": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain?"},
    ],
    "unicode": [{"role": "user", "content": "Ünïcödé — 東京 🚀 and numbers 12345"}],
    # Past the demo's original_max_position_embeddings (256): exercises YaRN
    # and the Llama-4 query scaling the language-model view hands to vLLM.
    "long": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 40}],
}


@pytest.fixture(scope="module")
def reference(service):
    return Mistral3ForConditionalGeneration.from_pretrained(service.checkpoint, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_greedy_tokens_equal_transformers(client, service, reference, name):
    response = client.chat.completions.create(
        model=service.model,
        messages=CONVERSATIONS[name],
        max_tokens=MAX_NEW_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    prompt_ids = response.model_extra["prompt_token_ids"]
    service_ids = response.choices[0].model_extra["token_ids"]
    if name == "long":
        assert len(prompt_ids) > 256
    reference_ids = greedy_reference(reference, prompt_ids, MAX_NEW_TOKENS)
    if response.choices[0].finish_reason == "stop":
        # Ended on the end-of-sequence token, which the reference generated too.
        reference_ids = reference_ids[: len(service_ids)]
        assert service_ids[-1] == reference.generation_config.eos_token_id
    assert service_ids == reference_ids


def test_logprobs_equal_the_reference_log_softmax(client, service, reference, tekken):
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    response = client.chat.completions.create(
        model=service.model,
        messages=CONVERSATIONS["short"],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"return_token_ids": True},
    )
    prompt_ids = response.model_extra["prompt_token_ids"]
    generated = response.choices[0].model_extra["token_ids"]
    for position, entry in enumerate(response.choices[0].logprobs.content):
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([prompt_ids + generated[:position]])).logits[0, -1]
        top = logits.log_softmax(-1).topk(5)
        expected_bytes = [
            list(tekken.id_to_byte_piece(i, SpecialTokenPolicy.KEEP)) for i in top.indices.tolist()
        ]
        assert [t.bytes for t in entry.top_logprobs] == expected_bytes
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)

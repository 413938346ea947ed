"""The demo checkpoint: published layout, real architecture, deterministic, peaked."""

import hashlib
import json

import pytest
import torch
from mistral_common.protocol.instruct.messages import ImageChunk, TextChunk, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, Mistral3ForConditionalGeneration

from serve.demo_checkpoint import write_demo_checkpoint


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_files_of_the_published_layout(demo_checkpoint):
    names = {p.name for p in demo_checkpoint.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tekken.json",
        "SYSTEM_PROMPT.txt",
    } <= names
    config = json.loads((demo_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "ministral3"
    assert config["vision_config"]["model_type"] == "pixtral"
    assert "random weights" in (demo_checkpoint / "README.md").read_text()
    assert "{today}" in (demo_checkpoint / "SYSTEM_PROMPT.txt").read_text()


def test_weight_names_follow_the_hf_multimodal_layout(demo_checkpoint):
    with safe_open(demo_checkpoint / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    # transformers 5 writes Mistral 3 checkpoints in the original layout
    # (`language_model.model.*`), as the published ones are.
    assert "language_model.model.embed_tokens.weight" in keys
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in keys
    assert any(k.startswith("vision_tower.") for k in keys)
    assert any(k.startswith("multi_modal_projector.") for k in keys)
    # Like the published 3B, the output head is tied to the embeddings.
    assert not any(k.endswith("lm_head.weight") for k in keys)


def test_deterministic_from_seed(demo_checkpoint, tmp_path):
    again = write_demo_checkpoint(tmp_path / "again", seed=0)
    other = write_demo_checkpoint(tmp_path / "other", seed=1)
    assert _digest(again) == _digest(demo_checkpoint)
    assert _digest(other) != _digest(demo_checkpoint)


def test_tokenizer_is_tekken_with_ministral3_image_settings(demo_checkpoint):
    tokenizer = MistralTokenizer.from_file(str(demo_checkpoint / "tekken.json"))
    inner = tokenizer.instruct_tokenizer.tokenizer
    for token in ("[THINK]", "[/THINK]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"):
        assert inner.get_special_token(token) >= 0
    image = Image.new("RGB", (100, 60), (200, 10, 10))
    request = ChatCompletionRequest(
        messages=[UserMessage(content=[ImageChunk(image=image), TextChunk(text="?")])]
    )
    tokens = tokenizer.encode_chat_completion(request).tokens
    img, brk, end = (inner.get_special_token(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"))
    # Patch 14 and spatial merge 2: 100x60 px -> 4 columns x 3 rows of image tokens.
    assert tokens.count(img) == 12
    assert tokens.count(brk) == 2
    assert tokens.count(end) == 1


@pytest.fixture(scope="module")
def reference_model(demo_checkpoint):
    return Mistral3ForConditionalGeneration.from_pretrained(demo_checkpoint, dtype=torch.float32).eval()


def test_loads_as_mistral3_with_ministral3_text_model(demo_checkpoint, reference_model):
    config = AutoConfig.from_pretrained(demo_checkpoint)
    assert type(config.text_config).__name__ == "Ministral3Config"
    assert type(reference_model.model.language_model).__name__ == "Ministral3Model"


def test_next_token_distribution_is_peaked(demo_checkpoint, reference_model):
    tokenizer = MistralTokenizer.from_file(str(demo_checkpoint / "tekken.json"))
    ids = tokenizer.encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content="Tell me about the sea, the wind and the sky.")])
    ).tokens
    with torch.no_grad():
        logits = reference_model(input_ids=torch.tensor([ids])).logits[0]
    top_probability = logits.softmax(-1).max(-1).values
    # Random weights at the default scale give ~1/131072 everywhere.
    assert top_probability.mean() > 0.5
    # ...and the model does not merely echo its input token.
    assert (logits.argmax(-1) == torch.tensor(ids)).float().mean() < 0.5

"""The vision encoder equals transformers' monolithic model; the cache keeps its budget;
the decoder's mixed prompt puts the image rows where the [IMG] tokens are."""

import numpy as np
import pytest
import torch
from transformers import Mistral3ForConditionalGeneration

from deployments import encoder as encoder_module
from deployments.decoder import engine_prompt
from deployments.encoder import EmbeddingCache, VisionEncoder
from serve.checkpoint import Checkpoint
from serve.config import AppConfig
from serve.messages import ImageTokenEmbeddings


def pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, height, width), dtype=np.float32)


@pytest.fixture(scope="module")
def encoder(demo_checkpoint):
    return VisionEncoder(Checkpoint.open(demo_checkpoint), dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(demo_checkpoint):
    return Mistral3ForConditionalGeneration.from_pretrained(demo_checkpoint, dtype=torch.float32).eval()


def reference_features(reference, images):
    """What the monolithic model computes for the same images in one batch."""
    height = max(i.shape[1] for i in images)
    width = max(i.shape[2] for i in images)
    batch = torch.zeros(len(images), 3, height, width)
    for n, image in enumerate(images):
        batch[n, :, : image.shape[1], : image.shape[2]] = torch.from_numpy(image)
    sizes = torch.tensor([i.shape[1:] for i in images])
    with torch.no_grad():
        return reference.model.get_image_features(pixel_values=batch, image_sizes=sizes).pooler_output


def test_one_image_equals_the_monolithic_model(encoder, reference):
    image = pixels(56, 84, seed=0)
    (ours,) = encoder.encode([image])
    (theirs,) = reference_features(reference, [image])
    # 56x84 px = 2x3 tiles of 28 px: 6 [IMG] tokens, each of the text hidden size.
    assert ours.shape == (6, reference.config.text_config.hidden_size)
    assert torch.equal(ours, theirs)


def test_a_batch_of_different_sizes_equals_the_monolithic_model(encoder, reference):
    images = [pixels(28, 28, 1), pixels(112, 56, 2), pixels(56, 140, 3)]
    ours = encoder.encode(images)
    theirs = reference_features(reference, images)
    assert [o.shape[0] for o in ours] == [1, 8, 10]
    for o, t in zip(ours, theirs, strict=True):
        assert torch.equal(o, t)


def test_batching_does_not_change_an_image_embedding(encoder):
    images = [pixels(84, 84, 4), pixels(28, 196, 5)]
    together = encoder.encode(images)
    alone = [encoder.encode([image])[0] for image in images]
    for t, a in zip(together, alone, strict=True):
        torch.testing.assert_close(t, a, rtol=1e-5, atol=1e-5)


def test_only_vision_weights_are_loaded(encoder):
    names = {name.split(".")[0] for name, _ in encoder.model.named_parameters()}
    assert names == {"vision_tower", "multi_modal_projector"}


def tensor(num_bytes: int) -> torch.Tensor:
    return torch.zeros(num_bytes // 4, dtype=torch.float32)


def test_cache_evicts_least_recently_used_within_its_budget():
    cache = EmbeddingCache(max_bytes=1000)
    cache.put("a", tensor(400))
    cache.put("b", tensor(400))
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("c", tensor(400))
    assert cache.keys() == ["a", "c"]
    assert cache.bytes == 800 <= cache.max_bytes


def test_cache_skips_entries_larger_than_its_budget():
    cache = EmbeddingCache(max_bytes=1000)
    cache.put("a", tensor(400))
    cache.put("huge", tensor(2000))
    assert cache.keys() == ["a"] and cache.bytes == 400
    assert EmbeddingCache(max_bytes=0).get("a") is None


def test_mixed_prompt_puts_image_rows_at_the_image_tokens():
    image_token = 10
    token_ids = [1, 5, image_token, image_token, 12, image_token, 2]
    rows = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4)
    prompt = engine_prompt(token_ids, ImageTokenEmbeddings(rows), image_token, torch.bfloat16)
    assert prompt["prompt_token_ids"] == token_ids
    assert prompt["prompt_is_token_ids"] == [True, True, False, False, True, False, True]
    embeds = prompt["prompt_embeds"]
    assert embeds.shape == (7, 4) and embeds.dtype == torch.bfloat16
    assert torch.equal(embeds[[2, 3, 5]], rows.to(torch.bfloat16))
    assert not embeds[[0, 1, 4, 6]].any()


def test_mixed_prompt_refuses_a_count_mismatch():
    with pytest.raises(ValueError, match="2 \\[IMG\\] tokens but the encoder returned 3"):
        engine_prompt([10, 10], ImageTokenEmbeddings(torch.zeros(3, 4)), 10, torch.float32)


def test_text_prompt_is_token_ids_only():
    assert engine_prompt([1, 2, 3], None, 10, torch.float32) == {"prompt_token_ids": [1, 2, 3]}


class StandInVision:
    """The vision encoder as the Encoder builds it, without weights: records where it was put."""

    def __init__(self, checkpoint, *, dtype, device="cpu"):
        self.dtype, self.device = dtype, device


@pytest.mark.parametrize(
    ("cuda", "num_gpus", "held_to", "device"),
    [
        (True, 0.1, [0.1], "cuda"),
        (True, 0.3, [0.3], "cuda"),
        (True, 1, [], "cuda"),
        (True, 0, [], "cpu"),
        (False, 0.1, [], "cpu"),
    ],
)
def test_an_encoder_on_a_share_of_a_gpu_holds_itself_to_that_share(
    monkeypatch, cuda, num_gpus, held_to, device
):
    fractions = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, *a, **k: fractions.append(f))
    monkeypatch.setattr(encoder_module, "open_checkpoint", lambda model, weights: object())
    monkeypatch.setattr(encoder_module, "resolve_dtype", lambda dtype, checkpoint: torch.float32)
    monkeypatch.setattr(encoder_module, "VisionEncoder", StandInVision)
    config = AppConfig.model_validate({"deployments": {"encoder": {"num_gpus": num_gpus}}})
    # The class under Serve's deployment: constructed as a replica would, without Ray.
    replica = encoder_module.Encoder.func_or_class(config)
    assert fractions == held_to
    assert replica._vision.device == device

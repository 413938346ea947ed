"""Encoder stage: images -> image-token embeddings (Pixtral tower + patch merger + projector).

`VisionEncoder` is transformers' own vision half of `Mistral3Model` (the
same modules and the same `get_image_features`), loaded with only the
`vision_tower.*` and `multi_modal_projector.*` weights of the checkpoint.
`EmbeddingCache` is an LRU of its outputs by image content hash, bounded in
bytes. `Encoder` is the Ray Serve deployment: it batches images across
concurrent requests, encodes each distinct image once, and answers repeats
from the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict

import numpy as np
import torch
from ray import serve
from safetensors import safe_open

from autoscaling import policies
from deployments.routing import HELD_IMAGE_PREFIX_CHARS, ThroughputWindow
from serve.byte_budget_lru import ByteBudgetLru
from serve.checkpoint import Checkpoint, open_checkpoint, resolve_dtype
from serve.config import AppConfig
from serve.messages import EncoderLoad, ImageForEncoder, ImageTokenEmbeddings, PreprocessedRequest
from serve.metrics import (
    ENCODER_BATCH_SIZE,
    ENCODER_CACHE_BYTES,
    ENCODER_CACHE_HITS,
    ENCODER_CACHE_MISSES,
    ENCODER_IMAGES_ENCODED,
    ENCODER_SECONDS,
    LiveGauge,
    ray_metric,
)

logger = logging.getLogger(__name__)

# Both weight-name layouts of published Mistral 3 checkpoints.
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
_NESTED_PREFIX = "model."
# The most recently used cache entries reported to the router (a few KB of stats).
HELD_IMAGES_REPORTED = 256


def _vision_stack_class():
    from transformers import AutoModel
    from transformers.models.mistral3.modeling_mistral3 import (
        Mistral3Model,
        Mistral3MultiModalProjector,
    )

    class VisionStack(torch.nn.Module):
        """The attributes of `Mistral3Model` that its `get_image_features` reads, and nothing else."""

        def __init__(self, config):
            super().__init__()
            self.config = config
            self.vision_tower = AutoModel.from_config(config.vision_config)
            self.multi_modal_projector = Mistral3MultiModalProjector(config)

        get_image_features = Mistral3Model.get_image_features

    return VisionStack


def vision_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The vision tower and projector weights, named as `VisionStack` names them."""
    weights = {}
    for shard in checkpoint.weight_files():
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                short = name.removeprefix(_NESTED_PREFIX)
                if short.startswith(_VISION_PREFIXES):
                    weights[short] = f.get_tensor(name)
    return weights


class VisionEncoder:
    """Pixel arrays -> one embedding per [IMG] token, in the language model's hidden size."""

    def __init__(self, checkpoint: Checkpoint, *, dtype: torch.dtype, device: str = "cpu"):
        from transformers import Mistral3Config

        config = Mistral3Config.from_pretrained(checkpoint.path)
        self.dtype = dtype
        self.device = torch.device(device)
        stack = _vision_stack_class()(config)
        stack.load_state_dict(vision_state_dict(checkpoint), strict=True)
        self.model = stack.to(device=self.device, dtype=dtype).eval()
        self.tokens_per_side = config.vision_config.patch_size * config.spatial_merge_size

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """Encode images (each float32 [3, height, width]) in one forward pass.

        Returns one tensor per image, [height/28 * width/28, text_hidden_size]
        (28 = patch 14 x spatial merge 2), on the CPU.
        """
        max_height = max(image.shape[1] for image in images)
        max_width = max(image.shape[2] for image in images)
        # Padded to one batch; the tower crops each image back to its own size
        # and attends within each image only (block-diagonal mask).
        batch = np.zeros((len(images), 3, max_height, max_width), dtype=np.float32)
        for i, image in enumerate(images):
            batch[i, :, : image.shape[1], : image.shape[2]] = image
        pixel_values = torch.from_numpy(batch).to(device=self.device, dtype=self.dtype)
        image_sizes = torch.tensor([image.shape[1:] for image in images], device=self.device)
        features = self.model.get_image_features(
            pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True
        ).pooler_output
        return [feature.to("cpu") for feature in features]


class EmbeddingCache(ByteBudgetLru[torch.Tensor]):
    """LRU of image-token embeddings by image content hash, within a byte budget."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes, size_of=lambda embedding: embedding.numel() * embedding.element_size())


class EncoderMetrics:
    """The encoder stage's metrics (serve/metrics.py catalogues them)."""

    def __init__(self, cache: EmbeddingCache):
        self.images_encoded = ray_metric(ENCODER_IMAGES_ENCODED)
        self.batch_size = ray_metric(ENCODER_BATCH_SIZE)
        self.seconds = ray_metric(ENCODER_SECONDS)
        self.cache_hits = ray_metric(ENCODER_CACHE_HITS)
        self.cache_misses = ray_metric(ENCODER_CACHE_MISSES)
        self.cache_bytes = LiveGauge(ENCODER_CACHE_BYTES, read=lambda: cache.bytes)


@serve.deployment(name="Encoder")
class Encoder:
    def __init__(self, config: AppConfig):
        checkpoint = open_checkpoint(config.model, weights=True)
        gpu_share = config.deployments.encoder.num_gpus
        device = "cuda" if torch.cuda.is_available() and gpu_share > 0 else "cpu"
        if device == "cuda" and gpu_share < 1:
            # On a GPU shared with the decoder, stay within this replica's share.
            torch.cuda.set_per_process_memory_fraction(gpu_share)
        self._vision = VisionEncoder(
            checkpoint, dtype=resolve_dtype(config.engine.dtype, checkpoint), device=device
        )
        self._cache = EmbeddingCache(config.encoder.cache_bytes)
        # One encoding per image even when several requests bring it at once.
        self._in_flight: dict[str, asyncio.Future[torch.Tensor]] = {}
        self._encode_batch.set_max_batch_size(config.encoder.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(config.encoder.batch_wait_timeout_s)
        self._metrics = EncoderMetrics(self._cache)
        self._pending_images = 0
        self._speed = ThroughputWindow()
        logger.info(
            "encoder ready on %s (%s), cache %d bytes", device, self._vision.dtype, self._cache.max_bytes
        )

    async def check_health(self) -> None:
        """Serve's periodic check, and the ingress's /health probe: answering is the check."""

    async def encode(
        self, prompt: PreprocessedRequest, image_hashes: tuple[str, ...] = ()
    ) -> ImageTokenEmbeddings:
        """`image_hashes` (the images' content hashes) is for the encoder router, which reads
        it before the request gets here: `prompt` is still a reference there."""
        self._pending_images += len(prompt.images)
        try:
            encoded = await asyncio.gather(*(self._embedding(image) for image in prompt.images))
        finally:
            self._pending_images -= len(prompt.images)
        return ImageTokenEmbeddings(
            embeddings=torch.cat([embedding for embedding, _ in encoded]),
            encoder_seconds=sum(seconds for _, seconds in encoded),
        )

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The encoder's autoscaling signal (autoscaling/policies.py)."""
        return {policies.PENDING_IMAGES: self._pending_images}

    def record_routing_stats(self) -> dict:
        """Polled by Serve's controller (routing.stats_period_s) for the encoder router."""
        held = self._cache.keys()[-HELD_IMAGES_REPORTED:]
        return asdict(
            EncoderLoad(
                measured_at=time.time(),
                pending_images=self._pending_images,
                images_per_s=self._speed.rate(),
                held_images=tuple(key[:HELD_IMAGE_PREFIX_CHARS] for key in held),
            )
        )

    async def _embedding(self, image: ImageForEncoder) -> tuple[torch.Tensor, float]:
        """The image's embedding, and the encoder seconds it cost this request (none when
        cached, or when another request is encoding it: that one is charged)."""
        key = image.content_hash
        cached = self._cache.get(key)
        if cached is None and key in self._in_flight:
            cached, _ = await asyncio.shield(self._in_flight[key])
        if cached is not None:
            self._metrics.cache_hits.inc()
            return cached, 0.0
        self._metrics.cache_misses.inc()
        future = asyncio.ensure_future(self._encode_new(image))
        self._in_flight[key] = future
        future.add_done_callback(lambda _: self._in_flight.pop(key, None))
        # Shielded: a cancelled request does not cancel the work others wait on.
        return await asyncio.shield(future)

    async def _encode_new(self, image: ImageForEncoder) -> tuple[torch.Tensor, float]:
        embedding, seconds = await self._encode_batch(image.pixels)
        self._cache.put(image.content_hash, embedding)
        self._metrics.cache_bytes.update()
        return embedding, seconds

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, batch: list[np.ndarray]) -> Iterable[tuple[torch.Tensor, float]]:
        started = time.perf_counter()
        # The forward pass runs in a thread so the replica keeps taking requests.
        embeddings = await asyncio.to_thread(self._vision.encode, batch)
        seconds = time.perf_counter() - started
        self._speed.add(time.time(), seconds, len(batch))
        self._metrics.seconds.observe(seconds)
        self._metrics.batch_size.observe(len(batch))
        self._metrics.images_encoded.inc(len(batch))
        return [(embedding, seconds / len(batch)) for embedding in embeddings]

"""The preprocess stage's cache of preprocessed images: a repeated image is prepared once, and what
comes out is still mistral_common's own encoding of the conversation."""

import asyncio
import datetime as dt
import threading
import time

import numpy as np
import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from deployments import preprocess as preprocess_module
from deployments.preprocess import ImageLoader, ImagePreprocessor
from serve.chat_template import ChatTemplate
from serve.checkpoint import Checkpoint
from serve.config import ImagesConfig
from serve.errors import BadRequest
from serve.protocol.chat import ChatMessage
from tests.image_server import data_url, image_bytes
from tests.reference import mistral_common_encoding

TODAY = dt.date(2026, 3, 1)
PICTURE = image_bytes((100, 60), color=(255, 0, 0))
OTHER_PICTURE = image_bytes((300, 200), color=(0, 0, 255))
# The first picture again, written into other bytes.
PICTURE_UNCOMPRESSED = image_bytes((100, 60), color=(255, 0, 0), compress_level=0)


def image_part(data: bytes) -> dict:
    return image_url_part(data_url(data))


def image_url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def turn(*parts: dict) -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": "And now?"}]}


@pytest.fixture(scope="module")
def template(demo_checkpoint):
    return ChatTemplate(Checkpoint.open(demo_checkpoint), today=lambda: TODAY)


@pytest.fixture(scope="module")
def reference_tokenizer(demo_checkpoint):
    return MistralTokenizer.from_file(str(demo_checkpoint / "tekken.json"))


class CountedPreprocessor:
    """An `ImagePreprocessor` and the cache hits it reported, per conversation."""

    def __init__(self, template: ChatTemplate, cache_bytes: int):
        self.hits: list[int] = []
        self._reported = 0
        self._preprocessor = ImagePreprocessor(
            template, ImagesConfig(), cache_bytes, count_cache_hits=self._count
        )

    def _count(self, hits: int) -> None:
        self._reported += hits

    def __call__(self, raw_messages: list[dict]):
        self._reported = 0
        messages = [ChatMessage.model_validate(m) for m in raw_messages]
        preprocessed = asyncio.run(self._preprocessor.preprocess(messages))
        self.hits.append(self._reported)
        return preprocessed


def test_a_repeated_image_is_prepared_once_and_the_prompt_is_still_mistral_commons(
    template, reference_tokenizer
):
    preprocess = CountedPreprocessor(template, cache_bytes=64 * 1024**2)
    first_turn = [turn(image_part(PICTURE))]
    first = preprocess(first_turn)
    # The chat goes on: the client sends the whole conversation again, with a second picture.
    conversation = [
        *first_turn,
        {"role": "assistant", "content": "A red block."},
        turn(image_part(OTHER_PICTURE), image_part(PICTURE)),
    ]
    second = preprocess(conversation)
    assert preprocess.hits == [0, 2]
    # The same prepared array, not a second decoding of the same bytes.
    assert second.images[0].pixels is first.images[0].pixels
    assert second.images[2].pixels is first.images[0].pixels
    expected = mistral_common_encoding(reference_tokenizer, conversation, template.default_system_prompt())
    assert second.prompt_token_ids == expected.tokens
    assert len(second.images) == len(expected.images) == 3
    for image, reference in zip(second.images, expected.images, strict=True):
        assert np.array_equal(image.pixels, reference)
    hashes = [image.content_hash for image in second.images]
    assert hashes[0] == hashes[2] != hashes[1]


def test_the_same_picture_in_other_bytes_is_prepared_again_to_the_same_encoder_input(template):
    preprocess = CountedPreprocessor(template, cache_bytes=64 * 1024**2)
    first = preprocess([turn(image_part(PICTURE))])
    again = preprocess([turn(image_part(PICTURE_UNCOMPRESSED))])
    assert preprocess.hits == [0, 0]
    assert again.images[0].pixels is not first.images[0].pixels
    # The encoder's cache still sees one image.
    assert again.images[0].content_hash == first.images[0].content_hash


def test_the_cache_keeps_within_its_byte_budget(template):
    one_image_bytes = CountedPreprocessor(template, 0)([turn(image_part(PICTURE))]).images[0].pixels.nbytes
    preprocess = CountedPreprocessor(template, cache_bytes=one_image_bytes)
    for data in (PICTURE, PICTURE, OTHER_PICTURE, PICTURE):
        preprocess([turn(image_part(data))])
    # The other, larger picture does not fit: the first one stays.
    assert preprocess.hits == [0, 1, 0, 1]
    disabled = CountedPreprocessor(template, cache_bytes=0)
    for _ in range(2):
        disabled([turn(image_part(PICTURE))])
    assert disabled.hits == [0, 0]


def test_a_bad_image_is_a_400_naming_its_part_each_time(template):
    preprocess = CountedPreprocessor(template, cache_bytes=64 * 1024**2)
    conversation = [turn(image_part(PICTURE), image_part(b"not an image at all"))]
    for _ in range(2):
        with pytest.raises(BadRequest) as caught:
            preprocess(conversation)
        assert caught.value.param == "messages[0].content[1].image_url"
        assert caught.value.code == "invalid_image"


def test_when_one_image_fails_the_other_fetches_are_cancelled_and_free_their_slots(image_server):
    limits = ImagesConfig(allow_private_networks=True, allowed_ports=[], max_concurrent_fetches=4)
    slow = [image_server.url(f"slow/3?{i}") for i in range(3)]
    messages = [
        ChatMessage.model_validate(
            turn(*(image_url_part(url) for url in [*slow, image_server.url("status/404")]))
        )
    ]

    async def run():
        loader = ImageLoader(limits)
        started = time.monotonic()
        with pytest.raises(BadRequest, match=r"messages\[0\]\.content\[3\]"):
            await loader.load(messages)
        # Every slot is free at once: no fetch of the failed request still holds one.
        async with asyncio.timeout(0.1):
            for _ in range(limits.max_concurrent_fetches):
                await loader.fetch_slots.acquire()
        return time.monotonic() - started

    assert asyncio.run(run()) < 2.0


@pytest.mark.parametrize("decode_workers", [1, 3])
def test_at_most_decode_workers_images_are_decoded_at_once(template, monkeypatch, decode_workers):
    decoding = most_decoding = 0
    count_lock = threading.Lock()
    decode_upright = preprocess_module.decode_upright

    def slow_decode(*args):
        nonlocal decoding, most_decoding
        with count_lock:
            decoding += 1
            most_decoding = max(most_decoding, decoding)
        time.sleep(0.2)
        with count_lock:
            decoding -= 1
        return decode_upright(*args)

    monkeypatch.setattr(preprocess_module, "decode_upright", slow_decode)
    preprocessor = ImagePreprocessor(template, ImagesConfig(decode_workers=decode_workers), cache_bytes=0)
    conversations = [
        [ChatMessage.model_validate(turn(image_part(image_bytes((20 + i, 20)))))] for i in range(6)
    ]

    async def run():
        await asyncio.gather(*(preprocessor.preprocess(messages) for messages in conversations))

    asyncio.run(run())
    assert most_decoding == decode_workers

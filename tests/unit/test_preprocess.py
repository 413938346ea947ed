"""The preprocess stage's cache of preprocessed images: a repeated image is prepared once, and what
comes out is still mistral_common's own encoding of the conversation."""

import asyncio
import datetime as dt

import numpy as np
import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from deployments.preprocess import ImagePreprocessor
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
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


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

"""Chat templating equals mistral_common's own encoding of the same conversation."""

import asyncio
import datetime as dt

import numpy as np
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from deployments.preprocess import ImagePreprocessor
from serve.chat_template import ChatTemplate
from serve.checkpoint import Checkpoint
from serve.config import AppConfig, ImagesConfig
from serve.errors import BadRequest
from serve.messages import PreprocessedRequest
from serve.protocol.chat import ChatMessage
from tests.image_server import data_url, image_bytes
from tests.reference import mistral_common_encoding

TODAY = dt.date(2026, 3, 1)


@pytest.fixture(scope="module")
def reference_tokenizer(demo_checkpoint):
    return MistralTokenizer.from_file(str(demo_checkpoint / "tekken.json"))


@pytest.fixture(scope="module")
def preprocessor(demo_checkpoint):
    return ChatTemplate(Checkpoint.open(demo_checkpoint), today=lambda: TODAY)


def reference_ids(tokenizer, messages):
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def test_default_system_prompt_has_dates_filled(preprocessor, reference_tokenizer, demo_checkpoint):
    expected_prompt = (
        (demo_checkpoint / "SYSTEM_PROMPT.txt")
        .read_text()
        .replace("{today}", "2026-03-01")
        .replace("{yesterday}", "2026-02-28")
    )
    assert "2026-02-28" in expected_prompt
    ids = preprocessor.encode_chat([ChatMessage(role="user", content="Hi")]).prompt_token_ids
    assert ids == reference_ids(
        reference_tokenizer, [SystemMessage(content=expected_prompt), UserMessage(content="Hi")]
    )


def test_client_system_message_replaces_the_default(preprocessor, reference_tokenizer):
    messages = [
        ChatMessage(role="system", content="Be terse."),
        ChatMessage(
            role="user", content=[{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
        ),
        ChatMessage(role="assistant", content="Hello."),
        ChatMessage(role="user", content="Again"),
    ]
    ids = preprocessor.encode_chat(messages).prompt_token_ids
    assert ids == reference_ids(
        reference_tokenizer,
        [
            SystemMessage(content="Be terse."),
            UserMessage(content="Hi there"),
            AssistantMessage(content="Hello."),
            UserMessage(content="Again"),
        ],
    )


def test_the_configured_date_pins_the_default_prompt_and_none_follows_the_clock(demo_checkpoint):
    checkpoint = Checkpoint.open(demo_checkpoint)
    pinned = ChatTemplate.from_config(checkpoint, AppConfig(system_prompt_date="2026-03-01"))
    assert "2026-03-01" in pinned.default_system_prompt()
    assert "2026-02-28" in pinned.default_system_prompt()
    before = dt.date.today()
    current = ChatTemplate.from_config(checkpoint, AppConfig()).default_system_prompt()
    after = dt.date.today()
    assert current in {checkpoint.system_prompt(before), checkpoint.system_prompt(after)}


def test_no_default_system_prompt_when_disabled(demo_checkpoint, reference_tokenizer):
    preprocessor = ChatTemplate(Checkpoint.open(demo_checkpoint), use_default_system_prompt=False)
    ids = preprocessor.encode_chat([ChatMessage(role="user", content="Hi")]).prompt_token_ids
    assert ids == reference_ids(reference_tokenizer, [UserMessage(content="Hi")])


def test_conversation_ending_with_assistant_is_a_400(preprocessor):
    with pytest.raises(BadRequest) as caught:
        preprocessor.encode_chat(
            [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Yo")]
        )
    assert caught.value.param == "messages"


def test_unsupported_content_part_names_the_message(preprocessor):
    message = ChatMessage(role="user", content=[{"type": "input_audio", "input_audio": {}}])
    with pytest.raises(BadRequest) as caught:
        preprocessor.encode_chat([message])
    assert caught.value.param == "messages[0].content"


# Images: tiny, wide, tall, larger than the 1540 px longest edge, and ordinary.
IMAGE_SIZES = {"tiny": (5, 3), "wide": (600, 40), "tall": (30, 500), "huge": (2000, 1200), "plain": (100, 60)}


def image_part(name: str, fmt: str = "PNG", **save_args) -> dict:
    data = image_bytes(IMAGE_SIZES[name], fmt=fmt, color=(255, 0, 0), **save_args)
    return {"type": "image_url", "image_url": {"url": data_url(data, f"image/{fmt.lower()}")}}


def ours(preprocessor, raw_messages) -> PreprocessedRequest:
    """The preprocess stage's work, without its cache: every image decoded and resized here."""
    messages = [ChatMessage.model_validate(m) for m in raw_messages]
    return asyncio.run(ImagePreprocessor(preprocessor, ImagesConfig(), cache_bytes=0).preprocess(messages))


@pytest.mark.parametrize(
    "raw_messages",
    [
        [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image_part("plain")]}],
        [{"role": "user", "content": [image_part(name) for name in IMAGE_SIZES]}],
        [
            {"role": "user", "content": [image_part("wide", "JPEG"), {"type": "text", "text": "And this?"}]},
            {"role": "assistant", "content": "A stripe."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Now"}, image_part("tall"), image_part("huge")],
            },
        ],
    ],
    ids=["one-image", "five-sizes", "images-in-earlier-turns"],
)
def test_image_prompts_equal_mistral_common(preprocessor, reference_tokenizer, demo_checkpoint, raw_messages):
    system_prompt = preprocessor.default_system_prompt()
    tokenized = ours(preprocessor, raw_messages)
    expected = mistral_common_encoding(reference_tokenizer, raw_messages, system_prompt)
    assert tokenized.prompt_token_ids == expected.tokens
    assert len(tokenized.images) == len(expected.images)
    for image, reference in zip(tokenized.images, expected.images, strict=True):
        assert image.pixels.shape == reference.shape == (3, image.height, image.width)
        assert image.pixels.dtype == np.float32
        assert np.array_equal(image.pixels, reference)
    # Every image fits the 1540 px limit, in whole 28 px (patch x merge) tiles.
    for image in tokenized.images:
        assert max(image.pixels.shape[1:]) <= 1540 + 27
        assert image.pixels.shape[1] % 28 == 0 and image.pixels.shape[2] % 28 == 0


def test_image_tokens_follow_the_tile_grid(preprocessor):
    tokenized = ours(preprocessor, [{"role": "user", "content": [image_part("plain")]}])
    img = preprocessor.image_token_id
    # 100x60 px with 28 px tiles: 4 columns x 3 rows of [IMG].
    assert tokenized.prompt_token_ids.count(img) == 12


def test_content_hash_identifies_the_pixels(preprocessor):
    first = ours(preprocessor, [{"role": "user", "content": [image_part("plain"), image_part("wide")]}])
    again = ours(preprocessor, [{"role": "user", "content": [image_part("plain", compress_level=0)]}])
    plain, wide = (image.content_hash for image in first.images)
    assert plain != wide
    # The same picture encoded into other bytes is the same encoder input.
    assert again.images[0].content_hash == plain


def test_images_outside_user_messages_are_refused(preprocessor):
    messages = [
        ChatMessage(role="user", content="Hi"),
        ChatMessage.model_validate({"role": "assistant", "content": [image_part("tiny")]}),
        ChatMessage(role="user", content="Again"),
    ]
    with pytest.raises(BadRequest) as caught:
        preprocessor.encode_chat(messages)
    assert caught.value.param == "messages[1].content"
    assert "user messages only" in caught.value.message

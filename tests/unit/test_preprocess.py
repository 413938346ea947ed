"""Chat templating equals mistral_common's own encoding of the same conversation."""

import datetime as dt

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from deployments.checkpoint import Checkpoint
from deployments.preprocess import ChatPreprocessor
from serve.errors import BadRequest
from serve.protocol import ChatMessage

TODAY = dt.date(2026, 3, 1)


@pytest.fixture(scope="module")
def reference_tokenizer(demo_checkpoint):
    return MistralTokenizer.from_file(str(demo_checkpoint / "tekken.json"))


@pytest.fixture(scope="module")
def preprocessor(demo_checkpoint):
    return ChatPreprocessor(Checkpoint.open(demo_checkpoint), today=lambda: TODAY)


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


def test_no_default_system_prompt_when_disabled(demo_checkpoint, reference_tokenizer):
    preprocessor = ChatPreprocessor(Checkpoint.open(demo_checkpoint), use_default_system_prompt=False)
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

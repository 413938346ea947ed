"""Preprocess stage: OpenAI messages -> the token sequence the model was trained on.

Chat templating is mistral_common's (the tokenizer and message format Mistral
trains with), never a hand-written template. For text-only conversations this
runs inside the ingress process: a separate deployment would add a network
hop and a serialisation to every request for microseconds of work.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralChatRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from deployments.checkpoint import Checkpoint
from deployments.messages import PreprocessedRequest
from serve.errors import BadRequest
from serve.protocol import ChatMessage


class ChatPreprocessor:
    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        use_default_system_prompt: bool = True,
        today: Callable[[], dt.date] = dt.date.today,
    ):
        self.checkpoint = checkpoint
        self.tokenizer = MistralTokenizer.from_file(str(checkpoint.tokenizer_file), mode=ValidationMode.test)
        self._use_default_system_prompt = use_default_system_prompt
        self._today = today

    def default_system_prompt(self) -> str | None:
        if not self._use_default_system_prompt:
            return None
        return self.checkpoint.system_prompt(self._today())

    def encode_chat(self, messages: list[ChatMessage]) -> PreprocessedRequest:
        """Render and tokenize a conversation; client mistakes raise BadRequest."""
        mistral_messages = [_to_mistral_message(i, m) for i, m in enumerate(messages)]
        if not any(isinstance(m, SystemMessage) for m in mistral_messages):
            system_prompt = self.default_system_prompt()
            if system_prompt:
                mistral_messages.insert(0, SystemMessage(content=system_prompt))
        try:
            tokenized = self.tokenizer.encode_chat_completion(MistralChatRequest(messages=mistral_messages))
        except (MistralCommonException, ValueError) as e:
            raise BadRequest(f"messages: {e}", param="messages") from e
        return PreprocessedRequest(prompt_token_ids=list(tokenized.tokens))


def _to_mistral_message(index: int, message: ChatMessage):
    param = f"messages[{index}].content"
    try:
        text = message.text()
    except ValueError as e:
        raise BadRequest(f"{param}: {e}", param=param) from e
    if message.role in ("system", "developer"):
        return SystemMessage(content=text)
    if message.role == "user":
        return UserMessage(content=text)
    if message.role == "assistant":
        return AssistantMessage(content=text)
    raise BadRequest(
        f"messages[{index}].role: role {message.role!r} is not supported yet "
        "(tool messages come with tool calling)",
        param=f"messages[{index}].role",
    )

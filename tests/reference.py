"""The references the service is checked against, written by others: mistral_common and transformers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import torch
from mistral_common.protocol.instruct.chunk import ImageURLChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest


def checkpoint_system_prompt(checkpoint: Path, today: dt.date) -> str:
    """SYSTEM_PROMPT.txt with its dates filled, as the model card says to use it."""
    return (
        (checkpoint / "SYSTEM_PROMPT.txt")
        .read_text()
        .replace("{today}", today.isoformat())
        .replace("{yesterday}", (today - dt.timedelta(days=1)).isoformat())
    )


def mistral_common_encoding(tokenizer, openai_messages: list[dict], system_prompt: str | None):
    """mistral_common alone on an OpenAI-style conversation: its own image decoding and resizing."""

    def content(value):
        if isinstance(value, str):
            return value
        return [
            TextChunk(text=part["text"])
            if part["type"] == "text"
            else ImageURLChunk(image_url=part["image_url"]["url"])
            for part in value
        ]

    roles = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    messages = [SystemMessage(content=system_prompt)] if system_prompt else []
    messages += [roles[m["role"]](content=content(m["content"])) for m in openai_messages]
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages))


def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int, images: list[np.ndarray] = ()):
    """Greedy tokens of transformers' Mistral3ForConditionalGeneration (no end-of-sequence stop)."""
    inputs = {"input_ids": torch.tensor([prompt_ids])}
    if images:
        height = max(i.shape[1] for i in images)
        width = max(i.shape[2] for i in images)
        pixel_values = torch.zeros(len(images), 3, height, width, dtype=model.dtype)
        for n, image in enumerate(images):
            pixel_values[n, :, : image.shape[1], : image.shape[2]] = torch.from_numpy(image)
        inputs["pixel_values"] = pixel_values
        inputs["image_sizes"] = torch.tensor([i.shape[1:] for i in images])
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None
        )
    return generated[0, len(prompt_ids) :].tolist()

"""Each stage fetches only the checkpoint files it reads, and the ingress and preprocess read no weights.

Hugging Face is unreachable here, so `snapshot_download` is replaced by a
fake hub: it filters a published-style repository listing with Hugging
Face's own `filter_repo_objects` (what `snapshot_download` applies to
`allow_patterns`), and "downloads" the matching files from the demo
checkpoint into a snapshot folder of its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects
from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralChatRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from serve.chat_template import ChatTemplate
from serve.checkpoint import open_checkpoint, reasoning_enabled
from serve.config import AppConfig
from serve.protocol.chat import ChatMessage
from tests.reference import checkpoint_system_prompt

REPOSITORY = "mistralai/Ministral-3-3B-Instruct-2512"
# A repository in the published layout: Hugging Face files and Mistral's own format side by side.
PUBLISHED_FILES = [
    ".gitattributes",
    "README.md",
    "SYSTEM_PROMPT.txt",
    "chat_template.jinja",
    "config.json",
    "consolidated.safetensors",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "params.json",
    "processor_config.json",
    "tekken.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


SHARD_OF_WEIGHT = {
    "lm_head.weight": "model-00002-of-00002.safetensors",
    "model.language_model.embed_tokens.weight": "model-00001-of-00002.safetensors",
}


class FakeHub:
    """`snapshot_download` for one repository whose files are the demo checkpoint's."""

    def __init__(self, demo_checkpoint: Path, snapshots: Path):
        self.demo_checkpoint = demo_checkpoint
        self.snapshots = snapshots
        self.fetched: list[set[str]] = []

    def snapshot_download(self, repo_id: str, *, allow_patterns=None, **_) -> str:
        assert repo_id == REPOSITORY
        wanted = set(filter_repo_objects(PUBLISHED_FILES, allow_patterns=allow_patterns))
        self.fetched.append(wanted)
        snapshot = self.snapshots / str(len(self.fetched))
        snapshot.mkdir(parents=True)
        for name in wanted:
            # The demo has one shard where the published checkpoint has two.
            source = self.demo_checkpoint / ("model.safetensors" if name.startswith("model-") else name)
            if name == "model.safetensors.index.json":
                (snapshot / name).write_text(json.dumps({"weight_map": SHARD_OF_WEIGHT}))
            elif source.exists():
                shutil.copy(source, snapshot / name)
            else:
                (snapshot / name).write_text("{}")
        return str(snapshot)


@pytest.fixture
def hub(demo_checkpoint, tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(demo_checkpoint, tmp_path / "snapshots")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_prompt_stages_fetch_the_prompt_files_only(hub):
    open_checkpoint(AppConfig(model={"source": REPOSITORY}).model, weights=False)
    assert hub.fetched == [{"config.json", "tekken.json", "SYSTEM_PROMPT.txt"}]


def test_weight_stages_fetch_the_hugging_face_shards_and_not_mistrals_copy(hub):
    checkpoint = open_checkpoint(AppConfig(model={"source": REPOSITORY}).model, weights=True)
    (fetched,) = hub.fetched
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= fetched
    assert {"config.json", "tekken.json", "generation_config.json", "model.safetensors.index.json"} <= fetched
    # Mistral's own format holds the same weights again.
    assert not fetched & {"consolidated.safetensors", "params.json"}
    assert [path.name for path in checkpoint.weight_files()] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_the_prompt_files_are_enough_to_template_a_conversation(hub, demo_checkpoint):
    """What the ingress and preprocess replicas build from their fetch works without the weights."""
    config = AppConfig(model={"source": REPOSITORY}, system_prompt_date="2026-03-01")
    checkpoint = open_checkpoint(config.model, weights=False)
    assert not list(checkpoint.path.glob("*.safetensors"))
    template = ChatTemplate.from_config(checkpoint, config)
    tokenized = template.encode_chat([ChatMessage(role="user", content="Hello!")])
    reference = MistralTokenizer.from_file(str(demo_checkpoint / "tekken.json")).encode_chat_completion(
        MistralChatRequest(
            messages=[
                SystemMessage(content=checkpoint_system_prompt(demo_checkpoint, config.system_prompt_date)),
                UserMessage(content="Hello!"),
            ]
        )
    )
    assert tokenized.prompt_token_ids == reference.tokens
    assert template.image_token_id == checkpoint.special_token_id("[IMG]")
    assert reasoning_enabled(config.model, checkpoint) is False

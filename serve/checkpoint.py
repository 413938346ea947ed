"""Where a Ministral 3 checkpoint lives, and the files of it the service reads.

A published Ministral 3 checkpoint is one `Mistral3ForConditionalGeneration`
(vision tower + projector + language model) in Hugging Face layout, plus
Mistral's tokenizer (`tekken.json`) and default system prompt. Every stage
opens it through `open_checkpoint`; each fetches only what it reads: the
ingress and preprocess replicas template prompts and never touch weights.
The decoder's language-model view of it is `deployments.language_model`'s.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from serve.config import ModelConfig

# What a stage that templates prompts reads of a checkpoint repository
# (Hugging Face `allow_patterns`): a few hundred kilobytes, not gigabytes.
PROMPT_FILES = ("config.json", "tekken.json", "SYSTEM_PROMPT.txt")
# What the stages that run weights read besides (the encoder its vision half, the decoder the rest).
WEIGHT_FILES = ("generation_config.json", "model*.safetensors", "model.safetensors.index.json")

DEMO_SOURCE = "demo"


class CheckpointError(ValueError):
    """The checkpoint is missing a file or is not a Ministral 3 checkpoint."""


def cache_root() -> Path:
    return Path(os.environ.get("MINISTRAL_SERVE_CACHE", Path.home() / ".cache" / "ministral-serve"))


def resolve_checkpoint(
    source: str, *, weights: bool, demo_seed: int = 0, demo_variant: str = "instruct"
) -> Path:
    """A local directory holding the checkpoint named by `source`.

    `source` is a local directory, a Hugging Face repository id (downloaded
    into the HF cache: the prompt files, plus the weights when `weights`),
    or `demo` for the generated demo checkpoint. Safe to call from several
    processes at once.
    """
    if source == DEMO_SOURCE:
        from serve.demo_checkpoint import write_demo_checkpoint

        target = cache_root() / f"demo-{demo_variant}-seed{demo_seed}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / "config.json").exists():
                write_demo_checkpoint(target, seed=demo_seed, variant=demo_variant)
        return target
    local = Path(source).expanduser()
    if local.is_dir():
        return local.resolve()
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise CheckpointError(
            f"model.source {source!r} is neither an existing directory nor a Hugging Face "
            "repository id like 'mistralai/Ministral-3-3B-Instruct-2512' (or 'demo')"
        )
    from huggingface_hub import snapshot_download

    patterns = [*PROMPT_FILES, *WEIGHT_FILES] if weights else list(PROMPT_FILES)
    return Path(snapshot_download(source, allow_patterns=patterns))


def reasoning_enabled(model: ModelConfig, checkpoint: Checkpoint) -> bool:
    """Whether the model thinks in [THINK]...[/THINK] (`model.reasoning`)."""
    if model.reasoning != "auto":
        return model.reasoning == "on"
    return model.names_a_reasoning_checkpoint and checkpoint.has_think_tokens


def open_checkpoint(model: ModelConfig, *, weights: bool) -> Checkpoint:
    """The checkpoint named by the `model` section of the config, fetched or generated if needed.

    `weights`: whether the caller reads the weights (encoder, decoder) or
    only the prompt files (ingress, preprocess).
    """
    return Checkpoint.open(
        resolve_checkpoint(
            model.source, weights=weights, demo_seed=model.demo_seed, demo_variant=model.demo_variant
        )
    )


@dataclass(frozen=True)
class Checkpoint:
    """The files of a Ministral 3 checkpoint the service reads."""

    path: Path
    config: dict

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        config_file = path / "config.json"
        if not config_file.exists():
            raise CheckpointError(f"{path} has no config.json")
        config = json.loads(config_file.read_text())
        if "text_config" not in config:
            raise CheckpointError(
                f"{config_file} has no text_config: expected a Mistral3ForConditionalGeneration "
                f"checkpoint, got architectures={config.get('architectures')}"
            )
        if not (path / "tekken.json").exists():
            raise CheckpointError(f"{path} has no tekken.json (the Mistral tokenizer)")
        return cls(path=path, config=config)

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tekken.json"

    @property
    def text_config(self) -> dict:
        return self.config["text_config"]

    @property
    def dtype(self) -> str:
        return checkpoint_dtype(self.config)

    def special_token_id(self, token: str) -> int:
        """Rank of a special token such as [IMG] in the checkpoint's own tokenizer file."""
        return self._tekkenizer().get_special_token(token)

    @property
    def has_think_tokens(self) -> bool:
        tekkenizer = self._tekkenizer()
        try:
            tekkenizer.get_special_token("[THINK]")
            tekkenizer.get_special_token("[/THINK]")
        except ValueError:
            return False
        return True

    def _tekkenizer(self):
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        return Tekkenizer.from_file(self.tokenizer_file)

    def system_prompt(self, today: dt.date) -> str | None:
        """The checkpoint's default system prompt with its date placeholders filled."""
        prompt_file = self.path / "SYSTEM_PROMPT.txt"
        if not prompt_file.exists():
            return None
        yesterday = today - dt.timedelta(days=1)
        # str.replace, not str.format: the prompt may hold other braces.
        return (
            prompt_file.read_text(encoding="utf-8")
            .replace("{today}", today.isoformat())
            .replace("{yesterday}", yesterday.isoformat())
        )

    def weight_files(self) -> list[Path]:
        """The HF-layout safetensors shards (never Mistral's `consolidated.safetensors`)."""
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [self.path / name for name in shard_names]
        shards = sorted(self.path.glob("model*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.path} has no model*.safetensors weight files")
        return shards


def checkpoint_dtype(checkpoint_config: dict) -> str:
    """The dtype a Ministral 3 checkpoint computes in (FP8 checkpoints: their unquantized dtype)."""
    text = checkpoint_config["text_config"]
    return (
        text.get("dtype")
        or text.get("torch_dtype")
        or checkpoint_config.get("dtype")
        or checkpoint_config.get("torch_dtype")
        or "bfloat16"
    )


def resolve_dtype(name: str, checkpoint: Checkpoint):
    """The torch dtype of an `engine.dtype` setting ('auto': the checkpoint's)."""
    import torch

    return getattr(torch, checkpoint.dtype if name == "auto" else name)

"""The Ministral 3 language model as vLLM loads it from a multimodal checkpoint.

vLLM's `Mistral3ForConditionalGeneration` would build the vision tower too
(and on CPU it cannot be imported: it needs torchvision). The decoder stage
needs only the text model, vLLM's `MistralForCausalLM` (what vLLM registers
as `Ministral3ForCausalLM`), fed with the weights of the published
checkpoint. This class is that model with the weight-name mapping of vLLM's
own `Mistral3ForConditionalGeneration`, restricted to the language model.

Registered with vLLM through the `vllm.general_plugins` entry point, so it
is known in every vLLM process (engine core, workers) without our code
having to run there first.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock

from serve.checkpoint import Checkpoint, cache_root, checkpoint_dtype

# The architecture name the view's config.json gives vLLM; `register` maps it to the class below.
LANGUAGE_MODEL_ARCHITECTURE = "MinistralServeLanguageModel"

# Both name layouts of published Mistral 3 checkpoints (transformers >= 4.52
# writes `model.language_model.*`, earlier ones `language_model.model.*`).
# Vision and projector weights map to None: vLLM skips them.
WEIGHT_PREFIX_MAP: dict[str, str | None] = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "model.vision_tower.": None,
    "vision_tower.": None,
    "model.multi_modal_projector.": None,
    "multi_modal_projector.": None,
}
# FP8 HF checkpoints name their scales differently from vLLM's FP8 layers.
WEIGHT_SUFFIX_MAP: dict[str, str | None] = {
    ".activation_scale": ".input_scale",
    ".weight_scale_inv": ".weight_scale",
}


def weights_mapper():
    from vllm.model_executor.models.utils import WeightsMapper

    return WeightsMapper(orig_to_new_prefix=WEIGHT_PREFIX_MAP, orig_to_new_suffix=WEIGHT_SUFFIX_MAP)


def _language_model_class():
    import torch
    from vllm.model_executor.models.mistral import MistralForCausalLM

    class MinistralServeLanguageModel(MistralForCausalLM):
        hf_to_vllm_mapper = weights_mapper()

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            return super().load_weights(self.hf_to_vllm_mapper.apply(weights))

    return MinistralServeLanguageModel


def __getattr__(name: str):
    # vLLM resolves "deployments.language_model:MinistralServeLanguageModel"
    # lazily; building the class imports vLLM, which only its processes need.
    if name == LANGUAGE_MODEL_ARCHITECTURE:
        cls = _language_model_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def register() -> None:
    """vLLM plugin entry point."""
    from vllm import ModelRegistry

    if LANGUAGE_MODEL_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(LANGUAGE_MODEL_ARCHITECTURE, f"{__name__}:{LANGUAGE_MODEL_ARCHITECTURE}")


def language_model_config(checkpoint_config: dict) -> dict:
    """The `config.json` of the language-model view of a Ministral 3 checkpoint.

    The text config becomes the top-level config, under our registered
    architecture. The checkpoint's `quantization_config` is kept as it is:
    its module names (`lm_head`, `model.vision_tower`, ...) are mapped onto
    the text model by the model class's weight mapper, exactly as vLLM does
    for the multimodal model.
    """
    text = copy.deepcopy(checkpoint_config["text_config"])
    text["architectures"] = [LANGUAGE_MODEL_ARCHITECTURE]
    text.setdefault("model_type", "ministral3")
    text["torch_dtype"] = checkpoint_dtype(checkpoint_config)
    if "quantization_config" in checkpoint_config:
        text["quantization_config"] = copy.deepcopy(checkpoint_config["quantization_config"])
    # vLLM's Mistral attention applies Llama-4 query scaling only when the
    # config carries `llama_4_scaling` (the key of Mistral's params.json);
    # transformers' Ministral 3 reads it from `rope_parameters`. Without this
    # vLLM would silently diverge from the model beyond the original context.
    rope = text.get("rope_parameters") or {}
    if rope.get("llama_4_scaling_beta") is not None:
        text["llama_4_scaling"] = {
            "beta": rope["llama_4_scaling_beta"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
        }
    return text


def write_language_model_view(checkpoint: Checkpoint) -> Path:
    """Write (once) the language-model view of `checkpoint` and return its directory."""
    view_config = language_model_config(checkpoint.config)
    weight_files = checkpoint.weight_files()
    fingerprint = hashlib.sha256(
        json.dumps(
            {"config": view_config, "weights": [str(p.resolve()) for p in weight_files]},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    view_dir = cache_root() / "language-model-views" / fingerprint
    view_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(view_dir) + ".lock"):
        if (view_dir / "config.json").exists():
            return view_dir
        view_dir.mkdir(exist_ok=True)
        for source in [
            *weight_files,
            checkpoint.path / "model.safetensors.index.json",
            checkpoint.path / "generation_config.json",
            checkpoint.tokenizer_file,
        ]:
            if source.exists():
                link = view_dir / source.name
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(source.resolve())
        # config.json last: its presence marks a complete view.
        (view_dir / "config.json").write_text(json.dumps(view_config, indent=2) + "\n")
    return view_dir

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

from collections.abc import Iterable

from deployments.checkpoint import LANGUAGE_MODEL_ARCHITECTURE

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

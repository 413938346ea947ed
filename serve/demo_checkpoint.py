"""A tiny, randomly initialised Ministral 3 checkpoint for demos and tests.

It has the published architecture and file layout of
`mistralai/Ministral-3-3B-Instruct-2512` (a `Mistral3ForConditionalGeneration`
with a `ministral3` text config and a `pixtral` vision config, safetensors,
`tekken.json`, `SYSTEM_PROMPT.txt`, `generation_config.json`), shrunk so that
it builds in seconds and runs on vLLM's CPU kernels. Its output is
meaningless: the weights are random. The loading code that reads it is the
same code that reads the published checkpoints.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

DemoVariant = Literal["instruct", "reasoning", "instruct-fp8-config"]

DEMO_NOTICE = (
    "DEMO CHECKPOINT: random weights in the Ministral 3 architecture, made by "
    "`ministral-serve demo-checkpoint`. Its output is meaningless text; use it to "
    "try and test the serving stack, not the model."
)

# The published 3B's text model is 26 layers x 3072 hidden, 32 heads, 8 KV heads,
# head_dim 128. This keeps the shape rules (GQA, tied embeddings, YaRN with
# Llama-4 attention scaling, the real vocabulary) at a size the CPU runs in
# milliseconds. head_dim 64 because vLLM's CPU attention rejects 16.
# original_max_position_embeddings is 256 (published: 16384) so that prompts
# of a few hundred tokens already exercise the Llama-4 query scaling.
DEMO_TEXT_CONFIG: dict = {
    "model_type": "ministral3",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 131072,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "yarn",
        "type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 16.0,
        "original_max_position_embeddings": 256,
        "max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    },
}

# Pixtral tower as published (patch 14, 1540 px) but 2 thin layers.
DEMO_VISION_CONFIG: dict = {
    "model_type": "pixtral",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "head_dim": 32,
    "num_channels": 3,
    "image_size": 1540,
    "patch_size": 14,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}

# Token id of [IMG] in the demo tokenizer (rank 10, as in every tekken file).
DEMO_IMAGE_TOKEN_ID = 10

# Mirrors the published FP8 Instruct checkpoint's `quantization_config`: the
# vision tower, the projector and the output head stay in BF16.
FP8_QUANTIZATION_CONFIG: dict = {
    "quant_method": "fp8",
    "activation_scheme": "static",
    "weight_block_size": None,
    "modules_to_not_convert": [
        "model.vision_tower",
        "model.multi_modal_projector",
        "lm_head",
    ],
}

DEMO_SYSTEM_PROMPT = (
    "You are a demo assistant served by ministral-serve on a checkpoint with random "
    "weights. Today's date is {today}; yesterday was {yesterday}. Your answers are "
    "meaningless text.\n"
)

_EXTRA_SPECIAL_TOKENS = ("[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]")


def build_config(variant: DemoVariant = "instruct") -> dict:
    """The `config.json` of a demo checkpoint (a `Mistral3ForConditionalGeneration`)."""
    config = {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "image_token_index": DEMO_IMAGE_TOKEN_ID,
        "multimodal_projector_bias": False,
        "projector_hidden_act": "gelu",
        "spatial_merge_size": 2,
        "vision_feature_layer": -1,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "text_config": copy.deepcopy(DEMO_TEXT_CONFIG),
        "vision_config": copy.deepcopy(DEMO_VISION_CONFIG),
        "ministral_serve_demo": DEMO_NOTICE,
    }
    if variant == "instruct-fp8-config":
        config["quantization_config"] = copy.deepcopy(FP8_QUANTIZATION_CONFIG)
    return config


def build_generation_config(variant: DemoVariant = "instruct") -> dict:
    # Published Instruct checkpoints ship a low default temperature; the
    # Reasoning card recommends 0.7.
    temperature = 0.7 if variant == "reasoning" else 0.15
    return {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 11,
        "temperature": temperature,
        "top_p": 0.95 if variant == "reasoning" else 1.0,
        "max_length": DEMO_TEXT_CONFIG["max_position_embeddings"],
    }


def build_tokenizer_json() -> dict:
    """The tekken tokenizer shipped in mistral_common, upgraded to Ministral 3's format.

    Same vocabulary; version v13, an explicit special-token list with the tool
    and [THINK] tokens, and Ministral 3's image settings (patch 14, 1540 px,
    spatial merge 2).
    """
    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data_file = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    tokenizer = json.loads(data_file.read_text(encoding="utf-8"))
    special = [
        {"rank": info["rank"], "token_str": str(info["token_str"]), "is_control": info["is_control"]}
        for info in Tekkenizer.DEPRECATED_SPECIAL_TOKENS
    ]
    next_rank = len(special)
    for offset, token in enumerate(_EXTRA_SPECIAL_TOKENS):
        special.append({"rank": next_rank + offset, "token_str": token, "is_control": True})
    tokenizer["config"]["version"] = "v13"
    tokenizer["special_tokens"] = special
    tokenizer["image"] = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
    return tokenizer


def _init_weights(model, seed: int) -> None:
    """Random weights whose next-token distribution is peaked.

    With the default initialiser (std 0.02) the logits of a 2-layer model are
    nearly uniform over 131k tokens, so greedy decoding flips on rounding
    noise. Larger output projections make each layer's contribution dominate
    the residual stream and spread the logits, so greedy decoding is stable
    across implementations and does not just repeat the input token.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
                continue
            if name.endswith("bias"):
                parameter.zero_()
                continue
            fan_in = parameter.shape[-1] if parameter.dim() > 1 else 1
            std = _WEIGHT_STD.get(name.rsplit(".", 2)[-2], 1.0 / fan_in**0.5)
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


_WEIGHT_STD = {"embed_tokens": 1.0, "o_proj": 0.25, "down_proj": 0.25}


def write_demo_checkpoint(
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    variant: DemoVariant = "instruct",
) -> Path:
    """Write a demo checkpoint to `output_dir` and return its path.

    Deterministic for a given seed and torch version. Written to a temporary
    sibling and renamed, so a reader never sees a half-written checkpoint.
    """
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    output_dir = Path(output_dir)
    config_dict = build_config(variant)
    hf_config = Mistral3Config(
        **{k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(hf_config).to(torch.bfloat16)
    _init_weights(model, seed)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        # Our own config.json, not transformers' re-serialisation: it must
        # read like the published one (and carry the FP8 settings when asked).
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        (staging / "generation_config.json").write_text(
            json.dumps(build_generation_config(variant), indent=2) + "\n"
        )
        (staging / "tekken.json").write_text(json.dumps(build_tokenizer_json()))
        (staging / "SYSTEM_PROMPT.txt").write_text(DEMO_SYSTEM_PROMPT)
        (staging / "README.md").write_text(f"# Demo checkpoint ({variant}, seed {seed})\n\n{DEMO_NOTICE}\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir

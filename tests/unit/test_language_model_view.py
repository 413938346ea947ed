"""The language-model view vLLM loads, checked with vLLM's own config and weight code."""

import json

import pytest
from vllm.model_executor.layers.quantization.fp8 import Fp8Config
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

from deployments.language_model import (
    LANGUAGE_MODEL_ARCHITECTURE,
    language_model_config,
    weights_mapper,
    write_language_model_view,
)
from serve.checkpoint import Checkpoint, CheckpointError
from serve.demo_checkpoint import build_config


def test_text_config_becomes_the_model_config():
    checkpoint_config = build_config("instruct")
    view = language_model_config(checkpoint_config)
    assert view["architectures"] == [LANGUAGE_MODEL_ARCHITECTURE]
    assert view["model_type"] == "ministral3"
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size"):
        assert view[key] == checkpoint_config["text_config"][key]
    assert "quantization_config" not in view


def test_llama4_attention_scaling_is_handed_to_vllm():
    rope = build_config("instruct")["text_config"]["rope_parameters"]
    view = language_model_config(build_config("instruct"))
    assert view["llama_4_scaling"] == {
        "beta": rope["llama_4_scaling_beta"],
        "original_max_position_embeddings": rope["original_max_position_embeddings"],
    }


def test_fp8_view_keeps_quantization_and_vllm_skips_the_bf16_modules():
    checkpoint_config = build_config("instruct-fp8-config")
    view = language_model_config(checkpoint_config)
    assert view["quantization_config"] == checkpoint_config["quantization_config"]

    # What vLLM does with it: build its FP8 config from the view, then map
    # module names through our model class's mapper (SupportsQuant.__new__).
    quant = Fp8Config.from_config(view["quantization_config"])
    assert quant.is_checkpoint_fp8_serialized
    assert quant.activation_scheme == "static"
    quant.apply_vllm_mapper(weights_mapper().get_rename_mapper())
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert is_layer_skipped("lm_head", quant.ignored_layers, packed)
    for layer in ("model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"):
        assert not is_layer_skipped(layer, quant.ignored_layers, packed)


@pytest.mark.parametrize(
    ("checkpoint_name", "vllm_name"),
    [
        ("language_model.model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"),
        ("model.language_model.layers.3.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"),
        ("language_model.model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("language_model.lm_head.weight", "lm_head.weight"),
        ("lm_head.weight", "lm_head.weight"),
        (
            "model.language_model.layers.0.self_attn.k_proj.weight_scale_inv",
            "model.layers.0.self_attn.k_proj.weight_scale",
        ),
        (
            "language_model.model.layers.0.mlp.up_proj.activation_scale",
            "model.layers.0.mlp.up_proj.input_scale",
        ),
        ("vision_tower.transformer.layers.0.attention.q_proj.weight", None),
        ("model.vision_tower.patch_conv.weight", None),
        ("multi_modal_projector.linear_1.weight", None),
        ("model.multi_modal_projector.patch_merger.merging_layer.weight", None),
    ],
)
def test_weight_names_map_onto_the_text_model(checkpoint_name, vllm_name):
    assert weights_mapper().map_name(checkpoint_name) == vllm_name


def test_view_links_weights_without_copying(demo_checkpoint):
    view_dir = write_language_model_view(Checkpoint.open(demo_checkpoint))
    weights = view_dir / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (demo_checkpoint / "model.safetensors").resolve()
    assert (view_dir / "tekken.json").is_symlink()
    assert json.loads((view_dir / "config.json").read_text())["architectures"] == [
        LANGUAGE_MODEL_ARCHITECTURE
    ]
    # Written once: a second call returns the same directory.
    assert write_language_model_view(Checkpoint.open(demo_checkpoint)) == view_dir


def test_consolidated_mistral_weights_are_not_linked(demo_checkpoint, tmp_path):
    checkpoint_dir = tmp_path / "ckpt"
    checkpoint_dir.mkdir()
    for name in ("config.json", "tekken.json", "model.safetensors"):
        (checkpoint_dir / name).symlink_to(demo_checkpoint / name)
    (checkpoint_dir / "consolidated.safetensors").write_bytes(b"mistral format")
    assert [p.name for p in Checkpoint.open(checkpoint_dir).weight_files()] == ["model.safetensors"]


def test_a_text_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(CheckpointError, match="text_config"):
        Checkpoint.open(tmp_path)

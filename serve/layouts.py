"""GPU layouts: named presets for 1 to 4 GPUs, and the placement each decoder replica gets.

A layout names the decoder's tensor-parallel x pipeline-parallel shape, how
many decoder replicas there are, and where the encoder goes (a fraction of a
decoder GPU, or GPUs of its own). `AppConfig(layout=...)` expands a preset
into engine and deployment settings; `ministral-serve configs` writes one
Serve config per preset from this registry; the capacity planner reads it.
This module is the one place the presets are defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# On a shared card the encoder (0.4B parameters plus its activations) gets
# this fraction of one decoder GPU; the decoder keeps the rest.
ENCODER_GPU_SHARE = 0.1
# vLLM's share of a GPU's memory: below the scheduling share, so that CUDA
# context and fragmentation stay within the decoder's part of the card.
SHARED_GPU_MEMORY_UTILIZATION = 0.85
DEDICATED_GPU_MEMORY_UTILIZATION = 0.9

# The published Ministral 3 3B text model (all three variants).
PUBLISHED_ATTENTION_HEADS = 32
PUBLISHED_KV_HEADS = 8
PUBLISHED_LAYERS = 26


class LayoutError(ValueError):
    """A layout that does not exist, or does not fit the model or the cluster."""


@dataclass(frozen=True)
class Layout:
    name: str
    summary: str
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    decoder_replicas: int = 1
    # GPUs of the encoder's own; 0 shares a decoder GPU (ENCODER_GPU_SHARE of it).
    encoder_gpus: int = 0

    @property
    def gpus_per_decoder(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def gpus(self) -> int:
        return self.decoder_replicas * self.gpus_per_decoder + self.encoder_gpus

    @property
    def encoder_shares_a_decoder_gpu(self) -> bool:
        return self.encoder_gpus == 0

    @property
    def decoder_gpu_per_rank(self) -> float:
        return 1 - ENCODER_GPU_SHARE if self.encoder_shares_a_decoder_gpu else 1.0

    @property
    def gpu_memory_utilization(self) -> float:
        if self.encoder_shares_a_decoder_gpu:
            return SHARED_GPU_MEMORY_UTILIZATION
        return DEDICATED_GPU_MEMORY_UTILIZATION

    @property
    def shape(self) -> str:
        parts = [f"TP{self.tensor_parallel}" if self.tensor_parallel > 1 else ""]
        parts.append(f"PP{self.pipeline_parallel}" if self.pipeline_parallel > 1 else "")
        shape = "x".join(p for p in parts if p) or "TP1"
        return f"{self.decoder_replicas} x {shape}" if self.decoder_replicas > 1 else shape

    def config_overrides(self) -> dict[str, Any]:
        """The `AppConfig` settings this layout decides."""
        return {
            "engine": {
                "tensor_parallel_size": self.tensor_parallel,
                "pipeline_parallel_size": self.pipeline_parallel,
                "gpu_memory_utilization": self.gpu_memory_utilization,
            },
            "deployments": {
                "decoder": {"num_replicas": self.decoder_replicas, "num_gpus": self.decoder_gpu_per_rank},
                "encoder": {
                    "num_replicas": max(1, self.encoder_gpus),
                    "num_gpus": 1.0 if self.encoder_gpus else ENCODER_GPU_SHARE,
                },
            },
        }


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("1gpu", "One GPU: the decoder (TP1) with the encoder on a slice of the same card."),
        Layout("2gpu-tp", "Two GPUs of one node: one decoder, tensor parallel 2.", tensor_parallel=2),
        Layout(
            "2gpu-pp",
            "Two GPUs, possibly on two nodes: one decoder, pipeline parallel 2.",
            pipeline_parallel=2,
        ),
        Layout("2gpu-dp", "Two GPUs: two independent TP1 decoders (data parallel).", decoder_replicas=2),
        Layout(
            "2gpu-encoder",
            "Two GPUs: a TP1 decoder on one, the encoder alone on the other.",
            encoder_gpus=1,
        ),
        Layout(
            "3gpu-pp",
            "Three GPUs: one decoder, pipeline parallel 3 (32 heads and 8 KV heads do not split by 3).",
            pipeline_parallel=3,
        ),
        Layout("4gpu-tp", "Four GPUs of one node: one decoder, tensor parallel 4.", tensor_parallel=4),
        Layout(
            "4gpu-pp",
            "Four GPUs, possibly across nodes: one decoder, pipeline parallel 4.",
            pipeline_parallel=4,
        ),
        Layout(
            "4gpu-tp2pp2",
            "Four GPUs as two pipeline stages of a TP2 pair each; each pair stays on one node.",
            tensor_parallel=2,
            pipeline_parallel=2,
        ),
        Layout("4gpu-dp", "Four GPUs: four independent TP1 decoders (data parallel).", decoder_replicas=4),
        Layout(
            "4gpu-encoder-pp3",
            "Four GPUs: the encoder alone on one, a pipeline-parallel-3 decoder on the other three.",
            pipeline_parallel=3,
            encoder_gpus=1,
        ),
    )
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise LayoutError(f"unknown layout {name!r}; the layouts are {', '.join(LAYOUTS)}") from None


def check_shape(
    tensor_parallel: int,
    pipeline_parallel: int,
    *,
    attention_heads: int = PUBLISHED_ATTENTION_HEADS,
    kv_heads: int = PUBLISHED_KV_HEADS,
    layers: int = PUBLISHED_LAYERS,
    gpus_per_node: int | None = None,
) -> None:
    """Raise LayoutError when a TP x PP shape cannot run the model (or the cluster's nodes)."""
    if attention_heads % tensor_parallel or kv_heads % tensor_parallel:
        raise LayoutError(
            f"tensor parallel {tensor_parallel} must divide the {attention_heads} attention heads and "
            f"the {kv_heads} KV heads (use 1, 2, 4 or 8; for 3 GPUs use pipeline parallel 3)"
        )
    if pipeline_parallel > layers:
        raise LayoutError(f"pipeline parallel {pipeline_parallel} exceeds the model's {layers} layers")
    if gpus_per_node is not None and tensor_parallel > gpus_per_node:
        raise LayoutError(
            f"a tensor-parallel group of {tensor_parallel} GPUs must sit on one node, and the nodes "
            f"have {gpus_per_node} GPUs; use pipeline parallel across nodes instead"
        )


def decoder_placement(
    tensor_parallel: int, pipeline_parallel: int, gpu_per_rank: float, replica_cpus: float
) -> dict[str, Any]:
    """Ray Serve options placing one decoder replica: one GPU bundle per rank.

    The replica's own CPUs go into the first bundle (where Serve starts the
    replica). A tensor-parallel-only engine is one node (STRICT_PACK); a
    pipeline may span nodes (PACK). vLLM orders its Ray workers by node and
    numbers ranks pipeline-major, so each stage's TP group lands on one node
    whenever every node holds a multiple of TP of the replica's bundles, as
    it does on nodes of equal GPU counts (`check_shape` keeps TP within a
    node's GPUs).
    """
    world_size = tensor_parallel * pipeline_parallel
    bundles = [{"GPU": gpu_per_rank} for _ in range(world_size)]
    if replica_cpus:
        bundles[0] = {"CPU": replica_cpus, **bundles[0]}
    return {
        "placement_group_bundles": bundles,
        "placement_group_strategy": "STRICT_PACK" if pipeline_parallel == 1 else "PACK",
    }


# What every generated Serve config carries besides the layout: the real
# model, a context that fits every preset's KV cache on 24 GB cards
# (`ministral-serve plan` tells what more fits), CUDA graphs on, and
# preprocess (CPU only, no model) autoscaled on its ongoing requests.
SERVE_CONFIG_ARGS: dict[str, Any] = {
    "model": {"source": "mistralai/Ministral-3-3B-Instruct-2512"},
    "engine": {"max_model_len": 32768, "enforce_eager": False},
    "deployments": {
        "ingress": {"num_replicas": 2, "num_cpus": 1},
        "preprocess": {
            "num_replicas": None,
            "num_cpus": 1,
            "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
        },
        "decoder": {"num_cpus": 2},
    },
}


def serve_config(layout: Layout) -> str:
    """The Serve config file (`serve deploy`) of a preset, as checked in under serve/configs/."""
    import yaml

    if layout.encoder_shares_a_decoder_gpu:
        encoder = f"{ENCODER_GPU_SHARE} of a decoder GPU"
    else:
        encoder = f"{layout.encoder_gpus} GPU of its own"
    from serve.config import AppConfig

    args = {"layout": layout.name, **SERVE_CONFIG_ARGS}
    routing = AppConfig.model_validate(args).routing
    document = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [
            {
                "name": "ministral",
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": args,
                # What build_app sets from `routing`, stated where `serve deploy` can change it
                # without restarting replicas.
                "deployments": [
                    {"name": name, "request_router_config": routing.request_router_config(stage)}
                    for name, stage in (("Decoder", "decoder"), ("Encoder", "encoder"))
                ],
            }
        ],
    }
    header = (
        "# Generated by `ministral-serve configs` from serve/layouts.py: edit the registry, not this file.\n"
        f"# Layout {layout.name}: {layout.summary}\n"
        f"# {layout.gpus} GPUs: decoder {layout.shape}; encoder on {encoder}.\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False)


def cluster_needs(layouts: dict[str, Layout]) -> str:
    """What each preset asks of a cluster, as JSON: the Helm chart sizes its GPU workers by it.

    `gpus`: every GPU the Serve config's actors take. `gpus_per_worker_multiple`:
    a worker's GPU count must be a multiple of it, so that each tensor-parallel
    group fits on one node (see `decoder_placement`)."""
    import json

    needs = {
        layout.name: {
            "summary": layout.summary,
            "gpus": layout.gpus,
            "gpus_per_worker_multiple": layout.tensor_parallel,
            "decoder": layout.shape,
        }
        for layout in layouts.values()
    }
    return json.dumps(needs, indent=2) + "\n"

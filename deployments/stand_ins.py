"""Stand-ins for the GPU stages: their placement, and no model.

They run no model: they are named stand-ins so that nobody mistakes them
for the stages. `StandInDecoder` gets exactly the Serve options the decoder
gets (`serve.app.decoder_options`), and inside the replica's placement group it
starts what vLLM's Ray executor starts there on GPUs
(`vllm/v1/executor/ray_executor.py`, `_init_workers_ray`): one actor per
rank, in the first `world_size` bundles that hold GPUs, each holding
`decoder.num_gpus` of its bundle's GPUs, numbered as vLLM numbers them. So
the placement of every layout (bundles, strategy, GPU accounting, which node
each rank lands on) can be checked where the layout's engine cannot run: on
a CPU machine with logical GPUs, or on a cluster of logical nodes. The two
copied pieces (`vllm_bundle_indices`, `vllm_rank_order`) are checked against
the installed vLLM's own statements in tests/unit/test_stand_ins.py.
`StandInEncoder` takes the encoder's options and holds its GPUs (a share of
a decoder's card, or cards of its own) without loading the vision tower.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serve.config import AppConfig


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank of a decoder replica runs."""

    rank: int
    bundle_index: int
    node_id: str
    gpu_ids: tuple[str, ...]


@ray.remote(num_cpus=0)
class _Rank:
    def __init__(self, bundle_index: int):
        self._bundle_index = bundle_index

    def placement(self) -> RankPlacement:
        context = ray.get_runtime_context()
        return RankPlacement(
            rank=-1,
            bundle_index=self._bundle_index,
            node_id=context.get_node_id(),
            gpu_ids=tuple(str(gpu) for gpu in context.get_accelerator_ids().get("GPU", [])),
        )


@dataclass(frozen=True)
class ReplicaPlacement:
    """One decoder replica's placement group (None without GPUs) and its ranks, in vLLM's order."""

    placement_group_id: str | None
    ranks: list[RankPlacement]


def vllm_bundle_indices(bundle_specs: list[dict[str, float]], world_size: int) -> list[int]:
    """The bundles vLLM's Ray executor puts its ranks in: the first `world_size` that hold GPUs."""
    return [i for i, bundle in enumerate(bundle_specs) if bundle.get("GPU", 0)][:world_size]


def vllm_rank_order(placements: list[RankPlacement], driver_node_id: str) -> list[RankPlacement]:
    """Ranks as vLLM numbers its Ray workers: the driver's node first, then nodes holding fewer
    workers, then by node; in creation order within a node.

    vLLM sorts by node IP (`sort_by_driver_then_worker_ip`); logical nodes of
    one machine share an IP, so this sorts by node id, which is what the IP
    stands for. Ranks are pipeline-major: ranks [s*TP, (s+1)*TP) are stage s.
    """
    workers_on = Counter(placement.node_id for placement in placements)
    ordered = sorted(
        placements,
        key=lambda p: (p.node_id != driver_node_id, workers_on[p.node_id], p.node_id),
    )
    return [replace(placement, rank=rank) for rank, placement in enumerate(ordered)]


@serve.deployment(name="Encoder")
class StandInEncoder:
    """Holds what its options ask for (Serve reserves it for the replica), and does nothing."""


@serve.deployment(name="Decoder")
class StandInDecoder:
    """Binds the encoder too, when given, so that one application holds both stages' GPUs."""

    def __init__(self, config: AppConfig, encoder: DeploymentHandle | None = None):
        self._encoder = encoder
        world_size = config.engine.tensor_parallel_size * config.engine.pipeline_parallel_size
        group = ray.util.get_current_placement_group()
        ranks = []
        if group is not None:
            ranks = [
                _Rank.options(
                    num_gpus=config.deployments.decoder.num_gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=group,
                        placement_group_bundle_index=bundle_index,
                        placement_group_capture_child_tasks=True,
                    ),
                ).remote(bundle_index)
                for bundle_index in vllm_bundle_indices(group.bundle_specs, world_size)
            ]
        # The actors live as long as the replica: they hold the ranks' GPUs.
        self._ranks = ranks
        self._placement = ReplicaPlacement(
            placement_group_id=group.id.hex() if group is not None else None,
            ranks=vllm_rank_order(
                ray.get([rank.placement.remote() for rank in ranks]), ray.get_runtime_context().get_node_id()
            ),
        )

    async def placement(self) -> ReplicaPlacement:
        return self._placement

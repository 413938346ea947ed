"""The GPU-stage stand-ins that place layouts without an engine: their rank order and their options."""

import pytest

from deployments.stand_ins import RankPlacement, vllm_rank_order
from serve.app import build_app
from serve.layouts import LAYOUTS
from tests.integration.placement import layout_config, placement_app


def created(*nodes: str) -> list[RankPlacement]:
    return [
        RankPlacement(rank=-1, bundle_index=i, node_id=node, gpu_ids=(str(i),))
        for i, node in enumerate(nodes)
    ]


@pytest.mark.parametrize(
    ("nodes", "driver", "bundles_by_rank"),
    [
        # One node: creation (bundle) order.
        (("a", "a", "a", "a"), "a", [0, 1, 2, 3]),
        # The driver's node first, whatever the bundle order.
        (("b", "b", "a", "a"), "a", [2, 3, 0, 1]),
        # Interleaved bundles are grouped by node, so a TP pair lands on one node.
        (("a", "b", "a", "b"), "a", [0, 2, 1, 3]),
        # Off the driver's node, nodes holding fewer workers come first.
        (("c", "c", "b", "a"), "a", [3, 2, 0, 1]),
        # Equal counts off the driver's node: by node.
        (("c", "b", "c", "b"), "a", [1, 3, 0, 2]),
        ((), "a", []),
    ],
)
def test_ranks_are_numbered_as_vllm_numbers_its_ray_workers(nodes, driver, bundles_by_rank):
    ranked = vllm_rank_order(created(*nodes), driver)
    assert [r.bundle_index for r in ranked] == bundles_by_rank
    assert [r.rank for r in ranked] == list(range(len(nodes)))


def _options(application) -> dict:
    deployment = application._bound_deployment
    return {
        "ray_actor_options": deployment.ray_actor_options,
        "bundles": deployment._replica_config.placement_group_bundles,
        "strategy": deployment._replica_config.placement_group_strategy,
        "num_replicas": deployment.num_replicas,
    }


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_placement_app_gives_the_stand_ins_the_options_build_app_gives_the_stages(name, tmp_path):
    config = layout_config(name, tmp_path)
    ingress = build_app(config)._bound_deployment
    decoder, stand_in_decoder = ingress.init_args[1], placement_app(config)
    stand_in_encoder = stand_in_decoder._bound_deployment.init_args[1]
    assert _options(stand_in_decoder) == _options(decoder)
    assert _options(stand_in_encoder) == _options(ingress.init_kwargs["encoder"])
    assert _options(decoder)["bundles"] is not None

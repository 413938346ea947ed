"""Every layout preset is placed as it says, on a Ray cluster with four logical GPUs.

What holds GPUs in the application (the decoder replicas and the encoder)
is deployed with the options `build_app` gives it (`serve.app.decoder_options`,
the encoder's `serve_options`), as stand-ins that run no model
(deployments/stand_ins.py): each decoder replica starts one actor per rank in
its placement group, holding that rank's GPUs, as vLLM's Ray executor does on
GPUs. Placement groups, bundles, strategies and GPU accounting are Ray's real
ones, in seconds per preset. What the engines compute in each shape that runs
on this CPU is test_engine_shapes.py's; placement across two nodes is
test_two_nodes.py's.
"""

import pytest
from ray import serve

from serve.layouts import ENCODER_GPU_SHARE, LAYOUTS, get_layout
from tests.integration.placement import (
    decoder_placement_groups,
    free_gpus,
    gpus_in_group,
    layout_config,
    placement_app,
    ranks_by_group,
)
from tests.polling import wait_for
from tests.ray_instance import LOGICAL_GPUS


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_preset_is_placed_as_it_says(ray_cluster, demo_checkpoint, name):
    layout = get_layout(name)
    app = f"placement-{name}"
    assert free_gpus() == LOGICAL_GPUS
    serve.run(placement_app(layout_config(name, demo_checkpoint)), name=app, route_prefix=f"/{app}")
    try:
        groups = decoder_placement_groups(app)
        assert len(groups) == layout.decoder_replicas
        for group in groups.values():
            bundles = [dict(bundle) for bundle in group["bundles"].values()]
            assert bundles == [{"GPU": layout.decoder_gpu_per_rank}] * layout.gpus_per_decoder
            assert group["strategy"] == ("STRICT_PACK" if layout.pipeline_parallel == 1 else "PACK")

        # One rank per bundle, each holding one card of its own, as vLLM's Ray workers would.
        ranks = ranks_by_group(app, groups)
        cards = []
        for group_id, replica_ranks in ranks.items():
            assert sorted(r.bundle_index for r in replica_ranks) == list(range(layout.gpus_per_decoder))
            for rank in replica_ranks:
                assert rank.node_id == groups[group_id]["bundles_to_node_id"][rank.bundle_index]
                assert len(rank.gpu_ids) == 1, rank
                cards.append((rank.node_id, rank.gpu_ids[0]))
        assert len(set(cards)) == len(cards) == layout.decoder_replicas * layout.gpus_per_decoder
        for group_id in groups:
            reserved, free = gpus_in_group(group_id)
            assert reserved == pytest.approx(layout.gpus_per_decoder * layout.decoder_gpu_per_rank)
            # The ranks took their bundles' GPUs, as vLLM's workers do: nothing of the group is left.
            assert free == pytest.approx(0.0, abs=1e-6)

        # What the cluster holds beyond the decoders' bundles is the encoder's:
        # a slice of a decoder GPU, or GPUs of its own.
        held = LOGICAL_GPUS - free_gpus()
        decoder_gpus = layout.decoder_replicas * layout.gpus_per_decoder * layout.decoder_gpu_per_rank
        encoder_gpus = ENCODER_GPU_SHARE if layout.encoder_shares_a_decoder_gpu else layout.encoder_gpus
        assert held - decoder_gpus == pytest.approx(encoder_gpus)
        assert held <= layout.gpus
    finally:
        serve.delete(app)
    # Ray removes a deleted replica's placement group some time after serve.delete returns.
    assert wait_for(lambda: free_gpus() == LOGICAL_GPUS, timeout_s=60), (
        f"{free_gpus()} of {LOGICAL_GPUS} GPUs free after deleting {app}"
    )

"""Places layout presets on a two-node Ray cluster (2 logical GPUs per node) and reports where they went.

Run by tests/integration/test_two_nodes.py in its own process: a
`ray.cluster_utils.Cluster` needs a Ray instance of its own. The GPU stages
are stand-ins with the real options (tests/integration/placement.py), so no
engine starts. Prints one JSON document: per preset, which node holds each
bundle of each decoder replica's placement group, and which node each rank
(numbered as vLLM numbers its Ray workers) runs on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PRESETS = ["2gpu-tp", "2gpu-pp", "4gpu-tp2pp2", "4gpu-pp", "4gpu-encoder-pp3"]


def main(checkpoint: Path) -> None:
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray spells it so)
    import ray
    from pydantic import ValidationError
    from ray import serve
    from ray.cluster_utils import Cluster

    from tests.integration.placement import (
        decoder_placement_groups,
        layout_config,
        placement_app,
        ranks_by_group,
    )

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    # Nothing here is called over HTTP: no proxy processes on either node.
    serve.start(proxy_location="Disabled")
    report: dict = {"nodes": sorted(node["NodeID"] for node in ray.nodes() if node["Alive"]), "presets": {}}

    try:
        layout_config("4gpu-tp", checkpoint, gpus_per_node=2)
    except ValidationError as e:
        report["refused_4gpu_tp"] = str(e)

    for name in PRESETS:
        app = f"two-node-{name}"
        serve.run(
            placement_app(layout_config(name, checkpoint, gpus_per_node=2)), name=app, route_prefix=None
        )
        groups = decoder_placement_groups(app)
        ranks = ranks_by_group(app, groups)
        report["presets"][name] = {
            "groups": [
                {
                    "strategy": group["strategy"],
                    "bundle_nodes": [
                        group["bundles_to_node_id"][i] for i in sorted(group["bundles_to_node_id"])
                    ],
                    "rank_nodes": [rank.node_id for rank in ranks[group_id]],
                }
                for group_id, group in groups.items()
            ]
        }
        serve.delete(app)

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

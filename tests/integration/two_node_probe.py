"""Deploys layout presets on a two-node Ray cluster (2 logical GPUs per node) and reports their placement.

Run by tests/integration/test_two_nodes.py in its own process: a
`ray.cluster_utils.Cluster` needs a Ray instance of its own. Prints one JSON
document: per preset, which node holds each bundle of each decoder replica's
placement group, and whether the application answered a chat request.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.ports import free_port

PRESETS = ["2gpu-tp", "2gpu-pp", "4gpu-tp2pp2", "4gpu-pp", "4gpu-encoder-pp3"]


def main(checkpoint: Path) -> None:
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray spells it so)
    import ray
    from openai import OpenAI
    from pydantic import ValidationError
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve.app import build_app
    from serve.config import AppConfig

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    report: dict = {"nodes": sorted(node["NodeID"] for node in ray.nodes() if node["Alive"]), "presets": {}}

    def config(name: str) -> AppConfig:
        return AppConfig.model_validate(
            {
                "layout": name,
                "gpus_per_node": 2,
                "model": {"source": str(checkpoint), "served_name": name},
                "engine": {
                    "dtype": "float32",
                    "max_model_len": 512,
                    "cpu_kv_cache_space_gib": 1,
                    "max_num_seqs": 4,
                },
                "images": {"max_images_per_request": 1},
                "deployments": {
                    "ingress": {"num_cpus": 0},
                    "preprocess": {"num_cpus": 0},
                    "decoder": {"num_cpus": 0},
                },
            }
        )

    try:
        config("4gpu-tp")
    except ValidationError as e:
        report["refused_4gpu_tp"] = str(e)

    for name in PRESETS:
        app = f"two-node-{name}"
        serve.run(build_app(config(name)), name=app, route_prefix=f"/{app}")
        groups = [
            {
                "strategy": pg["strategy"],
                "bundle_nodes": [pg["bundles_to_node_id"][i] for i in sorted(pg["bundles_to_node_id"])],
            }
            for pg in ray.util.placement_group_table().values()
            if pg["name"].startswith(f"SERVE_REPLICA::{app}#Decoder#") and pg["state"] == "CREATED"
        ]
        client = OpenAI(
            base_url=f"http://127.0.0.1:{port}/{app}/v1", api_key="unused", timeout=120, max_retries=0
        )
        response = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hello!"}], max_tokens=3
        )
        report["presets"][name] = {"groups": groups, "completion_tokens": response.usage.completion_tokens}
        serve.delete(app)

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

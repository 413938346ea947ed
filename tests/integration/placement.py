"""What the layout tests read of a deployed application: its decoder replicas' placement groups and ranks."""

from __future__ import annotations

from pathlib import Path

from serve.config import AppConfig
from tests.polling import wait_for


def layout_config(name: str, checkpoint: Path, **settings) -> AppConfig:
    """A layout preset on the demo checkpoint, sized for this machine's few logical CPUs."""
    return AppConfig.model_validate(
        {
            "layout": name,
            "model": {"source": str(checkpoint), "served_name": name},
            "engine": {
                "dtype": "float32",
                "max_model_len": 512,
                "cpu_kv_cache_space_gib": 1,
                "max_num_seqs": 8,
            },
            # Logical CPUs are few here; the GPU bundles are what is under test.
            "deployments": {
                "ingress": {"num_cpus": 0},
                "preprocess": {"num_cpus": 0},
                "decoder": {"num_cpus": 0},
            },
            **settings,
        }
    )


def placement_app(config: AppConfig):
    """What holds GPUs in `build_app(config)`, with the options build_app gives it, and no model:
    the decoder and the encoder as stand-ins (deployments.stand_ins)."""
    from deployments.stand_ins import StandInDecoder, StandInEncoder
    from serve.app import decoder_options

    encoder = StandInEncoder.options(**config.deployments.encoder.serve_options("encoder")).bind()
    return StandInDecoder.options(**decoder_options(config)).bind(config, encoder)


def decoder_placement_groups(app: str) -> dict[str, dict]:
    """The placement groups of the application's decoder replicas, by placement group id."""
    import ray

    return {
        group_id: group
        for group_id, group in ray.util.placement_group_table().items()
        if group["name"].startswith(f"SERVE_REPLICA::{app}#Decoder#") and group["state"] == "CREATED"
    }


def ranks_by_group(app: str, groups: dict[str, dict], timeout_s: float = 60.0) -> dict[str, list]:
    """Each stand-in decoder replica's ranks (deployments.stand_ins), by its placement group id.

    Serve routes each call to one replica of its choosing: call until every replica answered.
    """
    from ray import serve

    handle = serve.get_deployment_handle("Decoder", app_name=app)
    seen: dict[str, list] = {}

    def every_replica_answered() -> bool:
        replica = handle.placement.remote().result(timeout_s=30)
        seen[replica.placement_group_id] = replica.ranks
        return set(seen) >= set(groups)

    assert wait_for(every_replica_answered, timeout_s=timeout_s), (
        f"replicas of groups {sorted(set(groups) - set(seen))} never answered"
    )
    return seen


def gpus_in_group(group_id: str) -> tuple[float, float]:
    """(reserved, still free) GPUs of a placement group: what its bundles hold, less what runs in them."""
    import ray

    key = f"GPU_group_{group_id}"
    # Ray leaves resources with nothing available out of available_resources().
    return ray.cluster_resources().get(key, 0.0), ray.available_resources().get(key, 0.0)


def free_gpus() -> float:
    import ray

    return ray.available_resources().get("GPU", 0)

"""The Ray instance the integration tests run on: always one of their own.

A plain `ray.init()` joins the cluster that `ray start --head` recorded on
this machine (or fails on the record of one that has stopped), and refuses
`num_cpus`/`num_gpus` there. `address="local"` starts a new instance
whatever the machine runs, and RAY_ADDRESS does not override it.
"""

from __future__ import annotations

import os

# Four logical GPUs: the layout tests place GPU bundles on this CPU machine.
LOGICAL_GPUS = 4


def start_own_ray(
    *, metrics_port: int | None = None, num_cpus: int = 2, num_gpus: int = LOGICAL_GPUS
) -> None:
    import ray

    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray spells it so)
    # Metrics reach the export endpoint within a second instead of ten.
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # noqa: SIM112
    # Serve's controller sets its replica-health gauge again every 10 s by
    # default; Ray drops a gauge two report intervals after its last set.
    os.environ["RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S"] = "0.5"
    # Autoscaling sees replicas' and handles' load within a second instead of ten, so that
    # tests can scale stages with delays of seconds.
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
    options = {"_metrics_export_port": metrics_port} if metrics_port is not None else {}
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        runtime_env={"env_vars": {"MINISTRAL_SERVE_CACHE": os.environ["MINISTRAL_SERVE_CACHE"]}},
        **options,
    )

"""Serve's replicas as Ray sees them: named actors, one per replica, that a replacement does not reuse."""

from __future__ import annotations


def replica_names(app: str, deployment: str | None = None) -> list[str]:
    """The names of the running replica actors of `app` (of one deployment, if named)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#" + (f"{deployment}#" if deployment else "")
    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve" and actor["name"].startswith(prefix)
    )

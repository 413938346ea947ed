"""The GPU-stage stand-ins that place layouts without an engine: their rank order and their options.

The stand-ins copy two pieces of vLLM's Ray executor (which bundles hold
ranks, and how ranks are numbered). The copies are checked against the
installed vLLM's own code: the statements are lifted from its source and
run on the same inputs, so an upgrade that changes them turns these red.
"""

import ast
import importlib.util
import itertools
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from deployments.stand_ins import RankPlacement, vllm_bundle_indices, vllm_rank_order
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


def _vllm_init_workers_ray() -> ast.FunctionDef:
    """`RayDistributedExecutor._init_workers_ray` from the installed vLLM's source (not imported)."""
    package = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
    module = ast.parse((package / "v1/executor/ray_executor.py").read_text())
    return next(
        node
        for node in ast.walk(module)
        if isinstance(node, ast.FunctionDef) and node.name == "_init_workers_ray"
    )


def _assigns(statement: ast.stmt, name: str) -> bool:
    targets = {
        ast.Assign: lambda s: s.targets,
        ast.AnnAssign: lambda s: [s.target],
    }.get(type(statement), lambda s: [])(statement)
    return any(isinstance(target, ast.Name) and target.id == name for target in targets)


def _vllm_function(statements: list[ast.stmt], parameters: list[str], result: str):
    """vLLM's `statements` as a function of `parameters` returning the local `result`."""
    body = [*statements, ast.Return(ast.Name(result, ast.Load()))]
    arguments = ast.arguments(
        posonlyargs=[], args=[ast.arg(p) for p in parameters], kwonlyargs=[], kw_defaults=[], defaults=[]
    )
    function = ast.FunctionDef("vllm_code", arguments, body, [], None, type_params=[])
    module = ast.fix_missing_locations(ast.Module([function], type_ignores=[]))
    namespace: dict = {"RayWorkerMetaData": object}
    exec(compile(module, "<vllm ray_executor.py>", "exec"), namespace)
    return namespace["vllm_code"]


def vllm_sort_workers():
    """vLLM's ordering of its workers: from `ip_counts` through `sorted_worker_metadata`."""
    body = _vllm_init_workers_ray().body
    first = next(i for i, s in enumerate(body) if _assigns(s, "ip_counts"))
    last = next(i for i, s in enumerate(body) if _assigns(s, "sorted_worker_metadata"))
    return _vllm_function(
        body[first : last + 1], ["worker_metadata", "worker_ips", "driver_ip"], "sorted_worker_metadata"
    )


def vllm_default_bundle_indices():
    """vLLM's choice of bundles when VLLM_RAY_BUNDLE_INDICES is unset (the `else` branch)."""
    choice = next(
        node
        for node in ast.walk(_vllm_init_workers_ray())
        if isinstance(node, ast.If) and "VLLM_RAY_BUNDLE_INDICES" in ast.unparse(node.test)
    )
    return _vllm_function(choice.orelse, ["placement_group", "current_platform", "self"], "bundle_indices")


@dataclass
class _Worker:
    """What vLLM's sort reads of its `RayWorkerMetaData`."""

    worker: int
    created_rank: int
    adjusted_rank: int = -1
    ip: str = ""


def _every_placement(node_names: str, max_workers: int):
    for count in range(max_workers + 1):
        yield from itertools.product(node_names, repeat=count)


@pytest.mark.parametrize("driver", ["a", "b"])
def test_the_rank_order_is_vllms_own(driver):
    sort_workers = vllm_sort_workers()
    for nodes in _every_placement("abc", 5):
        workers = [_Worker(worker=i, created_rank=i, ip=node) for i, node in enumerate(nodes)]
        theirs = [w.worker for w in sort_workers(workers, list(nodes), driver)]
        ours = [r.bundle_index for r in vllm_rank_order(created(*nodes), driver)]
        assert ours == theirs, nodes


def test_the_bundles_that_hold_ranks_are_vllms_own():
    choose = vllm_default_bundle_indices()
    gpu = SimpleNamespace(ray_device_key="GPU")
    for shape in _every_placement([{"CPU": 1}, {"GPU": 1}, {"GPU": 0.5, "CPU": 1}, {"GPU": 0}], 5):
        for world_size in range(1, 5):
            executor = SimpleNamespace(parallel_config=SimpleNamespace(world_size=world_size))
            theirs = choose(SimpleNamespace(bundle_specs=list(shape)), gpu, executor)
            assert vllm_bundle_indices(list(shape), world_size) == theirs, (shape, world_size)


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

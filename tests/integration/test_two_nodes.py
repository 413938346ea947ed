"""On two nodes of two GPUs each, pipelines span nodes while tensor-parallel groups never do.

Runs before the suite's shared Ray cluster starts (the `own_cluster` mark),
never beside it. No engine starts here: the GPU stages are stand-ins with
their real options (two_node_probe.py); what the engines compute in each
shape is test_engine_shapes.py's, on one node.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.layouts import get_layout
from tests.integration.two_node_probe import PRESETS

ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.own_cluster


@pytest.fixture(scope="module")
def report(demo_checkpoint):
    # A Cluster needs a Ray instance of its own: run in a process of its own.
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.two_node_probe", str(demo_checkpoint)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_tp_group_larger_than_a_node_is_refused(report):
    assert "must sit on one node" in report["refused_4gpu_tp"]


@pytest.mark.parametrize("name", PRESETS)
def test_placement_across_two_nodes(report, name):
    layout = get_layout(name)
    (group,) = report["presets"][name]["groups"]
    nodes = group["bundle_nodes"]
    assert len(nodes) == layout.gpus_per_decoder
    assert set(nodes) <= set(report["nodes"])
    # One rank per bundle; on each node as many ranks as bundles.
    ranks = group["rank_nodes"]
    assert sorted(ranks) == sorted(nodes)
    tp = layout.tensor_parallel
    # vLLM numbers ranks pipeline-major: ranks [s*tp, (s+1)*tp) are stage s's TP group.
    stage_groups = [ranks[stage * tp : (stage + 1) * tp] for stage in range(layout.pipeline_parallel)]
    assert all(len(set(stage_nodes)) == 1 for stage_nodes in stage_groups), ranks
    if layout.pipeline_parallel == 1:
        assert group["strategy"] == "STRICT_PACK"
    else:
        assert group["strategy"] == "PACK"
    # More GPUs than one node has: the pipeline spans both nodes.
    if layout.gpus > 2:
        assert len(set(nodes)) == 2

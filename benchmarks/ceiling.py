"""The serving ceiling: our stages around a stand-in decoder whose engine costs nothing.

On a GPU a 3B model streams thousands of tokens per second per card, and the
Python layers in front of it become the bound. This application measures
that bound on any machine: the real ingress (and image stages) in front of
`StandInBatchingDecoder`, whose engine steps are a short sleep, so that
every CPU-second the benchmark counts is the serving layer's. `ministral-serve
bench` starts it as the stack `ours (stand-in engine)`
(`benchmarks.stacks.ServingCeiling`) through this builder.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.batching_stand_in import BatchingCostModel, StandInBatchingDecoder
from serve.app import app_config, build_stages
from serve.config import AppConfig

# A step of 2 ms whatever the batch or the prompt: the engine is never the bound, and its
# wait is a sleep on the replica's event loop, not CPU.
FREE_ENGINE_STEP_S = 0.002


def free_engine(config: AppConfig) -> BatchingCostModel:
    return BatchingCostModel(
        step_s=FREE_ENGINE_STEP_S,
        per_sequence_s=0.0,
        per_prefill_token_s=0.0,
        max_num_seqs=config.engine.max_num_seqs,
    )


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Our stages with the free stand-in engine; `args` as `serve.app.build_app` takes them."""
    config = app_config(args)
    return build_stages(config, StandInBatchingDecoder, (1.0,), free_engine(config))

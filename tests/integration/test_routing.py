"""The decoder router against Ray Serve's default, on two real decoder replicas (vLLM on CPU).

One text-only application of its own (`/routing`), with two decoder replicas,
deployed twice with the same settings: first with Serve's default router
(power of two choices on queue length), then with ours. Both get the same multi-turn workload: conversations
whose every turn resends the earlier turns, run side by side. What decides
the comparison is vLLM's own prefix-cache hit counter on the two engines
(`ray_vllm_prefix_cache_hits_total`, by replica): a later turn that reaches
the replica that served the earlier ones finds their KV in its prefix cache.
These are counts, not timings.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from serve.config import AppConfig
from serve.metrics import ROUTER_AFFINITY_HITS, VLLM_PREFIX_CACHE_HITS, VLLM_PROMPT_TOKENS
from tests.integration import scrape
from tests.integration.conftest import run_behind_the_front_door
from tests.integration.replicas import replica_names

pytestmark = pytest.mark.slow

APP = "routing"
PREFIX = "/routing"
CONVERSATIONS = 8
TURNS = 4
WORDS = ("river", "stone", "lantern", "copper", "meadow", "violet", "harbor", "thunder", "pepper", "orbit")


@dataclass(frozen=True)
class Run:
    """What one deployment of the application did with the workload."""

    prefix_cache_hits: dict[str, float]  # per decoder replica
    prompt_tokens: dict[str, float]  # per decoder replica
    later_turns: int
    # What vLLM's prefix cache would find if every later turn reached the replica of the turn
    # before: that turn's prompt, in whole KV blocks (the prompt is a prefix of the next one).
    held_if_routed_home: int
    affinity_hits: float


def opener(conversation: int) -> str:
    words = random.Random(conversation).choices(WORDS, k=400)
    return f"Conversation {conversation}. Remember these words: " + " ".join(words)


def converse(client, conversation: int) -> list[int]:
    """One conversation, turn after turn; each turn's prompt tokens.

    Replies of different lengths and pauses between turns keep the conversations out of step:
    in lockstep, the replica that finishes its batch first gets its own conversations' next
    turns back, and Serve's default router would look as if it had affinity."""
    pauses = random.Random(-conversation)
    messages = [{"role": "user", "content": opener(conversation)}]
    prompt_tokens = []
    for turn in range(TURNS):
        time.sleep(pauses.uniform(0, 0.6))
        reply = client.chat.completions.create(
            model="demo",
            messages=messages,
            max_tokens=6 + 3 * (conversation % 100),
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        prompt_tokens.append(reply.usage.prompt_tokens)
        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": f"Now say the word number {turn + 2}."},
        ]
    return prompt_tokens


def deploy(ray_cluster, demo_checkpoint, router: str) -> set[str]:
    """The application with `router`; its two decoder replicas' ids."""

    from serve.app import build_app

    config = AppConfig.model_validate(
        {
            "model": {"source": str(demo_checkpoint), "served_name": "demo"},
            "engine": {"max_model_len": 2048, "cpu_kv_cache_space_gib": 1, "max_num_seqs": 8},
            "images": {"max_images_per_request": 0},
            "use_default_system_prompt": False,
            "routing": {"router": router, "stats_period_s": 1.0},
            "deployments": {"ingress": {"num_cpus": 0}, "decoder": {"num_replicas": 2, "num_cpus": 0}},
        }
    )
    run_behind_the_front_door(build_app(config), APP, PREFIX, ray_cluster.base_url)
    decoders = {name.rsplit("#", 1)[1] for name in replica_names(APP, "Decoder")}
    assert len(decoders) == 2
    return decoders


def run_workload(ray_cluster, conversations: range, decoders: set[str]) -> Run:
    """The conversations, side by side; what vLLM's counters and the router's moved meanwhile."""
    from openai import OpenAI
    from ray import serve

    def counters(samples) -> tuple[dict[str, float], dict[str, float], float]:
        hits = scrape.by_label(samples, VLLM_PREFIX_CACHE_HITS.series, "ReplicaId")
        prompts = scrape.by_label(samples, VLLM_PROMPT_TOKENS.series, "ReplicaId")
        affinity = scrape.total(samples, ROUTER_AFFINITY_HITS.series, application=APP, stage="decoder")
        return {r: hits.get(r, 0.0) for r in decoders}, {r: prompts.get(r, 0.0) for r in decoders}, affinity

    hits_before, prompts_before, affinity_before = counters(scrape.scrape(ray_cluster.metrics_url))
    block = (
        serve.get_deployment_handle("Decoder", APP).engine_info.remote().result(timeout_s=60).kv_block_size
    )
    client = OpenAI(base_url=f"{ray_cluster.base_url}{PREFIX}/v1", api_key="none", timeout=120)
    with ThreadPoolExecutor(len(conversations)) as pool:
        turns = list(pool.map(lambda c: converse(client, c), conversations))

    def counted(samples) -> bool:
        return sum(counters(samples)[1].values()) - sum(prompts_before.values()) >= sum(map(sum, turns))

    hits, prompts, affinity = counters(scrape.reached(ray_cluster.metrics_url, counted, timeout_s=30))
    return Run(
        prefix_cache_hits={r: hits[r] - hits_before[r] for r in decoders},
        prompt_tokens={r: prompts[r] - prompts_before[r] for r in decoders},
        later_turns=len(conversations) * (TURNS - 1),
        held_if_routed_home=sum(t // block * block for conversation in turns for t in conversation[:-1]),
        affinity_hits=affinity - affinity_before,
    )


@pytest.fixture(scope="module")
def runs(ray_cluster, demo_checkpoint) -> dict[str, Run]:
    """Each router on engines of its own (Ray 2.60 has no way to keep a deployment's replicas
    across a redeploy, and a handle keeps the router it made first)."""
    from ray import serve

    results = {}
    for router, conversations in (("serve_default", range(CONVERSATIONS)), ("throughput", range(100, 108))):
        try:
            decoders = deploy(ray_cluster, demo_checkpoint, router)
            results[router] = run_workload(ray_cluster, conversations, decoders)
        finally:
            serve.delete(APP)
    return results


def test_both_routers_use_both_replicas(runs):
    for router, run in runs.items():
        assert all(tokens > 0 for tokens in run.prompt_tokens.values()), (router, run.prompt_tokens)


def test_later_turns_reach_the_replica_that_holds_their_prefix(runs):
    ours = runs["throughput"]
    assert sum(ours.prefix_cache_hits.values()) >= 0.85 * ours.held_if_routed_home, ours
    # The router's own count of the requests its affinity placed (exported from the ingress).
    assert 0 < ours.affinity_hits <= ours.later_turns, ours


def test_prefix_cache_hits_beat_the_default_router(runs):
    ours, default = runs["throughput"], runs["serve_default"]
    assert sum(ours.prefix_cache_hits.values()) > sum(default.prefix_cache_hits.values()), runs

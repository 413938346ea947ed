"""`ministral-serve bench-router`: our decoder router against Ray Serve's default, on stand-in decoders.

Three replicas of the stand-in decoder (deployments/batching_stand_in.py: a
continuous-batching cost model, no model), one of them at half speed: real
CPU engines on one machine cannot differ in speed in a measurable way. The
load generator holds a handle to the decoder deployment in this process, so
the router under test runs here, as it runs in the ingress in production.

Load: multi-turn conversations, open loop. Conversations start at random
(Poisson) so that turns arrive at `rate` requests per second; each turn
resends the conversation so far (a unique opener, earlier user turns and
replies) and asks for 32 to 96 tokens. Each rate runs once per router, the
routers alternated. A request meets its targets when its time to first
token is at most `ttft_target_s` and its time per output token after the
first at most `tpot_target_s`; goodput is such requests per second.

`goodput_ratio` (ours over the default's) is taken at the highest offered
rate at which the default router still serves: where at least half of its
requests meet the targets. Results: benchmarks/results/router/.
"""

from __future__ import annotations

import asyncio
import json
import platform
import random
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).parents[1]
# One application name per run: a handle in this process keeps the request router it first
# made for a deployment, even after the deployment is redeployed with another router (Ray 2.60).
APP = "router-bench-{router}-{rate:g}"
ROUTERS = ("serve_default", "throughput")


@dataclass(frozen=True)
class RouterBenchSettings:
    rates: tuple[float, ...] = (4.0, 6.0, 7.0, 8.0, 10.0)
    seconds: float = 30.0  # of arrivals per run; the run then waits for the last answers
    speeds: tuple[float, ...] = (0.5, 1.0, 1.0)
    turns: int = 4
    turn_gap_s: float = 6.0
    opener_tokens: int = 3072
    user_tokens: int = 64
    min_tokens: int = 32
    max_tokens: int = 96
    ttft_target_s: float = 1.0
    tpot_target_s: float = 0.1
    seed: int = 0
    output: Path = field(default=ROOT / "benchmarks" / "results" / "router")


@dataclass(frozen=True)
class Turn:
    at_s: float  # after the run's start
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Outcome:
    ttft_s: float | None
    tpot_s: float | None
    tokens: int
    error: str | None = None


def workload(settings: RouterBenchSettings, rate: float) -> list[Turn]:
    """The turns of every conversation started within `seconds`, in arrival order (same seed,
    same turns for both routers)."""
    rng = random.Random(f"{settings.seed}-{rate}")
    turns = []
    start = 0.0
    conversation = 0
    while True:
        start += rng.expovariate(rate / settings.turns)
        if start >= settings.seconds:
            break
        conversation += 1
        prompt = [rng.randrange(1000, 131072) for _ in range(settings.opener_tokens)]
        for turn in range(settings.turns):
            max_tokens = rng.randint(settings.min_tokens, settings.max_tokens)
            turns.append(Turn(start + turn * settings.turn_gap_s, list(prompt), max_tokens))
            # The next turn resends this one's reply (the stand-in's tokens are 0) and a new user turn.
            prompt += [0] * max_tokens + [rng.randrange(1000, 131072) for _ in range(settings.user_tokens)]
    return sorted(turns, key=lambda t: t.at_s)


async def send(handle, turn: Turn) -> Outcome:
    from serve.messages import DecodeRequest, SamplingSettings

    request = DecodeRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=turn.prompt_token_ids,
        sampling=SamplingSettings(max_tokens=turn.max_tokens),
    )
    started = time.monotonic()
    first = last = None
    tokens = 0
    try:
        async for chunk in handle.generate.options(stream=True).remote(request):
            last = time.monotonic()
            first = first or last
            tokens += sum(len(choice.token_ids) for choice in chunk.choices)
    except Exception as e:  # an outcome to count, not a crash of the benchmark
        return Outcome(None, None, tokens, error=type(e).__name__)
    ttft = first - started if first else None
    tpot = (last - first) / (tokens - 1) if first and tokens > 1 else None
    return Outcome(ttft, tpot, tokens)


async def offer(handle, turns: list[Turn]) -> tuple[list[Outcome], float]:
    started = time.monotonic()

    async def at_its_time(turn: Turn) -> Outcome:
        await asyncio.sleep(max(0.0, turn.at_s - (time.monotonic() - started)))
        return await send(handle, turn)

    outcomes = await asyncio.gather(*(at_its_time(turn) for turn in turns))
    return list(outcomes), time.monotonic() - started


def summarise(outcomes: list[Outcome], seconds: float, settings: RouterBenchSettings) -> dict:
    done = [o for o in outcomes if o.error is None and o.ttft_s is not None]
    good = [
        o
        for o in done
        if o.ttft_s <= settings.ttft_target_s and (o.tpot_s is None or o.tpot_s <= settings.tpot_target_s)
    ]
    ttfts = sorted(o.ttft_s for o in done)
    tpots = sorted(o.tpot_s for o in done if o.tpot_s is not None) or [0.0]
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(done),
        "good": len(good),
        "good_fraction": len(good) / len(outcomes) if outcomes else 0.0,
        "goodput_rps": len(good) / settings.seconds,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
        "tpot_p50_s": statistics.median(tpots),
        "tpot_p90_s": tpots[int(0.9 * (len(tpots) - 1))],
        "missed_ttft": sum(o.ttft_s > settings.ttft_target_s for o in done),
        "missed_tpot": sum(o.tpot_s is not None and o.tpot_s > settings.tpot_target_s for o in done),
        "output_tokens_per_s": sum(o.tokens for o in done) / seconds,
        "seconds": seconds,
    }


def goodput_ratio(runs: list[dict]) -> tuple[float | None, float | None]:
    """Ours over the default's goodput at the highest rate where the default still serves
    (at least half its requests meet the targets); (None, None) if it serves none."""
    by = {(run["router"], run["rate"]): run for run in runs}
    served = [
        rate for router, rate in by if router == "serve_default" and by[router, rate]["good_fraction"] >= 0.5
    ]
    if not served:
        return None, None
    rate = max(served)
    default = by["serve_default", rate]["goodput_rps"]
    ours = by["throughput", rate]["goodput_rps"]
    return (ours / default if default else None), rate


def prefix_cache(app: str) -> dict:
    """The stand-in replicas' own prefix-cache counters, summed, and the share of prompt tokens found."""
    import ray

    replicas = [
        ray.get_actor(actor["name"], namespace="serve")
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#Decoder#")
    ]
    stats = ray.get([replica.record_routing_stats.remote() for replica in replicas])
    queries = sum(s.get("prefix_cache_queries", 0) for s in stats)
    hits = sum(s.get("prefix_cache_hits", 0) for s in stats)
    return {"prefix_cache_hit_fraction": hits / queries if queries else 0.0}


def deploy(app: str, router: str, settings: RouterBenchSettings):
    from ray import serve

    from deployments.batching_stand_in import BatchingCostModel, StandInBatchingDecoder
    from serve.config import AppConfig

    cost = BatchingCostModel()
    config = AppConfig.model_validate(
        {"routing": {"router": router}, "engine": {"max_num_seqs": cost.max_num_seqs}}
    )
    options = {
        "num_replicas": len(settings.speeds),
        "max_ongoing_requests": 1024,
        "ray_actor_options": {"num_cpus": 0},
    }
    if router_config := config.routing.request_router_config("decoder"):
        options["request_router_config"] = router_config
    serve.run(
        StandInBatchingDecoder.options(**options).bind(config, settings.speeds, cost),
        name=app,
        route_prefix=None,
    )
    return serve.get_deployment_handle("Decoder", app)


def run(settings: RouterBenchSettings) -> dict:
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs = []
    try:
        for index, rate in enumerate(settings.rates):
            turns = workload(settings, rate)
            # Alternated: which router goes first changes from one rate to the next.
            for router in ROUTERS if index % 2 == 0 else ROUTERS[::-1]:
                app = APP.format(router=router, rate=rate)
                handle = deploy(app, router, settings)
                outcomes, seconds = asyncio.run(offer(handle, turns))
                result = {
                    "router": router,
                    "rate": rate,
                    **summarise(outcomes, seconds, settings),
                    **prefix_cache(app),
                }
                print(json.dumps(result))
                runs.append(result)
                serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
    ratio, at_rate = goodput_ratio(runs)
    results = {
        "goodput_ratio": ratio,
        "goodput_ratio_at_rate": at_rate,
        "target": 1.3,
        "machine": f"{platform.node()} {platform.machine()}, {platform.processor() or 'cpu'}",
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in asdict(settings).items() if k != "output"},
        "runs": runs,
    }
    write(results, settings.output)
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results["runs"], out / "goodput.png")
    (out / "results.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    ratio = results["goodput_ratio"]
    settings = results["settings"]
    if ratio is None:
        headline = "`goodput_ratio`: none (the default router met the targets for no rate)."
    else:
        headline = (
            f"`goodput_ratio` **{ratio:.2f}** at {results['goodput_ratio_at_rate']:g} requests/s "
            f"(target {results['target']})."
        )
    lines = [
        "# Router benchmark: our decoder router against Ray Serve's default",
        "",
        headline,
        "",
        f"Stand-in decoders at speeds {settings['speeds']}; conversations of {settings['turns']} turns, "
        f"{settings['opener_tokens']}-token openers; targets TTFT <= {settings['ttft_target_s']} s, "
        f"TPOT <= {settings['tpot_target_s']} s; {settings['seconds']:g} s of arrivals per run "
        f"({results['machine']}, {results['date']}).",
        "",
        "| rate (req/s) | router | goodput (req/s) | met targets | TTFT p50 (s) | TTFT p99 (s) "
        "| TPOT p50 (s) | tok/s | prefix-cache hits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(results["runs"], key=lambda r: (r["rate"], r["router"])):
        lines.append(
            f"| {run['rate']:g} | {run['router']} | {run['goodput_rps']:.2f} | {run['good_fraction']:.0%} | "
            f"{run['ttft_p50_s']:.3f} | {run['ttft_p99_s']:.3f} | {run['tpot_p50_s']:.3f} | "
            f"{run['output_tokens_per_s']:.0f} | {run['prefix_cache_hit_fraction']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (goodput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for router in ROUTERS:
        mine = sorted((r for r in runs if r["router"] == router), key=lambda r: r["rate"])
        rates = [r["rate"] for r in mine]
        goodput.plot(rates, [r["goodput_rps"] for r in mine], marker="o", label=router)
        ttft.plot(rates, [r["ttft_p99_s"] for r in mine], marker="o", label=router)
    goodput.plot(rates, rates, linestyle=":", color="grey", label="offered")
    goodput.set(xlabel="offered requests/s", ylabel="goodput (requests/s meeting targets)", title="Goodput")
    ttft.set(xlabel="offered requests/s", ylabel="seconds", title="TTFT p99", yscale="log")
    for axes in (goodput, ttft):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

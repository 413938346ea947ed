"""A bounded soak: our service under steady mixed load for a few minutes, every request accounted for.

`make soak` (SOAK_ARGS: `--minutes`, `--concurrency`) starts the service
(serve/config.yaml: the CPU demo) in a Ray instance of its own, sends text
and image requests (streaming and not; repeated and new images, as data
URLs) from `concurrency` clients until the time is up, and reports:
requests, outcomes by kind (a request without an answer after `HANG_S`
counts as hung), p50/p99 latency, and the resident memory of each stage's
processes after a warm-up and at the end. Results go to
benchmarks/results/soak/results.json; docs/reliability.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import yaml
from PIL import Image

from benchmarks.stacks import OurService, marked_processes
from serve.config import AppConfig

HANG_S = 120.0
ROOT = Path(__file__).parents[1]
# What each stage's processes carry in their titles (Ray's actor names, vLLM's engine core).
STAGES = {
    "proxy": "ProxyActor",
    "ingress": "ServeReplica:ministral:Ingress",
    "preprocess": "ServeReplica:ministral:Preprocess",
    "encoder": "ServeReplica:ministral:Encoder",
    "decoder": "ServeReplica:ministral:Decoder",
    "engine": "EngineCore",
}
# The request mix: (kind, share).
MIX = (("text-stream", 0.45), ("text", 0.25), ("image-repeat", 0.15), ("image-new", 0.15))


def stage_rss_mib(mark: str) -> dict[str, float]:
    """Resident memory of each stage's processes (MiB), found by the server's environment mark."""
    rss = dict.fromkeys(STAGES, 0.0)
    for pid in marked_processes(mark):
        try:
            process = psutil.Process(pid)
            title = " ".join(process.cmdline()) or process.name()
            for stage, needle in STAGES.items():
                if needle in title:
                    rss[stage] += process.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return {stage: round(mib, 1) for stage, mib in rss.items()}


def image_data_url(seed: int) -> str:
    rng = random.Random(seed)
    image = Image.new("RGB", (96, 64), tuple(rng.randrange(256) for _ in range(3)))
    image.paste(tuple(rng.randrange(256) for _ in range(3)), (10, 10, 50, 40))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def payload(kind: str, model: str, rng: random.Random, serial: int, repeated_image: str) -> dict:
    content: str | list = f"Tell me something about the number {serial}."
    if kind.startswith("image"):
        url = repeated_image if kind == "image-repeat" else image_data_url(serial)
        content = [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": url}},
        ]
    stream = kind == "text-stream" or (kind.startswith("image") and serial % 2 == 0)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": rng.randint(8, 64),
        "ignore_eos": True,
        "stream": stream,
    }
    return body | ({"stream_options": {"include_usage": True}} if stream else {})


async def one_request(http: httpx.AsyncClient, body: dict) -> tuple[str, float]:
    """(outcome, seconds): "ok", "http-<status>", "error-event-<code>", "cut", "hung" or "transport"."""
    started = time.monotonic()
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return f"http-{response.status_code}", time.monotonic() - started
            if not body["stream"]:
                answer = json.loads(await response.aread())
                ok = answer["usage"]["completion_tokens"] == body["max_tokens"]
                return ("ok" if ok else "short"), time.monotonic() - started
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    return "ok", time.monotonic() - started
                if line.startswith('data: {"error"'):
                    code = json.loads(line[len("data: ") :])["error"]["code"]
                    return f"error-event-{code}", time.monotonic() - started
            return "cut", time.monotonic() - started
    except httpx.TimeoutException:
        return "hung", time.monotonic() - started
    except httpx.TransportError:
        return "transport", time.monotonic() - started


async def drive(
    base_url: str, model: str, minutes: float, concurrency: int, seed: int
) -> list[tuple[str, str, float]]:
    """(kind, outcome, seconds) of every request sent until the time is up."""
    rng = random.Random(seed)
    repeated_image = image_data_url(-1)
    kinds, weights = zip(*MIX, strict=True)
    results: list[tuple[str, str, float]] = []
    deadline = time.monotonic() + minutes * 60
    serial = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal serial
        while time.monotonic() < deadline:
            serial += 1
            kind = rng.choices(kinds, weights)[0]
            outcome, seconds = await one_request(http, payload(kind, model, rng, serial, repeated_image))
            results.append((kind, outcome, seconds))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=HANG_S, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return results


def summary(results: list[tuple[str, str, float]], rss_before: dict, rss_after: dict, settings: dict) -> dict:
    latencies = sorted(seconds for _, outcome, seconds in results if outcome == "ok")
    outcomes = Counter(outcome for _, outcome, _ in results)
    return {
        "settings": settings,
        "requests": len(results),
        "outcomes": dict(outcomes),
        "by_kind": {kind: dict(Counter(o for k, o, _ in results if k == kind)) for kind, _ in MIX},
        "lost_or_hung": sum(n for outcome, n in outcomes.items() if outcome in ("hung", "cut", "transport")),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3) if latencies else None,
        "rss_mib_after_warmup": rss_before,
        "rss_mib_at_end": rss_after,
        "rss_growth_mib": {stage: round(rss_after[stage] - rss_before[stage], 1) for stage in STAGES},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup-minutes", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "soak" / "results.json"
    )
    args = parser.parse_args(argv)

    app_args = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]["args"]
    config = AppConfig.model_validate(app_args)
    service = OurService(config, args.port, args.output.parent / "logs" / "server.log")
    settings = {"minutes": args.minutes, "concurrency": args.concurrency, "mix": dict(MIX), "seed": args.seed}
    with service:
        mark = service.process_mark
        asyncio.run(
            drive(service.base_url, config.model.name, args.warmup_minutes, args.concurrency, args.seed + 1)
        )
        rss_before = stage_rss_mib(mark)
        results = asyncio.run(
            drive(service.base_url, config.model.name, args.minutes, args.concurrency, args.seed)
        )
        rss_after = stage_rss_mib(mark)
        health = httpx.get(f"{service.base_url}/health", timeout=30).json()
    report = summary(results, rss_before, rss_after, settings) | {"health_at_end": health}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

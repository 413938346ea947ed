"""One benchmark run: start the stacks, sweep concurrencies per workload, write the report.

The same requests, per workload and concurrency, go to our service, to
vLLM's server and (text only) to the peer stacks asked for. Each of
`repeats` rounds starts every stack in turn, alone on the machine, and
measures every level on it; the order rotates from one round to the next
so that no stack always runs on a warmer machine. The report takes the
median of the repeats. The load generator is vLLM's own
(`vllm.benchmarks.serve`), called as `vllm bench serve` would be.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks import report
from benchmarks.cpu_use import ENGINE, CpuMeter, per_1k_tokens, serving_cpu_s
from benchmarks.stacks import (
    OurService,
    RayServeLlm,
    Server,
    ServerFailed,
    ServingCeiling,
    VllmServer,
    on_gpu,
)
from benchmarks.vllm_cpu_shim import cpu_multimodal_checkpoint
from benchmarks.workloads import (
    CPU_DEMO_SHAPE,
    GPU_SHAPE,
    WORKLOADS,
    WorkloadName,
    WorkloadShape,
    build_workload,
)
from deployments.language_model import write_language_model_view
from serve.checkpoint import Checkpoint, cache_root, open_checkpoint
from serve.config import AppConfig

# Peer stacks the benchmark can add to the text workload.
PEERS = {"ray-serve-llm": RayServeLlm}
# The latency target goodput counts against (vLLM's `--goodput`), in ms.
DEFAULT_GOODPUT = {"ttft": 1000.0, "tpot": 100.0}
# Keys of vLLM's result kept per run (the rest are per-request lists).
KEPT_METRICS = (
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "median_e2el_ms",
)


@dataclass
class BenchSettings:
    name: str
    # Our service's config (model, layout, engine settings); vLLM's server gets the same engine settings.
    config: AppConfig
    workloads: tuple[WorkloadName, ...]
    concurrencies: tuple[int, ...]
    # Requests per concurrency level: `rounds` x concurrency, at least `min_prompts`.
    rounds: int = 4
    min_prompts: int = 8
    # Measurements per stack, workload and concurrency; the report takes their median
    # (on two shared cores one measurement can be off by 2x, vLLM's server's too).
    repeats: int = 3
    shape: WorkloadShape | None = None
    goodput: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GOODPUT))
    # Other serving stacks measured on the text workload, named as in `PEERS`.
    peers: tuple[str, ...] = ()
    # Concurrency of the serving-ceiling measurement (our stages around a free stand-in
    # engine, text workload); 0 leaves it out.
    ceiling_concurrency: int = 64
    # Requests of that run: enough for several seconds of streaming at its speed (about 200
    # requests/s on the CPU demo), so that the CPU it counts is the serving's, not the noise.
    ceiling_prompts: int = 1024
    output_root: Path = Path("benchmarks/results")
    ours_port: int = 8300
    vllm_port: int = 8400
    peer_port: int = 8700
    ceiling_port: int = 8600

    def __post_init__(self) -> None:
        """Refuses what would fail only after servers started, or measure nothing."""
        if not self.workloads:
            raise ValueError(f"no workloads; choose from {', '.join(WORKLOADS)}")
        if unknown := sorted(set(self.workloads) - set(WORKLOADS)):
            raise ValueError(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError(f"concurrency levels must be at least 1, not {list(self.concurrencies)}")
        if unknown := sorted(set(self.peers) - PEERS.keys()):
            raise ValueError(f"unknown peers {unknown}; choose from {', '.join(PEERS)} (or '' for none)")

    def num_prompts(self, concurrency: int) -> int:
        return max(self.min_prompts, self.rounds * concurrency)


def run(settings: BenchSettings) -> dict:
    """Run the benchmark and write `results.json` and the plots; returns the results."""
    out = settings.output_root / settings.name
    if out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    checkpoint = open_checkpoint(settings.config.model, weights=True)
    shape = settings.shape or (GPU_SHAPE if on_gpu() else CPU_DEMO_SHAPE)
    results = {
        "name": settings.name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "model": settings.config.model.source,
        "layout": settings.config.layout,
        "engine": settings.config.engine.model_dump(),
        "goodput_target_ms": settings.goodput,
        "repeats": settings.repeats,
        "load_generator": f"vllm.benchmarks.serve (vLLM {_vllm_version()})",
        "workloads": {},
        "peers": {},
        "runs": [],
    }
    ours = OurService(settings.config, settings.ours_port, out / "logs" / "ours.log")
    text = [w for w in settings.workloads if w == "text"]
    images = [w for w in settings.workloads if w != "text"]
    if text:
        baseline = VllmServer(
            settings.config,
            write_language_model_view(checkpoint),
            settings.vllm_port,
            out / "logs" / "vllm-text.log",
        )
        peers = tuple(
            PEERS[peer](settings.config, settings.peer_port + i, out / "logs" / f"{peer}.log")
            for i, peer in enumerate(settings.peers)
        )
        _sweep(settings, shape, text, ours, baseline, checkpoint, out, results, peers)
    if images:
        baseline = _multimodal_baseline(settings.config, checkpoint, settings.vllm_port, out)
        _sweep(settings, shape, images, ours, baseline, checkpoint, out, results)
    if settings.ceiling_concurrency:
        results["serving_ceiling"] = _ceiling(settings, shape, checkpoint, out)
    results["table"] = report.ratio_table(results["runs"])
    results["summary"] = report.summary(results["runs"], peer=next(iter(settings.peers), None))
    results["cpu_table"] = report.cpu_table(results["runs"])
    for peer, about in results["peers"].items():
        if "unavailable" not in about:
            about["table"] = report.ratio_table(results["runs"], stack=peer)
            about["summary"] = report.summary(results["runs"], stack=peer)
    report.write(results, out)
    return results


def _ceiling(settings: BenchSettings, shape: WorkloadShape, checkpoint: Checkpoint, out: Path) -> dict:
    """Text at `ceiling_concurrency` through our stages around an engine that costs nothing: the most
    tokens and requests the serving layer streams per CPU-second of all its processes."""
    concurrency = settings.ceiling_concurrency
    ceiling_settings = replace(settings, rounds=1, min_prompts=settings.ceiling_prompts)
    workload = build_workload("text", shape, out / "data", ceiling_settings.num_prompts(concurrency))
    with ServingCeiling(settings.config, settings.ceiling_port, out / "logs" / "ceiling.log") as stack:
        run = _measure(ceiling_settings, workload, stack, concurrency, checkpoint, repeat=0)
    return report.ceiling(run)


def _multimodal_baseline(config: AppConfig, checkpoint: Checkpoint, port: int, out: Path) -> VllmServer:
    log = out / "logs" / "vllm-multimodal.log"
    if not on_gpu():
        model_dir, pythonpath = cpu_multimodal_checkpoint(checkpoint.path, cache_root() / "bench-multimodal")
        return VllmServer(config, model_dir, port, log, name="vllm (multimodal)", extra_pythonpath=pythonpath)
    # As the model card runs it: Mistral's own checkpoint format when the repository has it.
    hub_id = not Path(config.model.source).expanduser().exists() and config.model.source.count("/") == 1
    mistral_format = hub_id or (checkpoint.path / "params.json").exists()
    return VllmServer(
        config,
        config.model.source if hub_id else checkpoint.path,
        port,
        log,
        name="vllm (multimodal)",
        extra_args=("--config-format=mistral", "--load-format=mistral") if mistral_format else (),
    )


def _sweep(
    settings: BenchSettings,
    shape: WorkloadShape,
    workloads: list[WorkloadName],
    ours: Server,
    baseline: Server,
    checkpoint: Checkpoint,
    out: Path,
    results: dict,
    peers: tuple[Server, ...] = (),
) -> None:
    """Each repeat starts every stack in turn, alone on the machine, and measures all levels on it.

    Alone, because an idle stack is not idle: our Ray instance takes about
    20% of a core doing nothing, Ray Serve LLM's nearly a whole one
    (docs/benchmarks.md), and on two cores that would come out of whichever
    stack is being measured.
    """
    levels = [
        (concurrency, build_workload(name, shape, out / "data", settings.num_prompts(concurrency)))
        for concurrency in settings.concurrencies
        for name in workloads
    ]
    for _, workload in levels:
        results["workloads"].setdefault(workload.name, {"description": workload.description})
    stacks: list[Server] = [ours, baseline, *peers]
    for repeat in range(settings.repeats):
        first = repeat % len(stacks)
        for stack in stacks[first:] + stacks[:first]:
            try:
                stack.start()
            except ServerFailed as e:
                if stack is ours:
                    raise
                _unavailable(stack, baseline, workloads, str(e).splitlines()[0], results)
                stacks.remove(stack)
                continue
            try:
                for concurrency, workload in levels:
                    results["runs"].append(
                        _measure(settings, workload, stack, concurrency, checkpoint, repeat)
                    )
            finally:
                stack.stop()
    for peer in peers:
        if peer in stacks:
            results["peers"][peer.key] = {"workloads": list(workloads)}


def _unavailable(
    stack: Server, baseline: Server, workloads: list[WorkloadName], why: str, results: dict
) -> None:
    """Record that a stack could not start; the runs it made in earlier repeats are dropped."""
    results["runs"] = [
        run for run in results["runs"] if not (run["stack"] == stack.key and run["workload"] in workloads)
    ]
    if stack is baseline:
        for name in workloads:
            results["workloads"][name]["baseline_unavailable"] = why
    else:
        results["peers"][stack.key] = {"unavailable": why}


def _measure(
    settings: BenchSettings, workload, stack: Server, concurrency: int, checkpoint: Checkpoint, repeat: int
) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    num_prompts = settings.num_prompts(concurrency)
    args = parser.parse_args(
        [
            "--backend=openai-chat",
            "--endpoint=/v1/chat/completions",
            f"--base-url={stack.base_url}",
            f"--model={checkpoint.path}",
            f"--served-model-name={settings.config.model.name}",
            "--tokenizer-mode=mistral",
            *workload.dataset_args,
            f"--num-prompts={num_prompts}",
            f"--max-concurrency={concurrency}",
            f"--num-warmups={min(concurrency, 4)}",
            "--temperature=0",
            "--ignore-eos",
            "--percentile-metrics=ttft,tpot,itl,e2el",
            "--metric-percentiles=50,99",
            "--goodput",
            *[f"{metric}:{target_ms:g}" for metric, target_ms in settings.goodput.items()],
            "--disable-tqdm",
            "--seed=0",
            # Keeps the per-request figures (TTFTs, errors) in the returned result.
            "--save-detailed",
        ]
    )
    meter = CpuMeter(stack.process_mark)
    meter.start()
    measured = main(args)
    # Includes the load generator's warm-up requests, whose tokens vLLM's figures leave out.
    cpu_s = meter.stop()
    output_tokens = int(measured.get("total_output_tokens") or 0)
    errors = [error for error in measured.get("errors", []) if error]
    return {
        "workload": workload.name,
        "stack": stack.key,
        "concurrency": concurrency,
        "repeat": repeat,
        "num_prompts": num_prompts,
        # vLLM's figures may be numpy scalars.
        **{key: _plain(measured.get(key)) for key in KEPT_METRICS},
        "one_piece_share": report.one_piece_share(
            measured["ttfts"], measured["latencies"], measured["output_lens"]
        ),
        "first_error": errors[0] if errors else None,
        "output_tokens": output_tokens,
        "cpu_s": cpu_s,
        "cpu_processes_exited": meter.exited,
        "serving_cpu_s_per_1k_tokens": per_1k_tokens(serving_cpu_s(cpu_s), output_tokens),
        "engine_cpu_s_per_1k_tokens": per_1k_tokens(cpu_s.get(ENGINE, 0.0), output_tokens),
    }


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _machine() -> dict:
    import torch

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if torch.cuda.is_available():
        machine["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        machine["processor"] = platform.processor() or _cpu_model()
    return machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _vllm_version() -> str:
    import vllm

    return vllm.__version__

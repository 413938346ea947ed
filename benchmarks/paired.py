"""Paired runs of our service under variants: the before/after measurement of a change.

`python -m benchmarks.paired --variants VARIANTS.json --concurrency 8,32 --rounds 2`
starts our service once per variant and round, alone on the machine, in an
order that alternates from one round to the next, and measures the text (or
another) workload on it as `ministral-serve bench` does, CPU per process
group included. A variant names what differs from the CPU demo's config:
`config` (merged into the app's args), `env` (the server's environment) and
`args` (more `ministral-serve run` arguments). One line per measurement goes
to stdout; every run and the medians to `benchmarks/results/paired/NAME/runs.json`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks import report
from benchmarks.runner import BenchSettings, _measure
from benchmarks.stacks import OurService
from benchmarks.workloads import CPU_DEMO_SHAPE, WORKLOADS, build_workload
from serve.checkpoint import open_checkpoint
from serve.cli import DEFAULT_CONFIG
from serve.config import AppConfig


@dataclass(frozen=True)
class Variant:
    name: str
    config: dict = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()


class VariantService(OurService):
    """`ministral-serve run` with a variant's environment and arguments."""

    def __init__(self, variant: Variant, config: AppConfig, port: int, log_path: Path):
        super().__init__(config, port, log_path)
        self.name = self.key = variant.name
        self._variant = variant

    def command(self) -> list[str]:
        return [*super().command(), *self._variant.args]

    def environment(self) -> dict[str, str]:
        return {**super().environment(), **self._variant.env}


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in, nested mappings key by key."""
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def variant_order(variants: list[Variant], round_index: int) -> list[Variant]:
    """Every variant once per round; reversed every other round, so none always runs first."""
    return variants if round_index % 2 == 0 else variants[::-1]


# What a change is judged by, per variant and concurrency.
JUDGED_BY = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "serving_cpu_s_per_1k_tokens")


def medians(runs: list[dict]) -> list[dict]:
    """Per variant and concurrency: the median over the rounds of the figures in `JUDGED_BY`
    (the benchmark report's medians, each variant being a stack)."""
    return [
        {
            "variant": run["stack"],
            "concurrency": run["concurrency"],
            "rounds": run["repeats"],
            **{metric: run[metric] for metric in JUDGED_BY},
        }
        for run in report.medians(runs)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="paired")
    parser.add_argument("--variants", type=Path, required=True, help="JSON: {name: {config, env, args}}")
    parser.add_argument("--workload", choices=WORKLOADS, default="text")
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--output-root", type=Path, default=Path("benchmarks/results/paired"))
    options = parser.parse_args()

    variants = [Variant(name, **about) for name, about in json.loads(options.variants.read_text()).items()]
    concurrencies = tuple(int(level) for level in options.concurrency.split(","))
    base_args = yaml.safe_load(DEFAULT_CONFIG.read_text())["applications"][0]["args"]
    # As `ministral-serve bench` runs it.
    base_args["use_default_system_prompt"] = False
    checkpoint = open_checkpoint(AppConfig.model_validate(base_args).model, weights=True)
    out = options.output_root / options.name
    runs = []
    for round_index in range(options.rounds):
        for variant in variant_order(variants, round_index):
            config = AppConfig.model_validate(merged(base_args, variant.config))
            settings = BenchSettings(
                name=options.name,
                config=config,
                workloads=(options.workload,),
                concurrencies=concurrencies,
                repeats=options.rounds,
            )
            with VariantService(variant, config, options.port, out / "logs" / f"{variant.name}.log") as stack:
                for concurrency in concurrencies:
                    workload = build_workload(
                        options.workload, CPU_DEMO_SHAPE, out / "data", settings.num_prompts(concurrency)
                    )
                    run = _measure(settings, workload, stack, concurrency, checkpoint, round_index)
                    runs.append(run)
                    print(
                        f"PAIRED {variant.name} c={concurrency} round={round_index} "
                        f"tok/s={run['output_throughput']:.0f} ttft_p50={run['median_ttft_ms']:.1f} "
                        f"tpot_p50={run['median_tpot_ms']:.1f} "
                        f"serving_cpu_per_1k={run['serving_cpu_s_per_1k_tokens']} cpu_s={run['cpu_s']} "
                        f"failed={run['failed']}",
                        flush=True,
                    )
    summary = medians(runs)
    for row in summary:
        print("MEDIAN", json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(
        json.dumps({"variants": [v.__dict__ for v in variants], "runs": runs, "medians": summary}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()

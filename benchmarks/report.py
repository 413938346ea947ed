"""The report: ratios ours/vLLM (and peer/vLLM) per workload and concurrency, headline figures, plots.

Pure functions of the measured runs, except `write`, which puts
`results.json`, `results.md` and one PNG per workload in the results folder.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# How the plots and tables name each stack of the results.
STACK_LABELS = {"ours": "ministral-serve", "vllm": "vLLM server", "ray-serve-llm": "Ray Serve LLM"}
STACK_COLOURS = {"ours": "tab:blue", "vllm": "tab:orange", "ray-serve-llm": "tab:green"}
# Ratios stack / vLLM: above 1 is better for throughputs, below 1 for latencies.
RATIO_METRICS = (
    "request_throughput",
    "output_throughput",
    "request_goodput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
)
# Per stack, not as a ratio: share of the streamed requests that arrived in one piece.
STREAM_METRICS = ("one_piece_share",)
# A stream arrived in one piece when its first token reached the client after
# this share of the request's time: the stack held every chunk until the end.
ONE_PIECE_TTFT_SHARE = 0.9
# Shorter completions can legitimately fit in their first chunk's time.
ONE_PIECE_MIN_TOKENS = 8
# What the targets ask of the headline figures.
TARGETS = {
    "text_output_tps_ratio": (">=", 0.95),
    "text_ttft_p50_overhead_ms": ("<=", 15.0),
    "image_repeat_ttft_p50_ratio": ("<", 1.0),
}


def _ratio(ours: float | None, baseline: float | None) -> float | None:
    if ours is None or baseline is None or baseline == 0:
        return None
    return round(float(ours) / float(baseline), 4)


def one_piece_share(ttfts: list[float], latencies: list[float], output_lens: list[int]) -> float | None:
    """Share of the requests (of at least `ONE_PIECE_MIN_TOKENS` tokens) whose stream
    reached the client in one piece, from vLLM's per-request figures; None if none qualifies.

    Such a request has a normal total time but a TTFT close to it and a TPOT near 0:
    a user sees a stream that does not stream.
    """
    streamed = [
        (ttft, latency)
        for ttft, latency, tokens in zip(ttfts, latencies, output_lens, strict=True)
        if tokens >= ONE_PIECE_MIN_TOKENS and latency > 0
    ]
    if not streamed:
        return None
    in_one_piece = sum(ttft >= ONE_PIECE_TTFT_SHARE * latency for ttft, latency in streamed)
    return round(in_one_piece / len(streamed), 4)


def medians(runs: list[dict]) -> list[dict]:
    """One run per workload, concurrency and stack: each metric's median over the repeats.

    `failed` is the sum over the repeats, `repeats` their count.
    """
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["workload"], run["concurrency"], run["stack"]), []).append(run)
    merged = []
    for (workload, concurrency, stack), repeats in groups.items():
        run = {"workload": workload, "concurrency": concurrency, "stack": stack, "repeats": len(repeats)}
        for metric in RATIO_METRICS + STREAM_METRICS:
            values = [repeat[metric] for repeat in repeats if repeat.get(metric) is not None]
            run[metric] = statistics.median(values) if values else None
        run["failed"] = sum(repeat["failed"] or 0 for repeat in repeats)
        merged.append(run)
    return merged


def ratio_table(runs: list[dict], stack: str = "ours") -> list[dict]:
    """One row per workload and concurrency that `stack` and vLLM's server both ran:
    ratios `stack` / vLLM of the medians of the repeats."""
    by_key = {(run["workload"], run["concurrency"], run["stack"]): run for run in medians(runs)}
    rows = []
    for (workload, concurrency, name), measured in by_key.items():
        baseline = by_key.get((workload, concurrency, "vllm"))
        if name != stack or baseline is None:
            continue
        row = {"workload": workload, "concurrency": concurrency}
        for metric in RATIO_METRICS:
            row[f"{metric}_ratio"] = _ratio(measured[metric], baseline[metric])
        row["ttft_p50_overhead_ms"] = round(float(measured["median_ttft_ms"] - baseline["median_ttft_ms"]), 2)
        row["one_piece_share"] = {stack: measured["one_piece_share"], "vllm": baseline["one_piece_share"]}
        row["failed"] = {stack: measured["failed"], "vllm": baseline["failed"]}
        row["repeats"] = {stack: measured["repeats"], "vllm": baseline["repeats"]}
        rows.append(row)
    return sorted(rows, key=lambda row: (row["workload"], row["concurrency"]))


def summary(runs: list[dict], stack: str = "ours") -> dict:
    """Headline figures of `stack` against vLLM's server, read by scripts: None where
    the baseline could not run.

    Throughput ratios are taken at the highest concurrency run; latency
    figures are the worst across the sweep.
    """
    runs = [run for run in runs if run["stack"] in (stack, "vllm")]
    table = ratio_table(runs, stack)
    headline: dict = {}
    for workload in sorted({run["workload"] for run in runs}):
        rows = [row for row in table if row["workload"] == workload]
        key = workload.replace("-", "_")
        top = max(rows, key=lambda row: row["concurrency"]) if rows else None
        headline[f"{key}_output_tps_ratio"] = top["output_throughput_ratio"] if top else None
        headline[f"{key}_output_tps_ratio_min"] = _worst(rows, "output_throughput_ratio", min)
        headline[f"{key}_ttft_p50_ratio"] = _worst(rows, "median_ttft_ms_ratio", max)
        headline[f"{key}_ttft_p50_overhead_ms"] = _worst(rows, "ttft_p50_overhead_ms", max)
    shares = [row["one_piece_share"][stack] for row in table if row["one_piece_share"][stack] is not None]
    headline["one_piece_share_max"] = max(shares) if shares else None
    for name in TARGETS:
        headline.setdefault(name, None)
    headline["targets_met"] = {name: _meets(headline[name], *target) for name, target in TARGETS.items()}
    headline["failed_requests"] = sum(run["failed"] or 0 for run in runs)
    return headline


def _worst(rows: list[dict], metric: str, pick) -> float | None:
    values = [row[metric] for row in rows if row[metric] is not None]
    return pick(values) if values else None


def _meets(value: float | None, operator: str, bound: float) -> bool | None:
    if value is None:
        return None
    return bool({">=": value >= bound, "<=": value <= bound, "<": value < bound}[operator])


def markdown(results: dict) -> str:
    lines = [
        f"# Benchmark `{results['name']}` ({results['date']})",
        "",
        f"Model `{results['model']}`, layout `{results['layout'] or 'default'}`, "
        f"load generator {results['load_generator']}, goodput target {results['goodput_target_ms']} ms.",
        "",
        *_table_lines(results["table"]),
    ]
    repeats = results.get("repeats", 1)
    lines += [
        "",
        f"Ratios are ours / vLLM's server, of the medians of {repeats} measurements per stack. "
        f"'In one piece' is the share of streamed requests whose first token came after "
        f"{ONE_PIECE_TTFT_SHARE:.0%} of the request's time: every chunk held until the end.",
        "",
    ]
    for workload, about in results["workloads"].items():
        if "baseline_unavailable" in about:
            lines.append(
                f"- `{workload}`: vLLM's server could not run it here: {about['baseline_unavailable']}"
            )
        else:
            lines.append(f"- `{workload}`: {about.get('description', '')}")
    lines += ["", "Summary:", "", "```json", json.dumps(results["summary"], indent=2), "```", ""]
    for peer, about in results.get("peers", {}).items():
        label = STACK_LABELS.get(peer, peer)
        lines += [f"## Peer: {label}", ""]
        if "unavailable" in about:
            lines += [f"It could not run here: {about['unavailable']}", ""]
            continue
        lines += [*_table_lines(about["table"]), "", f"Ratios are {label} / vLLM's server.", ""]
    return "\n".join(lines)


def _table_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| workload | concurrency | req/s | output tok/s | goodput | TTFT p50 | TTFT p99 "
        "| TPOT p50 | TPOT p99 | TTFT p50 overhead (ms) | in one piece (stack / vLLM) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            row["workload"],
            str(row["concurrency"]),
            *(_cell(row[f"{metric}_ratio"]) for metric in RATIO_METRICS),
            f"{row['ttft_p50_overhead_ms']:+.1f}",
            " / ".join(_cell(share) for share in row["one_piece_share"].values()),
        ]
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def _cell(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def plot(runs: list[dict], workload: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for stack, colour in STACK_COLOURS.items():
        points = sorted(
            (run for run in medians(runs) if run["workload"] == workload and run["stack"] == stack),
            key=lambda run: run["concurrency"],
        )
        if not points:
            continue
        # Every repeat as a faint dot, so that the spread behind each median shows.
        each = [run for run in runs if run["workload"] == workload and run["stack"] == stack]
        for axes, metric in ((throughput, "output_throughput"), (ttft, "median_ttft_ms")):
            axes.plot(
                [run["concurrency"] for run in each],
                [run[metric] for run in each],
                ".",
                color=colour,
                alpha=0.3,
            )
        label = STACK_LABELS[stack]
        concurrency = [run["concurrency"] for run in points]
        throughput.plot(
            concurrency, [run["output_throughput"] for run in points], "o-", color=colour, label=label
        )
        ttft.plot(
            concurrency, [run["median_ttft_ms"] for run in points], "o-", color=colour, label=f"{label} p50"
        )
        ttft.plot(
            concurrency, [run["p99_ttft_ms"] for run in points], "x--", color=colour, label=f"{label} p99"
        )
    for axes, ylabel in ((throughput, "output tokens/s"), (ttft, "TTFT (ms)")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent requests")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        axes.legend()
    throughput.set_title(f"{workload}: throughput vs concurrency (median, dots: each run)")
    ttft.set_title(f"{workload}: time to first token vs concurrency")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    for workload in sorted({run["workload"] for run in results["runs"]}):
        plot(results["runs"], workload, out / f"{workload}.png")

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
# Per stack: CPU seconds per 1,000 output tokens, of every process but the engine's and of the engine's.
CPU_METRICS = ("serving_cpu_s_per_1k_tokens", "engine_cpu_s_per_1k_tokens")
# A stream arrived in one piece when its first token reached the client after
# this share of the request's time: the stack held every chunk until the end.
ONE_PIECE_TTFT_SHARE = 0.9
# Shorter completions can legitimately fit in their first chunk's time.
ONE_PIECE_MIN_TOKENS = 8
# What the targets ask of the headline figures (docs/benchmarks.md, "Targets").
TARGETS = {
    "serving_cpu_per_1k_tokens_ratio_vs_peer": ("<=", 0.5),
    "text_output_tps_ratio_vs_peer_min": (">=", 1.1),
    "text_ttft_p50_ratio_vs_peer_max": ("<=", 0.8),
    "text_output_tps_ratio": (">=", 0.85),
    "image_repeat_vs_unique_ttft_p50_ratio": ("<=", 0.7),
}
# Always in the summary, None where what they need did not run: the targets' figures and
# the earlier targets' (`text_ttft_p50_overhead_ms`, `image_repeat_ttft_p50_ratio`).
HEADLINE_KEYS = (*TARGETS, "text_ttft_p50_overhead_ms", "image_repeat_ttft_p50_ratio")


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
        for metric in RATIO_METRICS + STREAM_METRICS + CPU_METRICS:
            values = [repeat[metric] for repeat in repeats if repeat.get(metric) is not None]
            run[metric] = statistics.median(values) if values else None
        run["cpu_s_per_1k_tokens"] = _group_medians(repeats)
        run["failed"] = sum(repeat["failed"] or 0 for repeat in repeats)
        merged.append(run)
    return merged


def _group_medians(repeats: list[dict]) -> dict[str, float]:
    """Per process group, the median over the repeats of its CPU seconds per 1,000 output tokens."""
    per_group: dict[str, list[float]] = {}
    for repeat in repeats:
        if not repeat.get("output_tokens") or not repeat.get("cpu_s"):
            continue
        for group, seconds in repeat["cpu_s"].items():
            per_group.setdefault(group, []).append(seconds * 1000 / repeat["output_tokens"])
    return {group: round(statistics.median(values), 4) for group, values in sorted(per_group.items())}


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


def summary(runs: list[dict], stack: str = "ours", peer: str | None = None) -> dict:
    """Headline figures of `stack` against vLLM's server, and against `peer` if given, read by
    scripts: None where the other stack could not run.

    Throughput ratios are taken at the highest concurrency run; latency
    figures are the worst across the sweep.
    """
    by_key = {(run["workload"], run["concurrency"], run["stack"]): run for run in medians(runs)}
    comparisons = {
        **_against_peer(by_key, stack, peer),
        **_cpu_against(by_key, stack, peer),
        "image_repeat_vs_unique_ttft_p50_ratio": _repeat_vs_unique(by_key, stack),
        "engine_speed_output_tps": _engine_speed(by_key),
    }
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
    headline.update(comparisons)
    for name in HEADLINE_KEYS:
        headline.setdefault(name, None)
    headline["targets_met"] = {name: _meets(headline[name], *target) for name, target in TARGETS.items()}
    headline["failed_requests"] = sum(run["failed"] or 0 for run in runs)
    return headline


def _against_peer(by_key: dict[tuple, dict], stack: str, peer: str | None) -> dict:
    """Text: the lowest `stack` / `peer` output tokens/s and the highest TTFT p50 ratio across the
    levels both ran."""
    pairs = [
        (measured, by_key[("text", concurrency, peer)])
        for (workload, concurrency, name), measured in by_key.items()
        if workload == "text" and name == stack and ("text", concurrency, peer) in by_key
    ]
    tps = [_ratio(ours["output_throughput"], other["output_throughput"]) for ours, other in pairs]
    ttft = [_ratio(ours["median_ttft_ms"], other["median_ttft_ms"]) for ours, other in pairs]
    return {
        "text_output_tps_ratio_vs_peer_min": _pick(tps, min),
        "text_ttft_p50_ratio_vs_peer_max": _pick(ttft, max),
    }


def _cpu_against(by_key: dict[tuple, dict], stack: str, peer: str | None) -> dict:
    """Text, at the highest concurrency `stack` ran: its serving CPU per 1,000 output tokens (every
    process but the engine's) over `peer`'s and over vLLM's server's."""
    levels = [concurrency for workload, concurrency, name in by_key if workload == "text" and name == stack]
    figures = {}
    for key, other in (("vs_peer", peer), ("vs_vllm", "vllm")):
        measured = by_key.get(("text", max(levels), other)) if levels else None
        figures[f"serving_cpu_per_1k_tokens_ratio_{key}"] = measured and _ratio(
            by_key[("text", max(levels), stack)]["serving_cpu_s_per_1k_tokens"],
            measured["serving_cpu_s_per_1k_tokens"],
        )
    return figures


def _repeat_vs_unique(by_key: dict[tuple, dict], stack: str) -> float | None:
    """The encoder cache's effect inside `stack`: the highest TTFT p50 ratio, a repeated image over
    a different image per request, across the levels both workloads ran."""
    ratios = [
        _ratio(measured["median_ttft_ms"], by_key[("image-unique", concurrency, stack)]["median_ttft_ms"])
        for (workload, concurrency, name), measured in by_key.items()
        if workload == "image-repeat" and name == stack and ("image-unique", concurrency, stack) in by_key
    ]
    return _pick(ratios, max)


def _engine_speed(by_key: dict[tuple, dict]) -> float | None:
    """How fast this machine's engine ran: vLLM's server's output tokens/s on text at its highest
    concurrency, in the same run (ratios of tokens/s compare only between similar engine speeds)."""
    levels = [concurrency for workload, concurrency, name in by_key if workload == "text" and name == "vllm"]
    if not levels:
        return None
    return by_key[("text", max(levels), "vllm")]["output_throughput"]


def _pick(values: list[float | None], pick) -> float | None:
    present = [value for value in values if value is not None]
    return pick(present) if present else None


def cpu_table(runs: list[dict]) -> list[dict]:
    """Per stack, workload and concurrency: CPU seconds per 1,000 output tokens by process group
    (medians of the repeats), the serving layer's total and the engine's."""
    rows = [
        {
            "stack": run["stack"],
            "workload": run["workload"],
            "concurrency": run["concurrency"],
            "by_group": run["cpu_s_per_1k_tokens"],
            "serving": run["serving_cpu_s_per_1k_tokens"],
            "engine": run["engine_cpu_s_per_1k_tokens"],
        }
        for run in medians(runs)
        if run["cpu_s_per_1k_tokens"]
    ]
    return sorted(rows, key=lambda row: (row["stack"], row["workload"], row["concurrency"]))


def ceiling(run: dict) -> dict:
    """The serving ceiling from one run on the free stand-in engine: output tokens and requests
    streamed per CPU-second of all the stack's processes."""
    cpu_s = sum(run["cpu_s"].values())
    per_cpu_s = (lambda amount: round(amount / cpu_s, 2)) if cpu_s else (lambda _: None)
    return {
        "concurrency": run["concurrency"],
        "completed": run["completed"],
        "failed": run["failed"],
        "output_throughput": run["output_throughput"],
        "request_throughput": run["request_throughput"],
        "cpu_s": run["cpu_s"],
        "output_tokens_per_cpu_s": per_cpu_s(run["output_tokens"]),
        "requests_per_cpu_s": per_cpu_s(run["completed"]),
    }


def _worst(rows: list[dict], metric: str, pick) -> float | None:
    values = [row[metric] for row in rows if row[metric] is not None]
    return pick(values) if values else None


def _meets(value: float | None, operator: str, bound: float) -> bool | None:
    if value is None:
        return None
    return bool({">=": value >= bound, "<=": value <= bound}[operator])


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
    if results.get("cpu_table"):
        lines += ["## CPU seconds per 1,000 output tokens", "", *_cpu_lines(results["cpu_table"]), ""]
    if ceiling_run := results.get("serving_ceiling"):
        lines += [
            "## Serving ceiling (our stages, a stand-in engine that costs nothing)",
            "",
            f"Text at concurrency {ceiling_run['concurrency']}: {ceiling_run['output_throughput']:.0f} "
            f"output tokens/s, {ceiling_run['request_throughput']:.2f} requests/s; per CPU-second of "
            f"all its processes {ceiling_run['output_tokens_per_cpu_s']} output tokens and "
            f"{ceiling_run['requests_per_cpu_s']} requests. CPU seconds by group: {ceiling_run['cpu_s']}.",
            "",
        ]
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


def _cpu_lines(rows: list[dict]) -> list[str]:
    """One table: a row per stack, workload and concurrency, a column per process group."""
    groups = sorted({group for row in rows for group in row["by_group"]})
    lines = [
        f"| stack | workload | concurrency | {' | '.join(groups)} | serving (all but engine) |",
        "|---|---|---:|" + "---:|" * (len(groups) + 1),
    ]
    for row in rows:
        cells = [_cell(row["by_group"].get(group)) for group in groups]
        lines.append(
            f"| {STACK_LABELS.get(row['stack'], row['stack'])} | {row['workload']} | {row['concurrency']} "
            f"| {' | '.join(cells)} | {_cell(row['serving'])} |"
        )
    return lines


def plot_cpu(rows: list[dict], path: Path) -> None:
    """A stacked bar per workload and concurrency, a panel per stack: the serving layer's CPU seconds
    per 1,000 output tokens by process group (the engine's are in the table, not here: they would
    dwarf the rest). The scale fits the bars from 2-way up; a taller bar is cut, its total written on it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stacks = sorted({row["stack"] for row in rows})
    groups = sorted({group for row in rows for group in row["by_group"] if group != "engine"})
    colours = dict(zip(groups, plt.get_cmap("tab10").colors, strict=False))
    totals = [sum(row["by_group"].get(group, 0.0) for group in groups) for row in rows]
    fitted = [total for row, total in zip(rows, totals, strict=True) if row["concurrency"] > 1] or totals
    top = 1.15 * max(fitted, default=1.0) or 1.0
    figure, panels = plt.subplots(1, len(stacks), figsize=(5 * len(stacks), 4.5), sharey=True, squeeze=False)
    for axes, stack in zip(panels[0], stacks, strict=True):
        own = [row for row in rows if row["stack"] == stack]
        labels = [f"{row['workload']} {row['concurrency']}" for row in own]
        bottom = [0.0] * len(own)
        for group in groups:
            heights = [row["by_group"].get(group, 0.0) for row in own]
            if any(heights):
                axes.bar(labels, heights, bottom=bottom, label=group, color=colours[group])
                bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        for x, total in enumerate(bottom):
            if total > top:
                axes.text(x, top * 0.97, f"{total:.1f}", ha="center", va="top", fontsize=7, rotation=90)
        axes.set_ylim(0, top)
        axes.set_title(STACK_LABELS.get(stack, stack))
        axes.tick_params(axis="x", labelsize=7, labelrotation=90)
        axes.legend(fontsize=7)
        axes.grid(True, axis="y", alpha=0.3)
    panels[0][0].set_ylabel("serving CPU s per 1,000 output tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


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
    if results.get("cpu_table"):
        plot_cpu(results["cpu_table"], out / "cpu.png")

"""`ministral-serve` (also `python -m serve`): the project's commands."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from serve.front_door import (
    FRONT_DOORS,
    RUN_ENVIRONMENT,
    TUNABLE,
    front_door_environment,
    on_loopback,
    pod_front_doors,
)

if TYPE_CHECKING:
    from serve.config import AppConfig

DEFAULT_CONFIG = Path(__file__).parent / "config.yaml"


def _demo_checkpoint(args: argparse.Namespace) -> None:
    from serve.demo_checkpoint import write_demo_checkpoint

    path = write_demo_checkpoint(args.output, seed=args.seed, variant=args.variant)
    print(f"wrote demo checkpoint (random weights, meaningless output) to {path}")


def _application(config_path: Path, model: str | None = None) -> tuple[str, str, AppConfig]:
    """The first application of a Serve config file: its name, its builder's import path and its
    config, `model.source` replaced by `model` if given."""
    from serve.config import AppConfig

    application = yaml.safe_load(config_path.read_text())["applications"][0]
    args = application.get("args") or {}
    if model:
        args.setdefault("model", {})["source"] = model
    import_path = application.get("import_path", "serve.app:build_app")
    return application.get("name", "ministral"), import_path, AppConfig.model_validate(args)


def _open_beyond_loopback(host: str, config: AppConfig, keyed: bool) -> bool:
    """Whether the service will be open to anyone who can reach `host`; exits, saying what to set,
    when it would be and the config does not allow it (auth.allow_anonymous)."""
    if keyed or on_loopback(host):
        return False
    if not config.auth.allow_anonymous:
        sys.exit(
            f"refusing to listen on {host}, beyond loopback, without API keys: anyone who can reach "
            "it could use the model. Set MINISTRAL_API_KEYS (comma-separated) or auth.api_keys in the "
            "config; or auth.allow_anonymous: true in the config to serve it open anyway; or "
            "--host 127.0.0.1 to keep it on this machine."
        )
    return True


def _run(args: argparse.Namespace) -> None:
    from serve.auth import api_keys
    from serve.tenants import tenants_file_path

    config_path = CONFIGS_DIR / f"{args.layout}.yaml" if args.layout else Path(args.config)
    name, import_path, config = _application(config_path, model=args.model)
    keyed = bool(api_keys(key.get_secret_value() for key in config.auth.api_keys)) or bool(
        tenants_file_path(config.auth.tenants_file)
    )
    open_beyond_loopback = _open_beyond_loopback(args.host, config, keyed)
    # serve/front_door.py says why each (the Helm chart's pods get the same).
    for variable, value in RUN_ENVIRONMENT.items():
        os.environ.setdefault(variable, value)
    # The node's address is where Ray listens (GCS, raylet, workers, agents, metrics): loopback,
    # as on macOS and Windows, where Ray keeps to one machine; --host alone decides who reaches
    # the API. Ray reads it when imported. (ray.init(_node_ip_address="127.0.0.1") is turned back
    # into the machine's address.)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve
    from ray._common.utils import import_attr

    with front_door_environment(args.front_door) as environment:
        # Before ray.init: Ray's processes inherit it.
        for variable, value in environment.items():
            if variable not in TUNABLE or variable not in os.environ:
                os.environ[variable] = value
        # Ray's metrics agent serves every process's metrics (ours, vLLM's, Ray
        # Serve's) on one port: a fixed one, so Prometheus knows where to scrape.
        ray.init(include_dashboard=False, _metrics_export_port=args.metrics_port)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(import_attr(import_path)(config), name=name, route_prefix="/")
        base = f"http://{args.host}:{args.port}"
        key_header = " -H 'Authorization: Bearer YOUR_KEY'" if keyed else ""
        access = " (API keys required)" if keyed else ""
        if open_beyond_loopback:
            access = " with no API keys: open to anyone who can reach it (auth.allow_anonymous)"
        print(
            f"\nministral-serve is up at {base} ({args.front_door}) serving model {config.model.name!r}"
            f"{access}.\n"
            f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{key_header} \\\n"
            f'    -d \'{{"model": "{config.model.name}", '
            f'"messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n'
            f'  OpenAI client: OpenAI(base_url="{base}/v1", api_key="{"YOUR_KEY" if keyed else "unused"}")\n'
            f"Metrics (Prometheus): http://127.0.0.1:{args.metrics_port}/metrics\n"
            f"  ministral-serve top --metrics-url http://127.0.0.1:{args.metrics_port}/metrics\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()


CONFIGS_DIR = Path(__file__).parent / "configs"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _integers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None


# The GPU `plan` reads when given neither --gpu nor --gpu-memory-gib.
PLAN_GPU = "H100"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {value:g}")
    return value


def _gpu_price(text: str) -> tuple[str, float]:
    from serve.capacity import GPU_SPECS

    gpu, _, price = text.partition("=")
    if gpu not in GPU_SPECS:
        raise argparse.ArgumentTypeError(
            f"expected GPU=PRICE with a GPU among {', '.join(GPU_SPECS)}, not {text!r}"
        )
    return gpu, _positive_float(price)


def _plan_flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a `plan` command line's combination of flags, if anything."""
    load = args.for_load is not None
    modelled = "--tps" if args.tps else "--for-load" if load else None
    if args.tps and load:
        return "--tps and --for-load answer different questions: give one of them"
    if modelled and args.gpu_memory_gib is not None:
        return (
            f"{modelled} needs a catalogue GPU (--gpu NAME) for its memory bandwidth, FLOPs and links; "
            "--gpu-memory-gib plans memory only"
        )
    if not modelled and (args.prompt_tokens or args.output_tokens):
        return (
            "--prompt-tokens and --output-tokens shape the requests of --tps or --for-load: add one of them"
        )
    if args.price_per_hour is not None and not modelled:
        return "--price-per-hour prices the modelled tokens/s: add --tps (or --for-load)"
    if not load and (args.ttft_p95 is not None or args.tpot_p95 is not None or args.price_per_hour_of):
        return "--ttft-p95, --tpot-p95 and --price-per-hour-of are for --for-load RPS"
    if load and (args.ttft_p95 is None or args.tpot_p95 is None):
        return "--for-load needs its targets: --ttft-p95 SECONDS and --tpot-p95 SECONDS"
    if load and args.price_per_hour is not None and args.gpu is None:
        return (
            "--price-per-hour prices the one --gpu: name it, or price GPUs for --for-load with "
            "--price-per-hour-of GPU=PRICE"
        )
    return None


def _plan(args: argparse.Namespace) -> None:
    import json

    from serve import throughput
    from serve.capacity import (
        GPU_MEMORY_GIB,
        PUBLISHED_TEXT_MODEL,
        TextModel,
        format_table,
        plan_all,
        plan_layout,
    )
    from serve.layouts import get_layout

    problem = _plan_flag_problem(args)
    if problem:
        sys.exit(f"plan: {problem}")
    gpu = args.gpu or PLAN_GPU
    model = PUBLISHED_TEXT_MODEL
    if args.checkpoint:
        model = TextModel.from_config(
            json.loads((args.checkpoint / "config.json").read_text())["text_config"]
        )
    settings = dict(
        variant=args.variant,
        model=model,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        gpus_per_node=args.gpus_per_node,
    )

    def plans_on(memory: float) -> list:
        if args.layout:
            return [plan_layout(get_layout(args.layout), gpu_memory_gib=memory, **settings)]
        return plan_all(gpu_memory_gib=memory, **settings)

    shape = throughput.RequestShape(
        prompt_tokens=args.prompt_tokens or throughput.RequestShape.prompt_tokens,
        output_tokens=args.output_tokens or throughput.RequestShape.output_tokens,
    )
    if (args.tps or args.for_load) and shape.tokens > args.max_model_len:
        sys.exit(
            f"plan: a request of {shape.prompt_tokens:,} + {shape.output_tokens:,} tokens does not fit "
            f"--max-model-len {args.max_model_len:,}"
        )
    modelled = dict(max_num_seqs=args.max_num_seqs, variant=args.variant, model=model)
    if args.for_load is not None:
        gpus = [args.gpu] if args.gpu else list(GPU_MEMORY_GIB)
        prices = dict(args.price_per_hour_of or [])
        if args.price_per_hour is not None:
            prices[gpu] = args.price_per_hour
        target = throughput.LoadTarget(args.for_load, shape, args.ttft_p95, args.tpot_p95)
        plans = {name: plans_on(GPU_MEMORY_GIB[name]) for name in gpus}
        options = throughput.options_for_load(target, plans, prices=prices, **modelled)
        if not options:
            sys.exit(f"plan: {throughput.no_option_message(target, gpus)}")
        if args.json:
            print(json.dumps([option.as_dict() for option in options], indent=2))
        else:
            print(throughput.format_load_table(options, target))
        return

    if args.gpu_memory_gib is not None:
        memory, label = args.gpu_memory_gib, "GPUs"
    else:
        memory, label = GPU_MEMORY_GIB[gpu], f"{gpu} GPUs"
    plans = plans_on(memory)
    results = []
    if args.tps:
        results = [
            throughput.layout_throughput(plan, gpu, shape, price_per_gpu_hour=args.price_per_hour, **modelled)
            for plan in plans
        ]
    if args.json:
        payload = [plan.as_dict() for plan in plans]
        if results:
            payload = [fields | result.as_dict() for fields, result in zip(payload, results, strict=True)]
        print(json.dumps(payload[0] if args.layout else payload, indent=2))
        return
    print(format_table(plans, gpu_label=label))
    if args.gpu_memory_gib is None:
        print(throughput.gpu_summary(gpu))
    if results:
        print()
        print(throughput.format_throughput_table(plans, results))


def _write_generated(files: dict[Path, str], *, check: bool, source: str, command: str) -> None:
    """Write generated files, or with `check` fail naming those that differ from what `source` builds."""
    if check:
        stale = [str(path) for path, text in files.items() if not path.exists() or path.read_text() != text]
        if stale:
            sys.exit(f"out of date with {source} (run `ministral-serve {command}`): {', '.join(stale)}")
        return
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


def _configs(args: argparse.Namespace) -> None:
    from serve.layouts import LAYOUTS, cluster_needs, serve_config

    files = {args.directory / f"{layout.name}.yaml": serve_config(layout) for layout in LAYOUTS.values()}
    files[args.directory / "cluster-needs.json"] = cluster_needs(LAYOUTS)
    # The front door's environment for the Helm chart's pods, as `run` sets it.
    files[args.directory / "front-door.json"] = pod_front_doors()
    _write_generated(
        files, check=args.check, source="serve/layouts.py and serve/front_door.py", command="configs"
    )


def _dashboards(args: argparse.Namespace) -> None:
    from dashboards.build import generated_files

    _write_generated(generated_files(), check=args.check, source="dashboards/build.py", command="dashboards")


def _top(args: argparse.Namespace) -> None:
    from serve.top import MetricsUnavailable, watch

    try:
        watch(args.metrics_url, interval_s=args.interval, window_s=args.window)
    except MetricsUnavailable as e:
        sys.exit(str(e))
    except KeyboardInterrupt:
        pass


def _bench(args: argparse.Namespace) -> None:
    import json

    from benchmarks.runner import BenchSettings, run
    from benchmarks.workloads import WORKLOADS
    from serve.config import AppConfig

    if args.config:
        application = yaml.safe_load(Path(args.config).read_text())["applications"][0]
        app_args = application.get("args") or {}
    elif args.layout:
        app_args = {"layout": args.layout}
    else:
        app_args = yaml.safe_load(DEFAULT_CONFIG.read_text())["applications"][0]["args"]
    app_args.setdefault("model", {})["source"] = args.model
    # vLLM's server adds no system prompt; nor may we, for the prompts to match.
    app_args["use_default_system_prompt"] = False
    if args.max_model_len:
        app_args.setdefault("engine", {})["max_model_len"] = args.max_model_len
    config = AppConfig.model_validate(app_args)
    try:
        settings = BenchSettings(
            name=args.name,
            config=config,
            workloads=tuple(args.workloads.split(",")) if args.workloads else WORKLOADS,
            concurrencies=args.concurrency,
            rounds=args.rounds,
            repeats=args.repeats,
            peers=tuple(peer for peer in args.peers.split(",") if peer),
            ceiling_concurrency=args.ceiling_concurrency,
            output_root=args.output_root,
        )
    except ValueError as e:  # an unknown workload or peer, a concurrency below 1
        sys.exit(str(e))
    results = run(settings)
    print(json.dumps(results["summary"], indent=2))
    print(f"results, table and plots in {args.output_root / args.name}/")


def _numbers(text: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None
    if any(number <= 0 for number in numbers):
        raise argparse.ArgumentTypeError(f"rates must be positive, not {text!r}")
    return numbers


def _bench_router(args: argparse.Namespace) -> None:
    import json

    from benchmarks.router import RouterBenchSettings, run

    results = run(RouterBenchSettings(rates=args.rates, seconds=args.seconds, output=args.output))
    print(json.dumps({k: results[k] for k in ("goodput_ratio", "goodput_ratio_at_rate", "target")}))
    print(f"results, table and plot in {args.output}/")


def _bench_tenants(args: argparse.Namespace) -> None:
    import json

    from benchmarks.tenants import main as bench_tenants

    results = bench_tenants(seconds=args.seconds, output=args.output)
    print(json.dumps(results["summary"], indent=2))
    print(f"results in {args.output}")


def _hash_key(args: argparse.Namespace) -> None:
    from serve.tenants import key_digest

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    if not key:
        sys.exit("no key given: pass it as an argument or on standard input")
    print(key_digest(key))


def main(argv: list[str] | None = None) -> None:
    from serve.capacity import GPU_MEMORY_GIB
    from serve.layouts import LAYOUTS
    from serve.throughput import RequestShape

    parser = argparse.ArgumentParser(prog="ministral-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    # Where `run` exports the metrics and where `top` reads them.
    metrics_port = int(os.environ.get("METRICS_PORT", "8080"))

    demo = commands.add_parser(
        "demo-checkpoint", help="write a tiny random Ministral 3 checkpoint (for demos and tests)"
    )
    demo.add_argument("output", type=Path, help="directory to write")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--variant", choices=["instruct", "reasoning", "instruct-fp8-config"], default="instruct"
    )
    demo.set_defaults(handler=_demo_checkpoint)

    run = commands.add_parser("run", help="start the service on a local Ray instance")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config file")
    source.add_argument(
        "--layout", choices=list(LAYOUTS), help="a GPU layout preset: its config under serve/configs/"
    )
    run.add_argument("--model", help="model.source: a Hugging Face id, a checkpoint directory or demo")
    run.add_argument(
        "--host",
        default="127.0.0.1",
        help="where the API listens (default 127.0.0.1); an address beyond loopback needs API keys, "
        "or auth.allow_anonymous: true in the config",
    )
    run.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    run.add_argument(
        "--front-door",
        choices=FRONT_DOORS,
        default="haproxy",
        help="what takes HTTP in: Ray Serve's HAProxy ingress (default; its stats page, :8404, and "
        "Prometheus exporter, :9101, listen on 127.0.0.1) or Serve's Python proxy",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=metrics_port,
        help="where Ray exports every metric for Prometheus (default 8080, or METRICS_PORT)",
    )
    run.set_defaults(handler=_run)

    plan = commands.add_parser(
        "plan", help="what each layout holds: KV cache tokens and maximum concurrency at a context length"
    )
    gpu = plan.add_mutually_exclusive_group()
    gpu.add_argument(
        "--gpu",
        choices=sorted(GPU_MEMORY_GIB),
        help=f"a common GPU (default {PLAN_GPU}); --for-load without it ranks every one",
    )
    gpu.add_argument("--gpu-memory-gib", type=float, help="memory of each GPU, in GiB (memory only)")
    plan.add_argument("--layout", help="one layout (default: a table of all)")
    plan.add_argument("--variant", default="instruct", choices=["instruct", "instruct-bf16", "reasoning"])
    plan.add_argument("--checkpoint", type=Path, help="read the model's dimensions from this checkpoint")
    plan.add_argument("--max-model-len", type=int, default=262144, help="tokens per request (default 262144)")
    plan.add_argument("--gpu-memory-utilization", type=float, help="default: the layout's")
    plan.add_argument("--max-num-seqs", type=int, default=64, help="engine.max_num_seqs (default 64)")
    plan.add_argument("--gpus-per-node", type=int, help="flag layouts whose TP group needs more")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument(
        "--tps",
        action="store_true",
        help="add modelled decode tokens/s (one stream, and at each layout's concurrency) and TTFT",
    )
    plan.add_argument(
        "--prompt-tokens",
        type=_positive_int,
        help=f"prompt of a request, for --tps and --for-load (default {RequestShape.prompt_tokens})",
    )
    plan.add_argument(
        "--output-tokens",
        type=_positive_int,
        help=f"output of a request, for --tps and --for-load (default {RequestShape.output_tokens})",
    )
    plan.add_argument(
        "--price-per-hour",
        type=_positive_float,
        metavar="USD",
        help="dollars per GPU-hour of --gpu: adds $/M output tokens at full concurrency to --tps",
    )
    plan.add_argument(
        "--for-load",
        type=_positive_float,
        metavar="RPS",
        help="rank layouts x GPUs (--gpu, or every catalogue GPU) that serve RPS requests/s within "
        "--ttft-p95 and --tpot-p95, cheapest first (by GPUs without prices)",
    )
    plan.add_argument("--ttft-p95", type=_positive_float, metavar="SECONDS", help="target of --for-load")
    plan.add_argument("--tpot-p95", type=_positive_float, metavar="SECONDS", help="target of --for-load")
    plan.add_argument(
        "--price-per-hour-of",
        type=_gpu_price,
        action="append",
        metavar="GPU=USD",
        help="dollars per GPU-hour of a catalogue GPU, for --for-load (repeat for several)",
    )
    plan.set_defaults(handler=_plan)

    configs = commands.add_parser("configs", help="write the Serve config of every layout preset")
    configs.add_argument("--directory", type=Path, default=CONFIGS_DIR)
    configs.add_argument("--check", action="store_true", help="fail if a file differs from the registry")
    configs.set_defaults(handler=_configs)

    dashboards = commands.add_parser(
        "dashboards", help="write the Grafana dashboards and the metric catalogue into dashboards/"
    )
    dashboards.add_argument("--check", action="store_true", help="fail if a file differs from the code")
    dashboards.set_defaults(handler=_dashboards)

    top = commands.add_parser(
        "top", help="live terminal view of the service's metrics (no Prometheus needed)"
    )
    top.add_argument(
        "--metrics-url",
        default=f"http://127.0.0.1:{metrics_port}/metrics",
        help="the metrics endpoint `ministral-serve run` printed",
    )
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument(
        "--window",
        type=float,
        default=30.0,
        help="seconds that rates and percentiles cover; keep it several of Ray's report intervals (10 s)",
    )
    top.set_defaults(handler=_top)

    bench = commands.add_parser(
        "bench", help="benchmark the service against vLLM's own server on this machine"
    )
    bench.add_argument("--name", default="cpu-demo", help="results go to OUTPUT_ROOT/NAME/")
    bench.add_argument("--model", default="demo", help="checkpoint: demo, a directory or a Hugging Face id")
    bench.add_argument("--layout", help="a GPU layout preset (default: serve/config.yaml, the CPU demo)")
    bench.add_argument("--config", help="a Serve config to take our service's settings from")
    bench.add_argument("--max-model-len", type=int, help="engine.max_model_len for both stacks")
    bench.add_argument("--workloads", help="comma-separated (default: all)")
    bench.add_argument(
        "--concurrency",
        type=_integers,
        default="1,2,4,8,16,32",
        help="comma-separated concurrency levels",
    )
    bench.add_argument(
        "--rounds", type=_positive_int, default=4, help="requests per level = rounds x concurrency"
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="measurements per stack and level; the report takes the median",
    )
    bench.add_argument(
        "--peers",
        default="ray-serve-llm",
        help="comma-separated peer stacks measured on the text workload too ('' for none)",
    )
    bench.add_argument(
        "--ceiling-concurrency",
        type=int,
        default=64,
        help="concurrency of the serving-ceiling run (our stages, a stand-in engine that costs "
        "nothing); 0 leaves it out",
    )
    bench.add_argument("--output-root", type=Path, default=Path("benchmarks/results"))
    bench.set_defaults(handler=_bench)

    bench_router = commands.add_parser(
        "bench-router",
        help="our decoder router against Ray Serve's default, on stand-in decoders of unequal speed",
    )
    bench_router.add_argument(
        "--rates",
        type=_numbers,
        default=(4.0, 6.0, 7.0, 8.0, 10.0),
        help="offered requests/s, comma-separated",
    )
    bench_router.add_argument("--seconds", type=float, default=30.0, help="arrivals per run, in seconds")
    bench_router.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/router"), help="results folder"
    )
    bench_router.set_defaults(handler=_bench_router)

    bench_tenants = commands.add_parser(
        "bench-tenants",
        help="fair shares, priority and deadline-aware admission, on stand-in engines (docs/tenancy.md)",
    )
    bench_tenants.add_argument("--seconds", type=float, default=20.0, help="length of each scenario's load")
    bench_tenants.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/tenants/results.json"), help="results file"
    )
    bench_tenants.set_defaults(handler=_bench_tenants)

    hash_key = commands.add_parser(
        "hash-key", help="print an API key's SHA-256 digest, as the tenants file stores keys"
    )
    hash_key.add_argument(
        "key",
        nargs="?",
        help="the key (read from standard input when absent, to keep it out of the shell history)",
    )
    hash_key.set_defaults(handler=_hash_key)

    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

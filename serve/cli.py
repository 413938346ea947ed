"""`ministral-serve` (also `python -m serve`): the project's commands."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).parent / "config.yaml"


def _demo_checkpoint(args: argparse.Namespace) -> None:
    from serve.demo_checkpoint import write_demo_checkpoint

    path = write_demo_checkpoint(args.output, seed=args.seed, variant=args.variant)
    print(f"wrote demo checkpoint (random weights, meaningless output) to {path}")


def _run(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.config import AppConfig

    serve_config = yaml.safe_load(Path(args.config).read_text())
    application = serve_config["applications"][0]
    config = AppConfig.model_validate(application.get("args") or {})
    # Ray runs workers at nice 15 by default; on a small machine that starves
    # the engine next to any other process.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(config), name=application.get("name", "ministral"), route_prefix="/")
    base = f"http://{args.host}:{args.port}"
    print(
        f"\nministral-serve is up at {base} serving model {config.model.name!r}.\n"
        f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{config.model.name}", '
        f'"messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n'
        f'  OpenAI client: OpenAI(base_url="{base}/v1", api_key="unused")\n'
        "Ctrl-C stops it.",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ministral-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

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
    run.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config file")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    run.set_defaults(handler=_run)

    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

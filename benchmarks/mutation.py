"""The mutation score of the pure policies: how many deliberate bugs their unit tests catch.

`make mutation` runs mutmut (the `mutation` extra) as pyproject.toml's
[tool.mutmut] configures it: the modules in `only_mutate`, each mutant
tested by the fast unit tests that run its function (no Ray, no vLLM
engine). The run starts from a fresh copy of the sources (mutants/,
removed first: mutmut keeps a survivor's verdict across runs even after
a test that kills it is added) unless `--keep` is given.

Per module: killed (including timeouts, and mutants that crash the
test process) and survived (including "no tests": a mutant that no unit
test reaches is one no test catches; and "suspicious"), score =
killed / (killed + survived). Results go to
benchmarks/results/mutation/results.json; docs/testing.md quotes them
and says why each survivor is left. Exits 1 when the overall score is
below `--min-score` or a module's below `--min-module-score`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutation" / "results.json"
MUTANTS = ROOT / "mutants"
LOG = MUTANTS / "mutmut-run.log"

# mutmut's exit codes (mutmut/stats.py), grouped into the two outcomes that count.
KILLED = {1: "killed", 3: "killed", 37: "caught by type check", -11: "segfault", -9: "segfault"}
KILLED |= dict.fromkeys((24, -24, 152, 255, 36), "timeout")
SURVIVED = {0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious"}


def mutated_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(config["only_mutate"])


def run_mutmut(max_children: int) -> None:
    MUTANTS.mkdir(exist_ok=True)
    mutmut = Path(sys.executable).parent / "mutmut"
    command = [str(mutmut), "run", "--max-children", str(max_children)]
    # mutmut redraws a progress line per mutant: the log keeps it, the terminal gets the summary.
    with open(LOG.with_suffix(".tmp"), "w") as log:
        returncode = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    LOG.with_suffix(".tmp").replace(LOG)
    if returncode != 0:
        sys.exit(f"mutmut run failed (exit {returncode}); its output: {LOG}")


def module_result(path: str) -> dict:
    """Killed and survived mutants of one module, from mutmut's record of the run (mutants/PATH.meta)."""
    meta = json.loads((MUTANTS / f"{path}.meta").read_text())
    killed, survived, statuses, survivors = 0, 0, {}, []
    for name, code in sorted(meta["exit_code_by_key"].items(), key=lambda item: _natural(item[0])):
        if code in KILLED:
            killed += 1
            status = KILLED[code]
        elif code in SURVIVED:
            survived += 1
            status = SURVIVED[code]
            survivors.append(f"{name}: {status}")
        else:
            sys.exit(f"{name}: exit code {code} is neither killed nor survived (an unfinished run?)")
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "killed": killed,
        "survived": survived,
        "score": round(killed / (killed + survived), 4) if killed + survived else None,
        "by_status": statuses,
        "survivors": survivors,
    }


def _natural(name: str) -> tuple[str, int]:
    function, _, number = name.rpartition("__mutmut_")
    return function, int(number) if number.isdigit() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="reuse mutants/ and the verdicts of the last run")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--min-score", type=float, default=0.85)
    parser.add_argument("--min-module-score", type=float, default=0.75)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if not args.keep:
        shutil.rmtree(MUTANTS, ignore_errors=True)
    started = time.monotonic()
    run_mutmut(args.max_children)
    duration_s = time.monotonic() - started

    modules = {path: module_result(path) for path in mutated_modules()}
    killed = sum(m["killed"] for m in modules.values())
    survived = sum(m["survived"] for m in modules.values())
    score = killed / (killed + survived)
    results = {
        "tester": f"mutmut {version('mutmut')}",
        "date": datetime.date.today().isoformat(),
        "duration_s": round(duration_s),
        "max_children": args.max_children,
        "counted_as_killed": sorted(set(KILLED.values())),
        "counted_as_survived": sorted(set(SURVIVED.values())),
        "modules": modules,
        "killed": killed,
        "survived": survived,
        "score": round(score, 4),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")

    width = max(map(len, modules))
    for path, m in [*modules.items(), ("overall", {"killed": killed, "survived": survived, "score": score})]:
        print(
            f"{path:<{width}}  killed {m['killed']:>4}  survived {m['survived']:>3}  score {m['score']:.3f}"
        )
    print(f"{duration_s / 60:.1f} min; results: {args.output.relative_to(ROOT)}; survivors: `mutmut results`")

    low = [p for p, m in modules.items() if m["score"] is not None and m["score"] < args.min_module_score]
    if score < args.min_score or low:
        print(
            f"below the bar: overall {score:.3f} (min {args.min_score}), modules under "
            f"{args.min_module_score}: {', '.join(low) or 'none'}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

# The two commands of the README. Both install what they need into .venv/ first.
PORT ?= 8000
METRICS_PORT ?= 8080
PYTEST_ARGS ?=

.PHONY: serve test test-fast lint bench soak check-gpu-deps mutation

serve:
	scripts/install.sh cpu
	.venv/bin/ministral-serve run --port $(PORT) --metrics-port $(METRICS_PORT)

test:
	scripts/install.sh cpu,test
	.venv/bin/python -m pytest $(PYTEST_ARGS)

# The fast tier: no Ray, no vLLM engine.
test-fast:
	scripts/install.sh cpu,test
	.venv/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint:
	scripts/install.sh cpu,test
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# Our service against vLLM's own server (docs/benchmarks.md). BENCH_ARGS: see `ministral-serve bench --help`.
bench:
	scripts/install.sh cpu,bench
	.venv/bin/ministral-serve bench $(BENCH_ARGS)

# A bounded soak of the CPU demo: mixed text and image load, every request accounted for (docs/reliability.md).
# SOAK_ARGS: --minutes (5), --concurrency (8).
soak:
	scripts/install.sh cpu,bench
	.venv/bin/python -m benchmarks.soak $(SOAK_ARGS)

# Whether the GPU extra (scripts/install.sh gpu, the Dockerfile's) resolves from the package index:
# pip's resolver, metadata only, nothing installed. The suite runs the same check.
check-gpu-deps:
	scripts/install.sh cpu,test
	.venv/bin/python -m pytest tests/integration/test_gpu_extra.py

# The mutation score of the pure policies (docs/testing.md): mutmut over routing, autoscaling, the URL
# guard, the request limits and the capacity planner, with their unit tests; writes
# benchmarks/results/mutation/results.json. MUTATION_ARGS: see `python -m benchmarks.mutation --help`.
mutation:
	scripts/install.sh cpu,test,mutation
	.venv/bin/python -m benchmarks.mutation $(MUTATION_ARGS)

# SafeAlign on a CPU machine. `make quickstart` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.safealign-installed
# Test processes (pytest-xdist): two workers on this 2-core machine ran the full suite in 1,002 s against
# 1,230 s in one process (imports and tiny-model steps leave a core idle; the training tests use both).
# 0: one process.
TEST_WORKERS ?= 2

.PHONY: setup quickstart test test-fast lint charts manifests bench gpu-smoke clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements/cpu-no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet --no-deps -r requirements/cpu-no-deps.txt
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

quickstart: setup
	$(BIN)/safealign run recipes/quickstart.yaml
	@echo "Report: runs/quickstart/eval/report.html. Next: source $(VENV)/bin/activate, then safealign --help (README: Use it)"

# charts/safealign-*/: values, schema, README, templates and the vendored library, from the sources in
# charts/safealign-common/ (drift-tested by charts/tests/test_chart_files.py).
charts: setup
	$(BIN)/python charts/build.py

# manifests/: the plain YAML the charts render for the documented example (drift-tested).
manifests: setup
	$(BIN)/python -m safealign.k8s.manifests

# Every measurement of docs/benchmarks.md, on a quiet machine (~75 min on 2 CPU cores); results in
# benchmarks/results/, tables printed. Never part of `make test`: timings are not assertions.
BENCH_RUN := runs/bench-quickstart
bench: setup
	$(BIN)/python benchmarks/dpo_step.py --model tiny --rounds 3 --steps 3
	$(BIN)/python benchmarks/dpo_step.py --model smollm2 --rounds 2 --steps 3
	$(BIN)/python benchmarks/step_floor.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/cost_probe.py
	rm -rf $(BENCH_RUN)
	$(BIN)/safealign run recipes/quickstart.yaml --run-dir $(BENCH_RUN)
	$(BIN)/python benchmarks/stage_times.py $(BENCH_RUN)
	$(BIN)/python benchmarks/cost_sampling.py $(BENCH_RUN)

# On a machine with NVIDIA GPUs (driver >= 580): the GPU image's package set in .venv-gpu, then the tiny
# recipe through every stage on every visible GPU at the seed's settings (tests/test_gpu.py; minutes; it
# prints what it proved). Python 3.12, as in the image: openrlhf ships wheels for cp310-cp312 only, and
# vLLM's set is resolved for 3.12. Never part of `make test`.
GPU_PYTHON ?= python3.12
GPU_VENV ?= .venv-gpu
GPU_STAMP := $(GPU_VENV)/.safealign-installed
$(GPU_STAMP): setup.cfg pyproject.toml requirements/gpu.txt requirements/gpu-no-deps.txt
	@command -v $(GPU_PYTHON) >/dev/null || { echo "make gpu-smoke: $(GPU_PYTHON) not found; install it (apt-get install python3.12 python3.12-venv python3.12-dev) or pass GPU_PYTHON=..."; exit 2; }
	$(GPU_PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --quiet -r requirements/gpu.txt
	$(GPU_VENV)/bin/pip install --quiet --no-deps -r requirements/gpu-no-deps.txt
	$(GPU_VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

gpu-smoke: $(GPU_STAMP)
	$(GPU_VENV)/bin/pytest -v -s -rs tests/test_gpu.py

lint: setup
	$(BIN)/ruff check plugin tests charts benchmarks

test: lint
	@# CI (CI=true, root, Debian) adds Chromium for the report's browser test; elsewhere that test is skipped.
	@if [ "$$CI" = true ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "chromium not installed: its test will be skipped"; fi
	$(BIN)/pytest -n $(TEST_WORKERS)

# The inner loop: lint and every test that trains nothing (`-m "not slow"`; ~4 min on 2 cores). CI runs `make test`.
test-fast: lint
	$(BIN)/pytest -n $(TEST_WORKERS) -m "not slow"

clean:
	rm -rf $(VENV) $(GPU_VENV) runs .pytest_cache

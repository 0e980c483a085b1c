# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The torch/torchvision pair known to install and import together on our machines.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The wheel's smoke check installs only torch beside it: the CPU build that lies on our machines' disks.
SMOKE_TORCH ?= torch==2.13.0
# The lint tools, pinned: a new release's rules or formatting must not fail CI without a change here.
LINT_PINS := ruff==0.17.6 mypy==2.4.1
SMOKE_VENV := build/smoke-venv

# The GPU check: `make gpu-bundle` here gathers the wheels that a stock CUDA PyTorch image lacks (not torch);
# `make gpu-check` there (a CUDA GPU, torch preinstalled, no network) installs them from that folder only, runs
# the CUDA tests, the benches and the CUDA-graph checks, and writes gpu-check.md/.json into $(OUT). Without
# CUDA it is a dry run (the test suite runs one); REQUIRE_CUDA=1 makes that an error instead. Pinned: the versions our tests pass with; fastprogress 1.0.3
# because later ones import python-fasthtml and its web stack. The lent GPU machines' image carries pytest, timm,
# pandas, matplotlib and scipy (.library/device/KINDS.md): the bundle does not override them.
GPU_BUNDLE ?= build/gpu-bundle
OUT ?= build/gpu-check
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_WHEELS := fastai==2.8.12 fastcore==2.2.41 fastprogress==1.0.3 fastdownload==0.0.8 fasttransform==0.0.5 \
	plum-dispatch==2.9.0 beartype==0.23.1 ema-pytorch==0.8.3 torch-ema==0.3
GPU_PLATFORM := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

.PHONY: demo test test-fast bench lint format docs dist smoke clean gpu-bundle gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: Makefile | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PINS)
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.torch-installed
	$(BIN)/pip install --quiet -e '.[dev]' $(TORCH_PINS)
	touch $@

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.dev-installed
	$(BIN)/pip install --quiet -e '.[bench]' $(TORCH_PINS)
	touch $@

$(VENV)/.tools-installed: pyproject.toml $(VENV)/.dev-installed
	$(BIN)/pip install --quiet -e '.[dev,lint,docs]' build 'hatchling>=1.27' $(LINT_PINS) $(TORCH_PINS)
	touch $@

demo: $(VENV)/.dev-installed
	$(BIN)/python -m fastema demo

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest

# The core in seconds: no fastai fits, subprocesses or torch.distributed launches.
test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -m "not slow and not distributed"

bench: $(VENV)/.bench-installed
	$(BIN)/python -m fastema bench --peers --plot docs/benchmark-cpu.png
	$(BIN)/python -m fastema bench --dtype bfloat16 --ema-dtype float32

lint: $(VENV)/.tools-installed
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/mypy

format: $(VENV)/.tools-installed
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

docs: $(VENV)/.tools-installed
	$(BIN)/mkdocs build --strict

dist: $(VENV)/.tools-installed
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist

# The built wheel alone, in a fresh environment with nothing but torch.
smoke: dist
	rm -rf $(SMOKE_VENV)
	$(PYTHON) -m venv $(SMOKE_VENV)
	$(SMOKE_VENV)/bin/pip install --quiet $(SMOKE_TORCH) dist/*.whl
	cd build && $(CURDIR)/$(SMOKE_VENV)/bin/python -I $(CURDIR)/tests/wheel_smoke.py

gpu-bundle:
	rm -rf $(GPU_BUNDLE)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: $(GPU_PLATFORM) -d $(GPU_BUNDLE) $(GPU_WHEELS)
	$(PYTHON) scripts/gpu_check.py --check-bundle $(GPU_BUNDLE)

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py --bundle $(GPU_BUNDLE) --out $(OUT)

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache demo_output

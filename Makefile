# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The torch/torchvision pair known to install and import together on our machines.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PINS)
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.torch-installed
	$(BIN)/pip install --quiet -e '.[dev]' $(TORCH_PINS)
	touch $@

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.dev-installed
	$(BIN)/pip install --quiet -e '.[bench]' $(TORCH_PINS)
	touch $@

demo: $(VENV)/.dev-installed
	$(BIN)/python -m fastema demo

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest

bench: $(VENV)/.bench-installed
	$(BIN)/python -m fastema bench --plot docs/benchmark-cpu.png
	$(BIN)/python -m fastema bench --dtype bfloat16 --ema-dtype float32

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache demo_output

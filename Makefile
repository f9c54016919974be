# Two commands for a newcomer:  `make demo`  and  `make test`.  Each sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet -c constraints.txt
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo up test test-unit system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned, so nothing later pulls another build. PyPI's Linux wheel of torch
# is the multi-GB CUDA build; TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU
# build from PyTorch's index instead (left empty by default: a machine whose pip already finds
# a CPU wheel, or that reaches only PyPI, needs no second index).
TORCH_INDEX ?=
$(VENV)/.torch: constraints.txt | $(BIN)/python
	$(PIP) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch==2.13.0
	touch $@

$(VENV)/.app: pyproject.toml $(VENV)/.torch
	$(PIP) -e '.[embedded]'
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.app
	$(PIP) -e '.[embedded,test,eval]'
	touch $@

# Debian packages the tests use: a real Prometheus scrapes a real worker.
system-deps:
	@command -v prometheus >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

demo: $(VENV)/.app
	$(BIN)/streamrec demo

up: $(VENV)/.app
	$(BIN)/streamrec up

test: $(VENV)/.test system-deps
	$(BIN)/python -m pytest

test-unit: $(VENV)/.test system-deps
	$(BIN)/python -m pytest -m "not integration"

clean:
	rm -rf $(VENV) .streamrec .pytest_cache *.egg-info

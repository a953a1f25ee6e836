# Two commands for a newcomer: `make demo` and `make test`.
# Both create .venv when missing and install in the one order that works:
#   1. torch (kept if the system Python already has one, e.g. a CUDA build on
#      a GPU box; otherwise torch==2.13.0 from pip's configured index: the CUDA
#      build from PyPI on Linux, or CPU-only with TORCH_INDEX=https://download.pytorch.org/whl/cpu),
#   2. deepspeed with --no-build-isolation (it must see the torch above),
#   3. tritium itself, editable, with its extras.
# A stamp file makes re-runs instant until pyproject.toml or setup.py change.

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.tritium-installed
EXTRAS  ?= serve,bench,hf,dev
PIP     := $(BIN)/python -m pip
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# Test processes (pytest-xdist): the interpreter-bound kernel tests are single-threaded, so 2 fill 2 cores.
TEST_WORKERS ?= 2

.PHONY: setup demo demo-quick test test-fast bench bench-quick lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PY) -c "import torch" >/dev/null 2>&1; then \
	    echo "[setup] system torch found: venv sees system site-packages"; \
	    $(PY) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PY) -m venv $(VENV); \
	  fi; \
	fi
	$(PIP) install -q --upgrade pip setuptools wheel
	@if $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
	  echo "[setup] keeping torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
	  $(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"; \
	fi
	$(PIP) install -q --no-build-isolation deepspeed
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tritium demo

demo-quick: $(STAMP)
	$(BIN)/tritium demo --quick

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench-quick: $(STAMP)
	$(BIN)/tritium bench --quick

bench: $(STAMP)
	$(BIN)/tritium bench

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

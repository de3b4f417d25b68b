# The two commands (README): `make demo` and `make test`. Both (re)build .venv only when it is
# missing or pyproject.toml changed since the last install, then run.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed
# Caches live inside the work tree so a CI clone leaves $HOME alone and a rerun reuses them.
export PIP_CACHE_DIR        ?= $(CURDIR)/.cache/pip
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TESSERA_CACHE        ?= $(CURDIR)/.cache/tessera
export RAY_TMPDIR           ?= /tmp/tessera-ray
export OMP_NUM_THREADS      ?= 1

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; tessera needs Python 3.11 (set PYTHON=...)"; exit 1; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade -q pip
	# torch first and on its own: pip then takes the pinned wheels from the local disk.
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tessera demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache runs demo-out

# The two commands (README): `make demo` and `make test`. Both (re)build .venv only when it is
# missing or pyproject.toml changed since the last install, then run.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed
# The third-party OME-Zarr readers the tests check stores with, in their own environment: ome-zarr-py
# pulls s3fs/botocore, whose python-dateutil<3 clashes with the kubernetes client tessera pins.
NGFF_VENV  := .venv-ngff
NGFF_STAMP := $(NGFF_VENV)/.installed
# Caches live inside the work tree so a CI clone leaves $HOME alone and a rerun reuses them.
export PIP_CACHE_DIR        ?= $(CURDIR)/.cache/pip
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TESSERA_CACHE        ?= $(CURDIR)/.cache/tessera
export RAY_TMPDIR           ?= /tmp/tessera-ray
export OMP_NUM_THREADS      ?= 1

.PHONY: demo test test-slow setup clean

setup: $(STAMP) $(NGFF_STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; tessera needs Python 3.11 (set PYTHON=...)"; exit 1; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade -q pip
	# torch first and on its own: pip then takes the pinned wheels from the local disk.
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e ".[dev]"
	@touch $(STAMP)

$(NGFF_STAMP): Makefile
	@test -x $(NGFF_VENV)/bin/python || $(PYTHON) -m venv $(NGFF_VENV)
	$(NGFF_VENV)/bin/pip install -q zarr==3.1.6 numpy==2.4.6 ome-zarr-models==1.7 ome-zarr==0.18.0
	@touch $(NGFF_STAMP)

demo: $(STAMP)
	$(VENV)/bin/tessera demo

test: $(STAMP) $(NGFF_STAMP)
	$(VENV)/bin/python -m pytest -q tests

test-slow: $(STAMP) $(NGFF_STAMP)
	$(VENV)/bin/python -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) $(NGFF_VENV) .pytest_cache runs demo-out

# Everything runs from the checkout's own virtual environment (.venv), so the README's commands are
# self-contained on a machine that has only Python 3.11 and the package registries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install test lint serve bench clean

install:
	@# Keep a torch that is already importable (GPU machines ship their own build); otherwise pin the
	@# CPU release that lies on local disk: an unpinned torch downloads GBs of CUDA build.
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "install: reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[test,bench]"
	@$(PY) -c "import torch, omni2.engine; print('install: ok, torch', torch.__version__)"

test:
	@# One torch thread per test worker: the tiny models are latency-bound and 2 workers x N threads on 2
	@# cores thrash. loadgroup keeps each module that starts an engine (xdist_group) on one test process.
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup tests

lint:
	$(PY) -m ruff check engine stages kernels bench tests

serve:
	$(VENV)/bin/omni2-engine serve

bench:
	$(PY) bench/stages.py --preset tiny

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

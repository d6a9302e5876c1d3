# Everything runs from the checkout's own virtual environment (.venv), so the README's commands are
# self-contained on a machine that has only Python 3.11 and the package registries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install portaudio chromium test lint serve bench clean

install:
	@# Keep a torch that is already importable (GPU machines ship their own build); otherwise pin the
	@# CPU release that lies on local disk: an unpinned torch downloads GBs of CUDA build.
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "install: reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[test,bench,audio,realtime]"
	@$(MAKE) --no-print-directory portaudio
	@$(MAKE) --no-print-directory chromium
	@$(PY) -c "import torch, omni2.engine; print('install: ok, torch', torch.__version__)"

# `chat --mic` needs the PortAudio C library (sounddevice's Linux wheels do not bundle it; macOS/Windows ones do).
# Installed here when apt-get can run without a password; otherwise the exact command is printed. Never fails:
# everything but --mic works without it.
# Looked up, not imported: importing sounddevice initialises PortAudio, whose JACK probe leaves /dev/shm/jack_db-0.
export PORTAUDIO_CHECK := import ctypes.util, importlib.util; assert importlib.util.find_spec("sounddevice") and ctypes.util.find_library("portaudio")
portaudio:
	@if $(PY) -c "$$PORTAUDIO_CHECK" 2>/dev/null; then echo "portaudio: ok (chat --mic can use audio devices)"; \
	else \
	  if command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
	    timeout 120 $$SUDO apt-get install -y --no-install-recommends libportaudio2 >/dev/null 2>&1 || true; \
	  fi; \
	  $(PY) -c "$$PORTAUDIO_CHECK" 2>/dev/null && echo "portaudio: installed libportaudio2" || \
	  echo "portaudio: missing; only 'omni2-engine chat --mic' needs it: sudo apt-get install libportaudio2" \
	       "(Debian/Ubuntu), brew install portaudio (macOS), or your distribution's portaudio package"; \
	fi

# The browser demo's test (tests/engine/serve/test_realtime.py) drives a real headless Chromium through Playwright.
# Playwright's own browser download needs its CDN; Debian's chromium works as well and comes from apt. Installed
# here when apt-get can run without a password; otherwise the test says it was skipped and why. Never fails.
chromium:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: ok (the browser demo is tested)"; \
	else \
	  if command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
	    timeout 300 $$SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
	    { timeout 120 $$SUDO apt-get update >/dev/null 2>&1; \
	      timeout 300 $$SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; } || true; \
	  fi; \
	  command -v chromium >/dev/null 2>&1 && echo "chromium: installed" || \
	  echo "chromium: missing; only the browser demo's test needs it: sudo apt-get install chromium"; \
	fi

test:
	@# One torch thread per test worker: the tiny models are latency-bound and 2 workers x N threads on 2
	@# cores thrash. loadfile keeps each module (and its module-scoped engine or daemon) on one test process.
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n 2 --dist loadfile tests

lint:
	$(PY) -m ruff check engine stages kernels bench tests

serve:
	$(VENV)/bin/omni2-engine serve

bench:
	@# The quick latency sweep (tiny preset, CPU, ~3 min): bench/results/latency-tiny-quick/ gets the JSON and PNGs.
	@# Threads as `serve` gives them (every core per worker; latency.py --threads N to pin): what a user serves with.
	$(PY) bench/latency.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

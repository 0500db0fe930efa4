# make bench | make test | make build | make lint | make gpu-check OUT=dir
# Every target sets up what it needs: a .venv with the requirements, then the in-place build.

PYTHON3 ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
EXT_SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
EXT_STAMP := rnn_fused/.built
CXX_FILES = $(shell find csrc tests/emulation -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: build test bench lint format gpu-check clean

$(PY):
	$(PYTHON3) -m venv $(VENV)

$(DEPS): requirements.txt | $(PY)
	$(PY) -m pip install -r requirements.txt
	touch $@

$(EXT_STAMP): $(DEPS) $(EXT_SOURCES)
	$(PY) setup.py build_ext --inplace
	touch $@

build: $(EXT_STAMP)

# Lint first: CI runs `make test` only, and a style error should fail it in seconds.
test: lint build
	$(PY) -m pytest -q tests

bench: build
	$(PY) benchmarks/bench.py

lint: $(DEPS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_FILES)

format: $(DEPS)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
	$(VENV)/bin/clang-format -i $(CXX_FILES)

# On a GPU machine with python3, torch and nvcc but no network: build in place with the
# machine's own python3, then the CUDA tests, racecheck and the benchmark in stages with
# time limits, writing results into OUT (benchmarks/gpu_check.sh). QUICK=1: the build, the
# fast CUDA tests and the issue-4 rows (a rerun after a fix). SANITIZE=1: the build, then
# compute-sanitizer memcheck and racecheck over every kernel.
gpu-check:
	QUICK=$(QUICK) SANITIZE=$(SANITIZE) bash benchmarks/gpu_check.sh $(OUT)

clean:
	rm -rf build rnn_fused/_C*.so $(EXT_STAMP)

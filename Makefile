# Two commands on a fresh machine: `make demo` (set up, then run the embedded default job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gliograde-installed

.PHONY: demo test test-fast lint bench gpu-check gpu-wheels clean-venv

$(STAMP): requirements/cpu.txt requirements/dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# setuptools >= 77 builds the SPDX license string of pyproject.toml (`-e .` below builds without isolation)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23" "setuptools>=77.0.3"
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gliograde demo

# two pytest-xdist workers (one per core of a CI machine); the tests of each shared trained fixture share a worker
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The inner loop: every test that trains nothing (no fold, no CV, no demo) and needs no GPU. CI runs `make test`.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not gpu"

# The GPU path, proven in one command (<= 8 min on one GPU; writes gpu-check.json; exit 1 with one line without
# CUDA). It runs with the Python that holds the CUDA build of torch ($(GPU_PYTHON)), not the CPU .venv; packages that
# Python lacks come from wheels in .whl/ (`make gpu-wheels` fetches them on a machine with internet).
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/gliograde-gpu-site
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile \
		--no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=src:$(GPU_SITE) $(GPU_PYTHON) -m gliograde.gpucheck --json gpu-check.json

# pure-Python wheels of what a CUDA image with torch usually lacks (CPython 3.12, any Linux)
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl nibabel==5.4.2 monai==1.6.1

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)

# One virtualenv: `make demo` installs jaxtts and its runtime dependencies only (no torch);
# `make test` adds the PyTorch reference stack the tests compare against.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed

.PHONY: setup test test-gpu lint demo clean

$(RUNTIME): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# moshi pins torch<2.10 and torchtune pulls in GPU extras: the parts we use run on torch 2.13.
	$(PY) -m pip install -q --no-deps moshi==0.2.13 torchtune==0.6.1 torchao==0.13.0
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP) lint
	$(PY) -m pytest -q -n 2 --dist loadfile tests  # two workers, each test file on one (its tests in order)

# The tests marked `gpu` (the Pallas kernels compiled through Triton instead of interpreted; see
# tests/conftest.py). Needs no venv: on a GPU machine any python with jax[cuda12|cuda13], flax,
# optax, orbax-checkpoint and pytest will do, e.g. `make test-gpu PY=python3`.
test-gpu:
	JAXTTS_TEST_DEVICE=gpu $(PY) -m pytest -q -m gpu tests

LINT_PATHS := $(wildcard jaxtts pallas_kernels convert tests benchmarks)

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

clean:
	rm -rf $(VENV) .pytest_cache

demo: $(RUNTIME)
	$(VENV)/bin/jaxtts speak --random-weights "Hello from jaxtts." -o demo.wav --max-audio-ms 1600 --seed 0

# Each target bootstraps its own virtual environment in .venv (override with VENV=...).
# torch is pinned to the CPU build that this kind of machine keeps on disk; constraints.txt pins the rest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-gpu demo bench clean

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation -c constraints.txt -e '.[test,data,plot]'
	touch $(STAMP)

venv: $(STAMP)

# The CPU suite on every machine: no GPU is visible to it and DeepSpeed uses its CPU accelerator, so a CUDA
# host neither builds FusedAdam nor needs two GPUs for the two-rank tests.
test: $(STAMP)
	CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu $(PY) -m pytest -q -m "not cuda" tests

# The inner loop: the unit tests, without the end-to-end runs of train.py, a launcher or a tool (marked slow).
test-fast: $(STAMP)
	CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu $(PY) -m pytest -q -m "not cuda and not slow" tests

# The CUDA-only tests (real flash-attn, FlexAttention and torch varlen kernels in fp16/bf16); -rs lists why
# any was skipped (no GPU, flash-attn not installed). .venv holds the CPU torch, so on a GPU machine name its
# own CUDA python instead: make test-gpu GPU_PYTHON=python3 (bench/gpu_check.sh runs the same pytest command).
GPU_PYTHON ?=
test-gpu: $(if $(GPU_PYTHON),,$(STAMP))
	$(or $(GPU_PYTHON),$(PY)) -m pytest -q -rs -m cuda tests

demo: $(STAMP)
	$(PY) tools/demo.py --output out/demo

bench: $(STAMP)
	$(PY) bench/model_throughput.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) out build *.egg-info

# Each target bootstraps its own virtual environment in .venv (override with VENV=...).
# torch is pinned to the CPU build that this kind of machine keeps on disk; constraints.txt pins the rest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation -c constraints.txt -e '.[test,data,plot]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) tools/demo.py --output_dir out/demo

bench: $(STAMP)
	$(PY) bench/model_throughput.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) out build *.egg-info

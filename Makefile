# Two set-up commands for a fresh clone: `make demo` and `make test`.
# Each creates the local virtual environment (.venv) on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.14.1 with torchvision 0.29.1: the pair whose compiled ops (NMS, RoI align) load
	# together; the wheels are CUDA builds and run on CPU-only machines too.
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/scatstore demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --timeout 900

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/scattering.py
	$(PY) benchmarks/encode.py
	$(PY) benchmarks/job_overhead.py
	$(PY) benchmarks/loading.py
	$(PY) benchmarks/entropy_coding.py

clean:
	rm -rf $(VENV) demo_out bench_out

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
	# CPU build of torch first so that no multi-GB CUDA build is pulled in.
	$(PY) -m pip install -q -c constraints.txt torch
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

# Two commands do everything on a fresh machine with Python and pip: `make demo` and `make test`.
# torch is pinned so that a CPU machine takes the small CPU wheel and a GPU machine a matching CUDA one;
# override with `make test TORCH=2.12.0`.
PYTHON ?= python3
TORCH ?= 2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-torch-$(TORCH)
# Where `make demo` writes its stages, report.json and report.png (a re-run reuses finished stages).
DEMO_DIR ?= runs/demo

.PHONY: install test test-gpu demo bench lint clean

install: $(STAMP)

# The editable install compiles csrc/ (when nvcc is found), so kernel sources are prerequisites too.
$(STAMP): pyproject.toml setup.py $(shell find csrc -type f)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	rm -f $(VENV)/.installed-torch-*
	touch $@

test: install
	$(PY) -m pytest

test-gpu: install
	$(PY) -m pytest -m gpu

demo: install
	$(PY) -m fastalign demo --output_dir $(DEMO_DIR)

bench: install
	$(PY) -m bench

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis

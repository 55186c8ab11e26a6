# Two commands do everything on a fresh machine with Python and pip: `make demo` and `make test`.
# torch is pinned so that a CPU machine takes the small CPU wheel and a GPU machine a matching CUDA one;
# override with `make test TORCH=2.12.0`. Everything else installs from constraints.txt, the versions the suite
# passed with; `make test-latest` tries the newest releases instead (docs/development.md: refreshing the pins).
PYTHON ?= python3
TORCH ?= 2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-torch-$(TORCH)
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
# Where `make demo` writes its stages, report.json and report.png (a re-run reuses finished stages).
DEMO_DIR ?= runs/demo

.PHONY: install bwrap test test-gpu test-latest constraints cli-spec demo bench lint clean

install: $(STAMP)

# The editable install compiles csrc/ (when nvcc is found), so kernel sources are prerequisites too.
$(STAMP): pyproject.toml setup.py $(CONSTRAINTS) $(shell find csrc -type f)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==$(TORCH)"
	$(PY) -m pip install -c $(CONSTRAINTS) -e ".[dev]"
	rm -f $(VENV)/.installed-torch-*
	touch $@

test: install bwrap
	$(PY) -m pytest

# The code reward runs model-written programs under bubblewrap; its sandbox tests need it (they fail, never
# skip, without it). As root with apt-get it is installed here; otherwise install the `bubblewrap` package.
bwrap:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y --no-install-recommends bubblewrap || \
	      { apt-get update && apt-get install -y --no-install-recommends bubblewrap; }; \
	  else \
	    echo "make test needs bubblewrap (bwrap) for the code-reward sandbox: sudo apt-get install bubblewrap"; \
	    exit 1; \
	  fi; }

# Not in CI: the suite against the newest releases of everything but torch, in a venv of its own.
test-latest:
	test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install --upgrade pip
	echo "torch==$(TORCH)" > $(LATEST_VENV)/torch-pin.txt
	$(LATEST_PY) -m pip install -c $(LATEST_VENV)/torch-pin.txt "torch==$(TORCH)"
	$(LATEST_PY) -m pip install -c $(LATEST_VENV)/torch-pin.txt --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_PY) -m pip freeze --exclude-editable
	$(LATEST_PY) -m pytest

# After a green `make test-latest`: write its versions into constraints.txt (review the diff, then `make test`).
constraints:
	test -x $(LATEST_PY) || { echo "run make test-latest first"; exit 1; }
	{ echo "# The versions the test suite passed with: \`make test\` and \`make demo\` install from this file (pip -c), so a fresh"; \
	  echo "# machine gets the tested set. torch is pinned by the Makefile (TORCH ?= ...), not here. pyproject.toml keeps the"; \
	  echo "# compatible ranges for users who \`pip install fastalign\`."; \
	  echo "# Resolved and tested on CPython $$($(LATEST_PY) -c 'import platform; print(platform.python_version())'), $$(uname -m) $$(uname -s) (torch $(TORCH)), $$(date -u +%F). Refresh: docs/development.md"; \
	  echo "# (make test-latest, then make constraints)."; \
	  $(LATEST_PY) -m pip freeze --exclude-editable | grep -viE '^(torch|fastalign|pytest-randomly)==' | grep -v '^#'; \
	} > $(CONSTRAINTS)

# After changing a command's flags (or the pins): rewrite the snapshot that answers --help without torch.
cli-spec: install
	$(PY) -c "from fastalign.cli import write_spec; write_spec()"

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
	rm -rf $(VENV) $(LATEST_VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis

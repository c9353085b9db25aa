# make demo / make test create .venv on first use and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo_workdir
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench reproduce clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ih_jax needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The paper's main run (1e6 sequences) on the embedded default features. Rerunning
# resumes an interrupted demo (or just reloads a finished one); `make clean` starts over.
demo: install
	$(VENV)/bin/ih-jax train --config=main \
	    --workdir=$(DEMO_DIR)

test: install
	$(PY) -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

# Everything but the (still CI-run) scientific integration checks.
test-fast: install
	$(PY) -m pytest -n 2 --dist loadgroup -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/ih-jax bench

# One figure of the paper (or all) with its REPORT.md: make reproduce FIGURE=5b SCALE=quick
FIGURE ?= all
SCALE ?= quick
REPRO_DIR ?= repro_$(SCALE)
reproduce: install
	$(VENV)/bin/ih-jax reproduce --figure=$(FIGURE) --scale=$(SCALE) --workdir=$(REPRO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache

# kbatch: two entry points for a fresh machine, `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit k8s-binaries browser bench clean

# The virtual environment, rebuilt when the dependencies change.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip uv >/dev/null
	@# Until renamed, the distribution was "kbatch", which is another project on PyPI.
	@$(BIN)/uv pip uninstall -q --python $(BIN)/python kbatch 2>/dev/null || true
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev]'
	@# Bytecode for kbatch itself too, as a wheel install has: without it every CLI run
	@# compiles its modules anew (about 0.1 s), e.g. where PYTHONDONTWRITEBYTECODE is set.
	@$(BIN)/python -m compileall -q src >/dev/null
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench

typecheck: $(STAMP)
	$(BIN)/mypy

k8s-binaries:
	bash tools/k8s/build.sh >/dev/null
	bash tools/helm/build.sh >/dev/null

# The control plane and helm are built once per machine (cached outside the repo)
# before pytest, so that a cold build does not count against a test's timeout.
test: $(STAMP) lint typecheck k8s-binaries browser
	$(BIN)/pytest -q $(PYTEST_ARGS)

# Debian's chromium for the dashboard's browser tests (quick when it is installed).
browser:
	bash tools/browser/install.sh >/dev/null

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

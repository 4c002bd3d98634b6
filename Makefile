# Two entry points (see README): `make demo` and `make test`.
# Each creates its own virtual environment on first use and installs what it needs:
# the dev tools, the inference extra (the demo and the inference tests use it) and the
# cloud extra (the dashboard).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean yjs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,inference,cloud]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/syncfw demo

lint: $(STAMP)
	$(BIN)/ruff check syncfw tests bench examples
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck yjs
	$(BIN)/python -m pytest -q -m "not slow"

# Real Yjs (npm yjs, from tests/yjs/package-lock.json) for the interop tests,
# installed when absent. Without Node.js those tests skip, saying why.
yjs:
	@if command -v npm >/dev/null 2>&1 && [ ! -d tests/yjs/node_modules/yjs ]; then \
		npm ci --prefix tests/yjs --no-audit --no-fund; fi

bench: $(STAMP)
	$(BIN)/python bench/local_write.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# Two commands on a fresh machine:  make demo   |   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/monolith/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check stem tests benchmarks examples
	$(VENV)/bin/ruff format --check stem tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy stem

test: lint typecheck
	$(PY) scripts/run_tests.py

# The full comparison (Stem on SQLite, Redis, PostgreSQL; Celery and Dramatiq on the same
# Redis; signing costs): about 10 minutes. benchmarks/README.md says what each number means.
bench: $(STAMP)
	$(PY) benchmarks/run.py --all

# The issue's SQLite numbers only: 10,000 no-op tasks, one worker process.
bench-quick: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage* htmlcov

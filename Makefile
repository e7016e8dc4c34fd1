# The two set-up commands of the README: `make load` (main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: load demo test lint bench bench-report bench-smoke load-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,load,bench]'
	touch $(STAMP)

load: $(STAMP)  ## main job: server + Locust load run + report in reports/<timestamp>/
	$(PY) -m loadtests.run $(ARGS)

demo: $(STAMP)  ## start the server, run a few reference-client chats, stop it
	$(PY) -m harness demo

test: $(STAMP) lint  ## ruff, mypy --strict, pytest with coverage
	$(PY) -m pytest --cov --cov-report=term-missing:skip-covered $(PYTEST_ARGS); \
	  rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(PY) -m ruff check registry harness loadtests benchmarks tests
	$(PY) -m mypy registry harness loadtests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks.run $(ARGS)

bench-report: $(STAMP)  ## redraw benchmarks/REPORT.md and plots from the JSON results
	$(PY) -m benchmarks.run --report-only

bench-smoke: $(STAMP)
	$(PY) -m benchmarks.run --smoke

load-smoke: $(STAMP)  ## CI: ~50 users for ~20 s, a short distributed run, a short 2-node run
	$(PY) -m loadtests.run --users 50 --duration 20
	$(PY) -m loadtests.run --users 20 --duration 10 --processes 2
	@if command -v redis-server >/dev/null 2>&1; then \
	  echo "$(PY) -m loadtests.run --users 20 --duration 10 --nodes 2"; \
	  $(PY) -m loadtests.run --users 20 --duration 10 --nodes 2; \
	else echo "load-smoke: --nodes 2 run skipped: redis-server not installed (apt-get install redis-server)"; fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage

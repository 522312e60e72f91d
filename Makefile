# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint clean venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	-$(PY) -c "from cost_models import kernels; kernels.main()"  # numba's cache, so no plan compiles
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m planner.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup tests

test-fast: $(STAMP)
	$(PY) -m pytest -m "not tier3 and not slow" -q -n 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check specs cost_models planner runtime tests
	$(VENV)/bin/mypy specs cost_models

clean:
	rm -rf $(VENV) build *.egg-info

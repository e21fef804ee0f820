# Two commands: `make train` (quickstart) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train test test-slow lint format clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"

# One resolver pass over everything, constrained to the known-good set.
$(STAMP): $(PY) pyproject.toml requirements/constraints.txt
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	$(PY) -m pip check
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m src.train experiment=quickstart $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src scripts tests experiments

# Two test processes (each module's tests stay in one, with its fixtures); TEST_JOBS=1
# runs them all in one process, as plain `pytest` does.
TEST_JOBS ?= 2
TEST_PAR  := $(if $(filter-out 0 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadscope,)

test: $(STAMP) lint
	$(PY) -m pytest -q $(TEST_PAR) $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(TEST_PAR) $(ARGS)

format: $(STAMP)
	$(PY) -m ruff format src scripts tests experiments
	$(PY) -m ruff check --fix src scripts tests experiments

clean:
	rm -rf $(VENV) runs outputs multirun wandb .cache

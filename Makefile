# cardseal: `make run` starts the gateway on embedded defaults; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEV_DIR ?= .dev

.PHONY: venv test lint typecheck unit run walkthrough bench fuzz clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(PY) -m ruff check src tests benchmarks

typecheck: venv
	$(PY) -m mypy

unit: venv
	$(PY) -m pytest

test: lint typecheck unit

# The 60-second walkthrough: init -> seal -> open, on a throwaway folder.
walkthrough: venv
	rm -rf $(DEV_DIR)/walkthrough
	$(VENV)/bin/cardseal init --dir $(DEV_DIR)/walkthrough
	printf '%s' '{"card_number": "4111 1111 1111 1111", "expiry_date": "12/29", "cvv": "123"}' \
	  | $(VENV)/bin/cardseal --config $(DEV_DIR)/walkthrough/cardseal.toml seal --amount 1999 --currency USD \
	  | $(VENV)/bin/cardseal --config $(DEV_DIR)/walkthrough/cardseal.toml open -

run: walkthrough

bench: venv
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(DEV_DIR) .pytest_cache .mypy_cache .ruff_cache .hypothesis

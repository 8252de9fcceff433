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
	$(PY) -m ruff check src tests benchmarks fuzz

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

# The gateway on embedded defaults (local KMS, SQLite, sandbox processor, HTTPS).
run: venv
	@test -f $(DEV_DIR)/gateway/cardseal.toml || $(VENV)/bin/cardseal init --dir $(DEV_DIR)/gateway
	@$(VENV)/bin/cardseal --config $(DEV_DIR)/gateway/cardseal.toml db upgrade > /dev/null
	@echo "cardseal gateway: https://127.0.0.1:8443  (CA: $(DEV_DIR)/gateway/tls/cert.pem)"
	@echo "pay against it from another shell:"
	@echo "  echo '{\"card_number\": \"4242424242424242\", \"expiry_date\": \"12/29\", \"cvv\": \"123\"}' | $(VENV)/bin/cardseal --config $(DEV_DIR)/gateway/cardseal.toml pay --amount 1999 --currency USD"
	$(VENV)/bin/cardseal --config $(DEV_DIR)/gateway/cardseal.toml serve

# Benchmarks against the seed's flow and the raw cryptography, same run (~8 min; see
# benchmarks/README.md). BENCH_ARGS passes options, e.g. BENCH_ARGS="--quick --rows seal,open".
bench: venv
	$(PY) -m benchmarks $(BENCH_ARGS)

# The long runs (not in `make test`): a million fuzzed inputs over the token, meta_data and
# request-body parsers, then a 10-minute soak of `cardseal serve` under mixed traffic. Figures
# in fuzz/reports/latest.md; see fuzz/README.md.
fuzz: venv
	$(PY) -m ruff check fuzz
	$(PY) -m mypy --strict fuzz
	$(PY) fuzz/run.py --inputs 1000000
	$(PY) fuzz/soak.py --minutes 10

clean:
	rm -rf $(VENV) $(DEV_DIR) .pytest_cache .mypy_cache .ruff_cache .hypothesis

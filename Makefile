# kavach: two commands on a fresh Debian/Ubuntu machine -- `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint typecheck bench clean

install:  ## Debian packages (when root) + .venv with kavach[all,dev]; idempotent
	@bash scripts/install.sh

demo: install  ## a real command in the strongest available sandbox: output, score, verdict
	@$(PY) examples/demo.py

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

typecheck: install
	$(VENV)/bin/mypy --strict src

test: install lint typecheck  ## the whole suite, ruff and mypy --strict
	bash scripts/test.sh

# mitmproxy (a benchmark peer) pins an older cryptography, so it lives in its own venv.
BENCH_PEERS := .bench-peers

bench: install  ## benchmarks (not part of `make test`), with their peers installed first
	@[ -x $(BENCH_PEERS)/bin/mitmdump ] || { python3 -m venv $(BENCH_PEERS) && $(BENCH_PEERS)/bin/pip install -q mitmproxy; }
	@for b in benchmarks/bench_*.py; do echo "== $$b"; PATH="$$PATH:$$PWD/$(BENCH_PEERS)/bin" $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

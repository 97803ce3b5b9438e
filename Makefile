# Portunus developer entry points. Everything runs from the checkout; data under ./var.
PY      ?= /usr/bin/python3.11
VENV    ?= .venv
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.installed

.PHONY: run run-standalone test test-all test-slow test-packages bench bench-quick lint deps clean deb rpm reference screenshots

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

deps: $(STAMP)

## run: the appliance with embedded defaults, data under ./var (no root needed)
run: $(STAMP)
	$(BIN)/portunus-server --data-dir ./var serve

## run-standalone: forward from examples/standalone.toml with no control plane
run-standalone: $(STAMP)
	$(BIN)/portunus-standalone --config examples/standalone.toml

## test: unit + end-to-end tests (the default CI run)
test: $(STAMP)
	$(BIN)/python -m pytest -q

## test-slow: the long end-to-end tests (200 MiB transfers, 10k idle connections)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not packaging"

## test-packages: build .deb/.rpm and install them in a booted Debian root (needs root)
test-packages: $(STAMP)
	$(BIN)/python -m pytest -q -m packaging tests/packaging

## screenshots: refresh docs/screenshots/ from the Web UI browser tests (needs chromium)
screenshots: $(STAMP)
	PORTUNUS_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -q tests/e2e/ui/test_ui_browser.py

## bench: ratio benchmarks against direct, HAProxy, nginx and socat (writes bench/RESULTS.md)
bench: $(STAMP)
	bench/peers/install
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	bench/peers/install
	$(BIN)/python -m bench.run --quick

lint: $(STAMP)
	$(BIN)/ruff check portunus tests bench
	$(BIN)/mypy

## reference: regenerate docs/reference/cli.md from the click commands (a test checks it)
reference: $(STAMP)
	$(BIN)/python packaging/scripts/clidoc.py markdown > docs/reference/cli.md

deb rpm: $(STAMP)
	$(MAKE) -C packaging $@

clean:
	rm -rf $(VENV) var build dist *.egg-info

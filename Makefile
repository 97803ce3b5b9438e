# Portunus developer entry points. Everything runs from the checkout; data under ./var.
PY      ?= /usr/bin/python3.11
VENV    ?= .venv
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.installed

.PHONY: run run-standalone test test-bench test-all test-slow test-packages test-python-relay test-asan bench bench-quick lint deps clean deb rpm reference screenshots

# setup.py builds the optional native relay (portunus/shard/_relay.c) when a C
# compiler is present; without one the install still succeeds (Python relay).
$(STAMP): pyproject.toml setup.py $(wildcard portunus/shard/*.c portunus/shard/*.h)
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

## test-python-relay: the end-to-end tests with the native relay off (PORTUNUS_NATIVE=0)
test-python-relay: $(STAMP)
	PORTUNUS_NATIVE=0 $(BIN)/python -m pytest -q tests/e2e

## test-asan: the TCP and UDP data-plane tests against an AddressSanitizer build of the native relay
ASAN_TESTS = tests/unit/shard/test_pumps.py tests/unit/shard/test_native_tcp.py tests/unit/shard/test_native_udp.py \
	tests/unit/shard/test_native_thread.py tests/e2e/udp \
	tests/e2e/standalone/test_transfer.py \
	tests/e2e/standalone/test_backpressure.py tests/e2e/standalone/test_client_reset.py \
	tests/e2e/standalone/test_halfclose_refused.py tests/e2e/standalone/test_metrics.py \
	tests/e2e/features/test_sni.py tests/e2e/features/test_proxy_protocol.py tests/e2e/features/test_failover.py
test-asan: $(STAMP)
	CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g -O1" $(BIN)/pip install -q -e . --no-deps
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		$(BIN)/python -m pytest -q -p no:cacheprovider $(ASAN_TESTS); rc=$$?; \
		$(BIN)/pip install -q -e . --no-deps; exit $$rc

## test-bench: the benchmark harnesses' own checks (report rows, one tiny run of each)
test-bench: $(STAMP)
	PYTHONPATH=$(CURDIR) $(BIN)/python -m pytest -q -p no:cacheprovider bench

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
	$(BIN)/ruff format --check portunus tests bench
	$(BIN)/mypy

## reference: regenerate docs/reference/cli.md from the click commands, the message tables
## of docs/rpc.md from portunus/ipc and the metric tables of docs/reference/metrics.md
## from portunus/metrics/catalog.py (tests check all three)
reference: $(STAMP)
	$(BIN)/python packaging/scripts/clidoc.py markdown > docs/reference/cli.md
	$(BIN)/python packaging/scripts/ipcdoc.py write
	$(BIN)/python packaging/scripts/metricsdoc.py

deb rpm: $(STAMP)
	$(MAKE) -C packaging $@

clean:
	rm -rf $(VENV) var build dist *.egg-info

# `make run` and `make test` do all set-up on a fresh machine (Python 3.11+, Node 20 + npm).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test check lint bench fuzz clean chromium haproxy

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install for `make run`; the test extra on top for `make test`.
$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.run-installed

# The npm test dependencies, pinned by their lockfile: server-everything (an upstream), the TypeScript
# SDK clients, and the conformance suite with the Node 22 it needs (the `node` package's preinstall
# fetches the binary for this platform into tests/node/node_modules/node/bin/node).
tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund
	touch $@

run: $(VENV)/.run-installed
	$(BIN)/approvals serve --config config/gateway.toml

LINTED := approvals tests $(wildcard bench)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

# The inbox's browser tests drive Debian's Chromium (Playwright's own browser download is not used).
chromium:
	command -v chromium || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

# The replica tests (tests/test_replicas.py) and bench/scale.py put Debian's HAProxy in front of
# several gateways, with the config the docs give (docs/haproxy.cfg).
haproxy:
	command -v haproxy || test -x /usr/sbin/haproxy || ($(SUDO) apt-get update && $(SUDO) apt-get install -y haproxy)

test: $(VENV)/.test-installed tests/node/node_modules/.installed chromium haproxy lint
	$(BIN)/python -m pytest -q -n 2

# The benchmark (bench/run.py): the gateway beside itself with metrics on (--no-metrics-row skips
# it), a direct connection, FastMCP's proxy and mcp-proxy.
# Then the scale-out run (bench/scale.py): 1, 2 and 4 replicas on PostgreSQL behind HAProxy, and
# --workers; it needs PostgreSQL on 127.0.0.1:5432 (or APPROVALS_BENCH_POSTGRES).
bench: $(VENV)/.test-installed haproxy
	$(BIN)/python bench/run.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/remember_session.py

# The fuzzer (bench/fuzz.py): 20,000 seeded malformed requests against a real gateway; any 500 fails.
fuzz: $(VENV)/.test-installed
	$(BIN)/python bench/fuzz.py

check: $(VENV)/.run-installed
	$(BIN)/approvals check --config config/gateway.toml

clean:
	rm -rf $(VENV) tests/node/node_modules .pytest_cache .mypy_cache .ruff_cache

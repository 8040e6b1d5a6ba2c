# phonebind developer commands. `make run` and `make test` are all a newcomer needs:
# both install what they use into .venv (and node_modules for buf) first.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PY      = $(BIN)/python
PROTOS  = $(wildcard protos/phonebind/v1/*.proto)

# Where `make run` keeps its data and the SMS it "sends".
RUN_DIR ?= var
# Another address: `make run LISTEN=127.0.0.1:50052` (or PHONEBIND_LISTEN).
LISTEN  ?= $(or $(PHONEBIND_LISTEN),127.0.0.1:50051)
# Where `make console` serves the reviewers' web console.
CONSOLE_LISTEN ?= 127.0.0.1:8080

.PHONY: install proto lint breaking run console console-screenshots browser test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: client/pyproject.toml server/pyproject.toml console/pyproject.toml requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ./client -e ./server -e ./console -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

# Regenerates the committed Python code (messages, stubs and .pyi type stubs)
# into the client package, so `from phonebind.v1 import ...` works unchanged.
proto: install
	$(PY) -m grpc_tools.protoc -I protos --python_out=client --pyi_out=client \
		--grpc_python_out=client $(PROTOS)

lint: install node_modules/.installed
	$(BIN)/ruff check client/phonebind_client server console tests bench scripts examples
	$(BIN)/ruff format --check client/phonebind_client server console tests bench scripts examples
	$(BIN)/bandit -q -r server/phonebind_server -x server/phonebind_server/domain/cn_provinces.py
	$(BIN)/bandit -q -r console/phonebind_console
	$(BIN)/mypy --config-file server/pyproject.toml server/phonebind_server/domain tests/fake_store.py
	node_modules/.bin/buf lint
	sh scripts/buf-breaking.sh

# Wire-breaking changes to the contract, against where this branch left main
# (a clone of main: against its previous commit). BUF_BREAKING_AGAINST=<commit>
# picks another base. Rules: buf.yaml `breaking`.
breaking: node_modules/.installed
	sh scripts/buf-breaking.sh

run: install
	mkdir -p $(RUN_DIR)
	$(BIN)/phonebind-server migrate --database-url sqlite:///$(abspath $(RUN_DIR))/phonebind.db
	$(BIN)/phonebind-server serve --dev --listen $(LISTEN) \
		--database-url sqlite:///$(abspath $(RUN_DIR))/phonebind.db \
		--sms-gateway file:$(abspath $(RUN_DIR))/sms.jsonl

# The reviewers' web console in development mode, beside `make run`'s server:
# sign in as anyone at http://$(CONSOLE_LISTEN).
console: install
	$(BIN)/phonebind-console --dev --target $(LISTEN) --listen $(CONSOLE_LISTEN)

# promtool, which the tests of deploy/prometheus run: from PATH, or unpacked
# from Debian's prometheus package with apt-get (scripts/install-promtool.sh).
$(BIN)/promtool: | $(VENV)/.installed
	sh scripts/install-promtool.sh $@

# Headless Chromium, its driver and CJK fonts for the console's browser tests
# (Debian packages, installed with apt-get when missing).
browser:
	sh scripts/install-browser.sh

test: install lint $(BIN)/promtool $(BIN)/h2load browser
	$(BIN)/pytest

# docs/console-queue.png and docs/console-detail.png, from the browser tests.
console-screenshots: install browser
	PHONEBIND_CONSOLE_SCREENSHOTS=docs $(BIN)/pytest -q tests/test_console_browser.py -k "sqlite and approves"

# h2load, which `make bench` drives GetAccount and the reference server with:
# from PATH, or unpacked from Debian's nghttp2-client package (scripts/install-h2load.sh).
$(BIN)/h2load: | $(VENV)/.installed
	sh scripts/install-h2load.sh $@

# Fresh servers (SQLite; PostgreSQL with 1 and 2 workers; both in production
# mode) against a bare grpc.aio health server, with h2load and phonebind-load;
# writes docs/benchmarks.md and .json. BENCH_ARGS=--quick for a smoke run;
# PostgreSQL from PHONEBIND_BENCH_DATABASE_URL (default: local `test`).
bench: install $(BIN)/h2load
	$(PY) bench/run_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) node_modules $(RUN_DIR) .pytest_cache .ruff_cache .hypothesis .mypy_cache

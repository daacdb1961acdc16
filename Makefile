# Two commands: `make serve` and `make test`. Everything else is a convenience.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/deskgate.dev.toml

.PHONY: serve test install install-test migrate clean install-system bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

migrate: install
	mkdir -p var
	$(BIN)/deskgate --config $(CONFIG) db upgrade

serve: migrate
	$(BIN)/deskgate --config $(CONFIG) serve

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# As root: user, /opt/deskgate, /etc/deskgate, the systemd unit, `deskgate db upgrade`
# (README "Run under systemd"). Also the upgrade: run it again from the new checkout.
install-system:
	systemd/install.sh

# Throughput, latency and memory against the bare aiosmtpd sink (bench/README.md).
# Needs Postfix's smtp-source (Debian package postfix); BENCH_QUICK=1 for a short run.
bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var/*.sqlite3*

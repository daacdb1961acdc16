# Two commands: `make serve` and `make test`. Everything else is a convenience.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/deskgate.dev.toml

.PHONY: serve test install install-test migrate clean install-system bench drill

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

# The crash and outage drills (tests/drills) at full size, figures printed (README
# "Reliability"). `make test` runs them at CI size. Root: the disk-full drill mounts a tmpfs,
# the database drill runs a private PostgreSQL cluster as the postgres user.
DRILL_MAILS ?= 2000
DRILL_KILLS ?= 10
DRILL_OUTAGE_S ?= 10
DRILL_FULL_MAILS ?= 200
drill: install-test
	DESKGATE_DRILL_MAILS=$(DRILL_MAILS) DESKGATE_DRILL_KILLS=$(DRILL_KILLS) \
	DESKGATE_DRILL_OUTAGE_S=$(DRILL_OUTAGE_S) DESKGATE_DRILL_FULL_MAILS=$(DRILL_FULL_MAILS) \
	$(BIN)/python -m pytest -s -q -p no:cacheprovider --timeout=3600 -m drill tests/drills \
	$(PYTEST_ARGS)

# As root: user, /opt/deskgate, /etc/deskgate, the systemd unit, `deskgate db upgrade`
# (README "Run under systemd"). Also the upgrade: run it again from the new checkout.
install-system:
	systemd/install.sh

# Throughput, latency and memory against the bare aiosmtpd sink (bench/README.md).
# Needs Postfix's smtp-source (Debian package postfix); BENCH_QUICK=1 for a short run.
bench: install
	$(BIN)/python bench/run.py

# Coverage-guided fuzzing of the parser (tests/fuzz/fuzz_parse.py, atheris) for FUZZ_SECONDS.
# Findings land in tests/data/fuzz/ (replayed by tests/unit/test_fuzz.py); the run's summary
# is var/fuzz/summary.txt. FUZZ_ARGS passes libFuzzer options (e.g. -jobs=2).
FUZZ_SECONDS ?= 120
.PHONY: fuzz
fuzz: install-test
	$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/pip install --quiet '.[fuzz]'
	mkdir -p var/fuzz/corpus var/fuzz/artifacts
	$(BIN)/python tests/fuzz/fuzz_parse.py var/fuzz/corpus -max_total_time=$(FUZZ_SECONDS) \
		-print_final_stats=1 $(FUZZ_ARGS) 2>var/fuzz/last-run.log \
		|| { tail -40 var/fuzz/last-run.log; exit 1; }
	@for f in var/fuzz/artifacts/*; do [ -e "$$f" ] || continue; \
		mv "$$f" "tests/data/fuzz/atheris-$$(basename "$$f").eml"; echo "finding: $$f"; done
	@grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units)" var/fuzz/last-run.log || true
	@cat var/fuzz/summary.txt

clean:
	rm -rf $(VENV) var/*.sqlite3*

# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install sysdeps demo test lint types unit bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# iproute2 and nftables for the multi-host tests and benchmark, ffmpeg, chromium and curl for
# the gateway's clients (as root on Debian, if missing)
sysdeps:
	.ci/sysdeps

demo: $(STAMP)
	$(BIN)/python -m difs_p2p.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

types: $(STAMP)
	$(BIN)/mypy

# two workers, a test file at a time each (pytest-xdist); `pytest tests/x.py` runs one file
unit: $(STAMP) sysdeps
	$(BIN)/pytest -q -n 2 --dist loadfile

test: lint types unit

bench: $(STAMP) sysdeps
	$(BIN)/python -m bench
	$(BIN)/python -m bench.small
	$(BIN)/python -m bench.repair
	$(BIN)/python -m bench.multihost
	$(BIN)/python -m bench.gateway

fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,fuzz]'
	$(BIN)/python -m fuzz all

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info

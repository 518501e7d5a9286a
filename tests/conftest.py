"""What `make test` asks of the suite beyond a plain `pytest` run.

Tests that drive programs nobody here wrote (curl, ffmpeg, Chromium, promtool, rclone,
s3cmd, the s3-tests suite, network namespaces) skip with a reason when one is missing, so
that `pytest tests/x.py` works on any machine. `make test` installs them all
(`.ci/sysdeps`, the dev extra, `make s3tests-venv`) and sets ``DIFS_TESTS_REQUIRE_ALL=1``:
then a skip is a failure, and a real-client test cannot pass by checking nothing.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

REQUIRE_ALL = os.environ.get("DIFS_TESTS_REQUIRE_ALL") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """Under ``DIFS_TESTS_REQUIRE_ALL=1``, report a skipped test as failed, with its reason."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under make test, which installs what it needs: {reason}"

"""The segment service's rule without sockets: the per-connection request rate bucket (the
serving itself runs end to end in test_peer.py, test_transfer.py and test_stalls.py)."""

from __future__ import annotations

import pytest

from difs_p2p.service import RateBucket


@pytest.mark.parametrize(
    ("rate", "burst", "times", "allowed"),
    [
        (10.0, 3.0, [0.0, 0.0, 0.0, 0.0], [True, True, True, False]),  # the burst, then no
        (10.0, 3.0, [0.0, 0.0, 0.0, 0.1], [True, True, True, True]),  # a token back in 0.1 s
        (10.0, 3.0, [0.0, 0.0, 0.0, 0.05], [True, True, True, False]),  # half a token is none
        (1.0, 1.0, [0.0, 0.5, 1.0, 100.0, 100.0], [True, False, True, True, False]),
        (1.0, 0.5, [0.0, 10.0], [False, False]),  # a burst under one request allows none
    ],
)
def test_requests_over_the_rate_are_refused_not_delayed(
    rate: float, burst: float, times: list[float], allowed: list[bool]
) -> None:
    """A full bucket allows a burst; then one request per 1/rate seconds, never more than
    the burst saved up however long the connection was idle."""
    bucket = RateBucket(rate, burst, burst, 0.0)
    assert [bucket.allow(t) for t in times] == allowed

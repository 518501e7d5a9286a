"""Per-address rules of the DHT, pure (a clock and a secret passed in): return-routability
tokens (docs/PROTOCOL.md, "Return-routability tokens"), the addresses that proved they
receive where they say, and the per-sender write limit.

A source that has not proved its address gets no reply larger than its request: it proves
it by answering our identify challenge there (``mark_proven``) or by sending back a token
we gave that address (``address_proven``). The tokens peers gave us are kept for our
requests to them (``remember_token``/``token_from``).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable

from difs_p2p import dhtwire
from difs_p2p.addresses import address_group, is_loopback
from difs_p2p.config import DhtConfig

# Return-routability tokens: HMAC-SHA-256 of the source address and the period, cut.
_TOKEN_DOMAIN = b"difs-token-v1\x00"
# Tokens of other peers held, oldest dropped first.
_TOKENS_MAX = 10_000
# Senders with a write bucket; all are forgotten at once beyond this.
_WRITE_BUCKETS_MAX = 10_000


class AddressGuard:
    """Tokens, proven addresses and write buckets of one DHT node."""

    def __init__(
        self, config: DhtConfig, clock: Callable[[], float], secret: bytes | None = None
    ) -> None:
        self.config = config
        self.clock = clock
        self._token_key = secret if secret is not None else os.urandom(32)
        # addresses that answered our identify challenge: they receive at that address,
        # so they get full replies without a token
        self._proven: dict[tuple[str, int], None] = {}
        # address -> (token it gave us, when): sent with our requests to it
        self._tokens: dict[tuple[str, int], tuple[bytes, float]] = {}
        self._write_buckets: dict[str, tuple[float, float]] = {}

    def mark_proven(self, addr: tuple[str, int]) -> None:
        """``addr`` answered our identify challenge."""
        self._proven[addr] = None

    def forget_proven(self) -> None:
        """Forget every proven address (with the verified contacts, when they overflow)."""
        self._proven.clear()

    def _token(self, addr: tuple[str, int], period: int) -> bytes:
        message = b"%b%d\x00%b:%d" % (_TOKEN_DOMAIN, period, addr[0].encode(), addr[1])
        return hmac.digest(self._token_key, message, "sha256")[: dhtwire.TOKEN_SIZE]

    def token_for(self, addr: tuple[str, int]) -> bytes:
        """The token we give ``addr``: valid in this period and the next."""
        return self._token(addr, int(self.clock() // self.config.token_period))

    def address_proven(self, addr: tuple[str, int], token: object) -> bool:
        """Whether ``addr`` proved it receives there: it answered our identify challenge,
        or its request carries a token we gave that address (this period or the last)."""
        if addr in self._proven:
            return True
        if not (isinstance(token, bytes) and len(token) == dhtwire.TOKEN_SIZE):
            return False
        period = int(self.clock() // self.config.token_period)
        return hmac.compare_digest(token, self._token(addr, period)) or hmac.compare_digest(
            token, self._token(addr, period - 1)
        )

    def remember_token(self, addr: tuple[str, int], token: bytes) -> None:
        """Keep the token ``addr`` gave us, for our next requests to it."""
        if len(self._tokens) >= _TOKENS_MAX:
            self._tokens.pop(next(iter(self._tokens)))  # the oldest
        self._tokens.pop(addr, None)
        self._tokens[addr] = (bytes(token), self.clock())

    def token_from(self, addr: tuple[str, int]) -> bytes | None:
        """The token ``addr`` gave us, while it is surely still valid there."""
        held = self._tokens.get(addr)
        if held is None:
            return None
        token, at = held
        if self.clock() - at >= self.config.token_period:
            del self._tokens[addr]
            return None
        return token

    def limited(self, ip: str | None) -> bool:
        """Whether per-address limits apply to ``ip`` (loopback is exempt unless
        ``limit_loopback``)."""
        if ip is None:
            return False
        return self.config.limit_loopback or not is_loopback(ip)

    def allow_write(self, ip: str | None, now: float) -> bool:
        """Per-sender token bucket for store/add_entries requests (an IPv6 sender's
        bucket is its /64's: one host's usual share)."""
        if not self.limited(ip) or ip is None:
            return True
        ip = address_group(ip) or ip
        rate, burst = self.config.write_rate, self.config.write_burst
        tokens, last = self._write_buckets.get(ip, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if len(self._write_buckets) > _WRITE_BUCKETS_MAX:
            self._write_buckets.clear()
        if tokens < 1:
            self._write_buckets[ip] = (tokens, now)
            return False
        self._write_buckets[ip] = (tokens - 1, now)
        return True

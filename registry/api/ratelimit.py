"""Failed-authentication rate limit (in process; one API process per limiter), and who the client is.

Failures are counted per client address and per (address, token id), the id being the public part
of a token. Over the limit, an address is refused further attempts with that id, and attempts with
malformed or unknown ids or wrong secrets; a token that verifies is still answered, so clients that
share an address (NAT, a proxy) are not locked out by one guesser. An id over its own limit is
refused before its secret is checked: a 200 among the 429s would tell a guesser it guessed right.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque
from collections.abc import Iterable

from loreg.registry.errors import TooManyRequestsError

MAX_KEYS = 100_000


class FailureLimiter:
    def __init__(self, max_failures: int, window_s: float, clock=time.monotonic):  # type: ignore[no-untyped-def]
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[tuple[str, str | None], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str | None]) -> deque[float]:
        now = self.clock()
        q = self._failures.setdefault(key, deque())
        while q and now - q[0] > self.window_s:
            q.popleft()
        return q

    def _refuse_if_over(self, key: tuple[str, str | None]) -> None:
        q = self._recent(key)
        if len(q) >= self.max_failures:
            retry = max(1, int(self.window_s - (self.clock() - q[0])) + 1)
            raise TooManyRequestsError(
                "too many failed authentications; wait before retrying", detail={"retry_after": retry}
            )

    def check(self, address: str, token_id: str | None = None) -> None:
        """Before verifying: refuse an id over its limit from ``address``, or, with no id (a
        malformed token), any attempt from an address over its limit."""
        with self._lock:
            self._refuse_if_over((address, token_id))

    def failed(self, address: str, token_id: str | None = None) -> None:
        """Record a failure; raises TooManyRequestsError when ``address`` was already over its limit."""
        with self._lock:
            if len(self._failures) > MAX_KEYS:  # bound memory under a spray of addresses
                self._failures.clear()
            try:
                self._refuse_if_over((address, None))
            finally:
                now = self.clock()
                self._recent((address, None)).append(now)
                if token_id is not None:
                    self._recent((address, token_id)).append(now)


class TrustedProxies:
    """The client's address: the peer's, or, when the peer is a configured trusted proxy, the
    nearest address in X-Forwarded-For that is not a trusted proxy (the hops to its left are
    whatever the client wrote)."""

    def __init__(self, cidrs: Iterable[str]):
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def trusts(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def client(self, peer: str, forwarded_for: list[str]) -> str:
        if not self.networks or not self.trusts(peer):
            return peer
        address = peer
        hops = [h.strip() for value in forwarded_for for h in value.split(",")]
        for hop in reversed(hops):
            try:
                address = str(ipaddress.ip_address(hop))
            except ValueError:
                return address  # a hop only a proxy could have written is garbled: stop at that proxy
            if not self.trusts(address):
                return address
        return address

"""Failed-authentication rate limit per client address (in process; one API process per limiter)."""

from __future__ import annotations

import threading
import time
from collections import deque

from loreg.registry.errors import TooManyRequestsError


class FailureLimiter:
    def __init__(self, max_failures: int, window_s: float, clock=time.monotonic):  # type: ignore[no-untyped-def]
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str) -> deque[float]:
        now = self.clock()
        q = self._failures.setdefault(key, deque())
        while q and now - q[0] > self.window_s:
            q.popleft()
        return q

    def check(self, key: str) -> None:
        with self._lock:
            q = self._recent(key)
            if len(q) >= self.max_failures:
                retry = max(1, int(self.window_s - (self.clock() - q[0])) + 1)
                raise TooManyRequestsError(
                    "too many failed authentications; wait before retrying", detail={"retry_after": retry}
                )

    def failed(self, key: str) -> None:
        with self._lock:
            q = self._recent(key)
            q.append(self.clock())
            if len(self._failures) > 100_000:  # bound memory under a spray of addresses
                self._failures.clear()

"""Crash points for fault-injection tests (a testing hook; inert unless LOREG_FAULT is set).

``LOREG_FAULT=<point>`` makes the server process die with ``os._exit(137)`` (no cleanup, no
response, as a SIGKILL or power loss would) when it reaches that point. tests/faults/ uses it to
check that a crash there leaves no partial version and that a retry succeeds. Points:

    after_blob_put   a blob is in the store, its database row not yet written
    after_commit     a version is committed, the response not yet sent
    mid_merge        an export worker has merged its first tensor: it stops there (its lease
                     still renewed) for the test to SIGKILL it (``pause_point``)

Never set it in production.
"""

from __future__ import annotations

import os
import threading

POINTS = frozenset({"after_blob_put", "after_commit", "mid_merge"})


def crash_point(name: str) -> None:
    """Die at once if LOREG_FAULT names this point."""
    if os.environ.get("LOREG_FAULT") == name:
        os._exit(137)


def pause_point(name: str) -> None:
    """Block this thread for good if LOREG_FAULT names this point (the test kills the process)."""
    if os.environ.get("LOREG_FAULT") == name:
        threading.Event().wait()

"""The in-process worker pool: a wake reaches every idle worker, whatever the others do meanwhile."""

from __future__ import annotations

import threading

from loreg.registry.services.jobs import WorkerPool
from tests.support.server import poll_until

IDLE_POLL_S = 3600.0  # far past every deadline below: only a wake can make a worker look again
DEADLINE_S = 30.0


class QueueLooker:
    """Counts its looks at the queue (which is empty: None); with ``hold``, its first look waits for it."""

    def __init__(self, hold: threading.Event | None = None):
        self.hold = hold
        self.looks = 0
        self.looking = threading.Event()

    def run_once(self) -> str | None:
        self.looks += 1
        self.looking.set()
        if self.hold is not None and self.looks == 1:
            self.hold.wait(DEADLINE_S)
        return None


def test_a_wake_is_not_lost_by_a_worker_that_was_looking_at_the_queue_while_another_woke() -> None:
    """Worker B looks at the queue (finds it empty) while a job is requested and worker A wakes for it;
    B must look again at once, not sleep through the poll interval because A took the wake."""
    release_b = threading.Event()
    a, b = QueueLooker(), QueueLooker(hold=release_b)
    made = iter([a, b])
    pool = WorkerPool(lambda: next(made), 2, poll_s=IDLE_POLL_S)
    pool.start()
    try:
        poll_until(lambda: a.looks == 1 and b.looking.is_set(), "both workers' first look at the queue", DEADLINE_S)
        pool.notify()  # a job was queued while B was still reading the (then empty) queue
        poll_until(lambda: a.looks == 2, "the idle worker to wake", DEADLINE_S)
        release_b.set()  # B's read ends empty: it must not sleep now
        poll_until(lambda: b.looks == 2, "the worker that was reading the queue to look again", DEADLINE_S)
    finally:
        release_b.set()
        pool.shutdown()
    assert all(not t.is_alive() for t in pool.threads)


def test_each_wake_reaches_every_idle_worker() -> None:
    lookers = [QueueLooker() for _ in range(3)]
    made = iter(lookers)
    pool = WorkerPool(lambda: next(made), len(lookers), poll_s=IDLE_POLL_S)
    pool.start()
    try:
        poll_until(lambda: all(w.looks == 1 for w in lookers), "every worker's first look", DEADLINE_S)
        for n in (2, 3):
            pool.notify()
            poll_until(lambda n=n: all(w.looks == n for w in lookers), f"every worker's look {n}", DEADLINE_S)
    finally:
        pool.shutdown()

"""Request bodies handed to blocking code in a worker thread, with bounded memory.

The event loop reads the body and feeds a small queue; the worker reads it as a file. Memory stays
at a few chunks whatever the body size, and hashing and storage writes never block the loop.

Uploads take a slot (``UploadSlots``) and run in a thread pool of their own, so however many
clients upload, or stall mid-body, the framework's shared pool (authentication, every sync route)
stays free for reads. A stalled body is cut by the limits middleware's idle timeout, which ends the
worker's stream; the slot is given back only when the worker has cleaned up.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.requests import ClientDisconnect, Request

from loreg.registry.errors import DigestMismatchError, RequestInvalidError, UploadsBusyError

T = TypeVar("T")
QUEUE_CHUNKS = 32


class _Aborted(Exception):
    pass


class BodyReader:
    """The request body as the worker thread reads it: the chunks the event loop queued, handed on
    as they came (``read1``: no copy) or gathered to a size (``read``)."""

    def __init__(self, q: queue.Queue[Any], on_take: Callable[[], None]):
        self._q = q
        self._rest: bytes = b""
        self._eof = False
        self._on_take = on_take

    def readable(self) -> bool:
        return True

    def read1(self, n: int = -1) -> bytes:
        """The rest of the current chunk, or the next one (at most ``n`` bytes); b"" at the end."""
        while not self._rest and not self._eof:
            item = self._q.get()
            self._on_take()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                raise item
            else:
                self._rest = item
        if n < 0 or n >= len(self._rest):
            data, self._rest = self._rest, b""
        else:  # a piece of a chunk: only the sniff and part boundaries ask for one
            data, self._rest = self._rest[:n], self._rest[n:]
        return data

    def read(self, n: int = -1) -> bytes:
        pieces: list[bytes] = []
        got = 0
        while (n < 0 or got < n) and (data := self.read1(-1 if n < 0 else n - got)):
            pieces.append(data)
            got += len(data)
        return b"".join(pieces)


class UploadSlots:
    """At most ``limit`` uploads at once, each on a thread of the uploads' own pool.

    Over the limit an upload waits for a slot, without a thread and without reading its body, for
    at most ``wait_s``, and at most ``QUEUE_FACTOR * limit`` uploads wait; beyond either bound it is
    refused (503 UPLOADS_BUSY with Retry-After). A short bounded queue absorbs bursts (a CI fleet
    pushing at once); an unbounded one would let stalled clients hold connections without end.
    Used from the event loop only.
    """

    QUEUE_FACTOR = 4
    RETRY_AFTER_S = 5

    def __init__(self, limit: int, wait_s: float):
        self.limit = limit
        self.wait_s = wait_s
        self.in_use = 0
        self.waiting = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free = asyncio.Semaphore(limit)
        self.limiter = anyio.CapacityLimiter(limit)

    def usage(self) -> dict[str, Any]:
        return {"in_use": self.in_use, "limit": self.limit, "waiting": self.waiting,
                "exhausted": self.in_use >= self.limit}

    def _busy(self) -> UploadsBusyError:
        return UploadsBusyError(
            f"all {self.limit} upload slots are in use; retry shortly",
            detail={"limit": self.limit, "retry_after": self.RETRY_AFTER_S},
        )

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop and self.in_use == 0 and self.waiting == 0:
            # a server runs one loop; tests drive one app from several in turn
            self._loop, self._free, self.limiter = loop, asyncio.Semaphore(self.limit), anyio.CapacityLimiter(self.limit)
        if self.in_use >= self.limit and self.waiting >= self.QUEUE_FACTOR * self.limit:
            raise self._busy()
        self.waiting += 1
        try:
            await asyncio.wait_for(self._free.acquire(), self.wait_s)
        except TimeoutError:
            raise self._busy() from None
        finally:
            self.waiting -= 1
        self.in_use += 1

    def release(self) -> None:
        self.in_use -= 1
        self._free.release()


async def consume_body(request: Request, consumer: Callable[[BodyReader], T]) -> T:
    """Run ``consumer(stream)`` on an upload thread while the loop streams the request body into it.

    Raises:
        UploadsBusyError: no upload slot came free in time (nothing was read).
    """
    slots: UploadSlots = request.app.state.upload_slots
    await slots.acquire()
    try:
        return await _consume(request, consumer, slots.limiter)
    finally:
        slots.release()


async def _consume(request: Request, consumer: Callable[[BodyReader], T], limiter: anyio.CapacityLimiter) -> T:
    loop = asyncio.get_running_loop()
    q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_CHUNKS)
    space = asyncio.Event()
    waiting = [False]  # the loop waits for room: only then does a take wake it (a syscall each)

    def took() -> None:
        if waiting[0]:
            waiting[0] = False
            loop.call_soon_threadsafe(space.set)

    reader = BodyReader(q, took)
    task = asyncio.ensure_future(anyio.to_thread.run_sync(consumer, reader, limiter=limiter))
    task.add_done_callback(lambda _t: space.set())

    async def put(item: Any) -> bool:
        while True:
            if task.done():
                return False
            try:
                q.put_nowait(item)
                return True
            except queue.Full:
                space.clear()
                waiting[0] = True
                if q.full() and not task.done():
                    await space.wait()

    try:
        async for chunk in request.stream():
            if chunk and not await put(chunk):
                break
        else:
            await put(None)
    except ClientDisconnect:
        await _abort(put, task, "client disconnected")
        raise RequestInvalidError("the client disconnected during the upload") from None
    except Exception as exc:  # a cut body (idle timeout, size): the worker cleans up before the answer
        await _abort(put, task, str(exc))
        raise
    except BaseException as exc:
        await put(_Aborted(str(exc)))
        raise
    return await task


async def _abort(put: Callable[[Any], Any], task: asyncio.Future[Any], why: str) -> None:
    await put(_Aborted(why))
    try:
        await task
    except Exception:  # noqa: BLE001 - the worker's error is a consequence of the abort
        pass


DOWNLOAD_CHUNK = 4 << 20
SEND_PIECE = 1 << 20
UNSATISFIABLE = (-1, -1)
_INT_RANGE = re.compile(r"(\d{1,18})-(\d{0,18})")
_SUFFIX_RANGE = re.compile(r"-(\d{1,18})")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``[start, end)`` a Range header asks of ``size`` bytes, as RFC 9110 section 14 reads it.

    None: serve the whole representation (200), as the RFC allows or requires for no header, an
    unknown unit, a malformed set, or several ranges (a multipart answer is not worth its cost here).
    ``UNSATISFIABLE``: answer 416. Suffix ranges (``bytes=-500``: the last 500 bytes) are served.
    """
    if not header:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    spec = spec.strip()
    if m := _SUFFIX_RANGE.fullmatch(spec):
        length = int(m.group(1))
        if length == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - length), size
    if m := _INT_RANGE.fullmatch(spec):
        start = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else None
        if last is not None and last < start:
            return None  # invalid, so ignored (section 14.1.1)
        if start >= size:
            return UNSATISFIABLE
        return start, size if last is None else min(last + 1, size)
    return None


async def verified_download(stream: Any, digest: str) -> AsyncIterator[bytes]:
    """Yield a stored blob's bytes, hashing them; the last piece is held back until the digest
    checks out: with Content-Length already sent, only a short body tells the client the bytes
    were bad (the status line cannot change any more).

    A worker thread fills one buffer (``DOWNLOAD_CHUNK``) straight from the store and hashes it;
    the loop copies it out in ``SEND_PIECE`` pieces (the server may keep what it is given). A
    sync iterator would cost a thread hop per piece; a fresh buffer per read, or botocore's
    ``read`` with its layers of small reads, cost more CPU than the sha256 itself, and pieces
    much larger than the socket's send buffer are copied again into the transport's buffer
    (bench/server_cpu.py).
    """
    h = hashlib.sha256()
    view = memoryview(bytearray(DOWNLOAD_CHUNK))

    def fill() -> int:
        got = 0
        while got < len(view) and (n := stream.readinto(view[got:])):
            got += n
        h.update(view[:got])
        return got

    held = b""
    with stream:
        while n := await anyio.to_thread.run_sync(fill):
            for start in range(0, n, SEND_PIECE):
                if held:
                    yield held
                held = bytes(view[start : min(start + SEND_PIECE, n)])
    if "sha256:" + h.hexdigest() != digest:
        raise DigestMismatchError(f"stored blob {digest} is corrupt", detail={"digest": digest})
    if held:
        yield held

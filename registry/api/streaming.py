"""Request bodies handed to blocking code in a worker thread, with bounded memory.

The event loop reads the body and feeds a small queue; the worker reads it as a file. Memory stays
at a few chunks whatever the body size, and hashing and storage writes never block the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import queue
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from loreg.registry.errors import DigestMismatchError, RequestInvalidError

T = TypeVar("T")
QUEUE_CHUNKS = 32


class _Aborted(Exception):
    pass


class QueueReader(io.RawIOBase):
    def __init__(self, q: queue.Queue[Any], on_take: Callable[[], None]):
        self._q = q
        self._buf = memoryview(b"")
        self._eof = False
        self._on_take = on_take

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf and not self._eof:
            item = self._q.get()
            self._on_take()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                raise item
            else:
                self._buf = memoryview(item)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


async def consume_body(request: Request, consumer: Callable[[io.BufferedReader], T]) -> T:
    """Run ``consumer(stream)`` in a worker thread while the loop streams the request body into it."""
    loop = asyncio.get_running_loop()
    q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_CHUNKS)
    space = asyncio.Event()

    def took() -> None:
        loop.call_soon_threadsafe(space.set)

    reader = io.BufferedReader(QueueReader(q, took), buffer_size=1 << 20)
    task = asyncio.ensure_future(run_in_threadpool(consumer, reader))
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
                if q.full() and not task.done():
                    await space.wait()

    try:
        async for chunk in request.stream():
            if chunk and not await put(chunk):
                break
        else:
            await put(None)
    except ClientDisconnect:
        await put(_Aborted("client disconnected"))
        try:
            await task
        except Exception:
            pass
        raise RequestInvalidError("the client disconnected during the upload") from None
    except BaseException as exc:
        await put(_Aborted(str(exc)))
        raise
    return await task


DOWNLOAD_CHUNK = 1 << 20


def verified_download(stream: Any, digest: str) -> Iterator[bytes]:
    """Yield a stored blob's bytes, hashing them; the last chunk is held back until the digest
    checks out: with Content-Length already sent, only a short body tells the client the bytes
    were bad (the status line cannot change any more)."""
    h = hashlib.sha256()
    held = b""
    with stream as f:
        while chunk := f.read(DOWNLOAD_CHUNK):
            h.update(chunk)
            if held:
                yield held
            held = chunk
    if "sha256:" + h.hexdigest() != digest:
        raise DigestMismatchError(f"stored blob {digest} is corrupt", detail={"digest": digest})
    if held:
        yield held

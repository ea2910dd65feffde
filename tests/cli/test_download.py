"""The client's download pipeline (client._receive): one thread receives, another hashes and writes.

A connection that breaks leaves every byte received so far in the partial file (the next pull resumes
from there); a failing write stops the download with that error, without a deadlock.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
from collections.abc import Iterator

import httpx
import pytest

from loreg.cli.client import _receive

CHUNKS = [os.urandom(n) for n in (1, 1 << 20, 12345, 0, 3 << 20, 7)]


def test_every_byte_is_written_and_hashed_in_order() -> None:
    out, hasher, advanced = io.BytesIO(), hashlib.sha256(), []
    got = _receive(iter(CHUNKS), out, hasher, advanced.append)
    data = b"".join(CHUNKS)
    assert got == len(data) == sum(advanced)
    assert out.getvalue() == data
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_broken_connection_keeps_what_arrived_for_the_resume() -> None:
    def broken() -> Iterator[bytes]:
        yield from CHUNKS[:3]
        raise httpx.ReadError("connection reset")

    out, hasher = io.BytesIO(), hashlib.sha256()
    with pytest.raises(httpx.ReadError):
        _receive(broken(), out, hasher, lambda n: None)
    assert out.getvalue() == b"".join(CHUNKS[:3])


def test_a_failing_write_stops_the_download_with_its_error() -> None:
    class Full(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            if self.tell() > (1 << 20):
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    sent = []

    def endless() -> Iterator[bytes]:
        while len(sent) < 10_000:  # stops early once the writer failed, long before this
            sent.append(1)
            yield b"x" * 65536

    with pytest.raises(OSError) as info:
        _receive(endless(), Full(), hashlib.sha256(), lambda n: None)
    assert info.value.errno == errno.ENOSPC
    assert len(sent) < 10_000

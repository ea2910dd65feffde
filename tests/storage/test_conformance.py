"""One BlobStore conformance suite, run on every backend (``blob_store`` is parametrized), then
what only one backend has: local staging and ENOSPC, S3 multipart aborts, timeouts and presigning.

"Nothing kept" after a refused put means: the blob is absent, no blob is listed, and no staging
is left (locally: uploads/ is empty; on S3: no open multipart upload).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import EndpointConnectionError

from loreg.registry.errors import (
    BlobNotFoundError,
    DigestInvalidError,
    DigestMismatchError,
    InsufficientStorageError,
    LoregError,
    RequestInvalidError,
    SizeMismatchError,
    StorageTimeoutError,
    StorageUnavailableError,
)
from loreg.registry.storage import local as local_module
from loreg.registry.storage.protocol import CHUNK_SIZE, BlobStat, BlobStore, RangeStream
from loreg.registry.storage.factory import store_from_url
from loreg.registry.storage.local import LocalBlobStore
from tests.storage.conftest import TEST_PART_SIZE
from tests.support.moto import REGION, MotoServer, free_port, make_bucket
from tests.support.proxy import TcpProxy

MIB = 1024 * 1024
SMALL = b"loreg blob \x00\xff" * 100
LARGE_SIZE = 11 * MIB + 12_345  # three parts of TEST_PART_SIZE on S3


def sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def pattern(size: int) -> bytes:
    """Deterministic bytes that differ from offset to offset (so a misplaced range shows)."""
    block = hashlib.sha256(str(size).encode()).digest() * (MIB // 32)
    whole, rest = divmod(size, len(block))
    return b"".join([bytes([i % 251]) + block[1:] for i in range(whole)]) + block[:rest]


@pytest.fixture(scope="module")
def large() -> bytes:
    return pattern(LARGE_SIZE)


@pytest.fixture(params=["small", "large"])
def body(request: pytest.FixtureRequest) -> bytes:
    return SMALL if request.param == "small" else request.getfixturevalue("large")


class Boom(Exception):
    """What a client's stream raises mid-upload (a dropped connection, say)."""


class FailingStream(io.RawIOBase):
    def __init__(self, data: bytes, fail_after: int):
        self._data = io.BytesIO(data)
        self._fail_after = fail_after

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._data.tell() >= self._fail_after:
            raise Boom("connection dropped")
        want = min(len(buffer), self._fail_after - self._data.tell())
        chunk = self._data.read(want)
        buffer[: len(chunk)] = chunk
        return len(chunk)


def all_digests(store: BlobStore) -> list[str]:
    return [stat.digest for stat in store.iter_digests()]


@pytest.fixture
def nothing_kept(request: pytest.FixtureRequest, blob_store: BlobStore) -> Callable[[str], None]:
    def check(digest: str) -> None:
        assert not blob_store.exists(digest)
        assert digest not in all_digests(blob_store)
        if isinstance(blob_store, LocalBlobStore):
            uploads = blob_store.root / "uploads"
            assert not uploads.exists() or list(uploads.iterdir()) == []
        else:
            s3 = request.getfixturevalue("s3")
            assert s3.list_multipart_uploads(Bucket=blob_store.bucket).get("Uploads", []) == []

    return check


# -- conformance: both backends ------------------------------------------------------------------


def test_store_satisfies_the_protocol(blob_store: BlobStore) -> None:
    assert isinstance(blob_store, BlobStore)


@pytest.mark.parametrize("declare_size", [True, False], ids=["sized", "unsized"])
def test_put_then_read_back_round_trips(blob_store: BlobStore, body: bytes, declare_size: bool) -> None:
    digest = sha(body)
    stat = blob_store.put(io.BytesIO(body), digest, len(body) if declare_size else None)
    assert (stat.digest, stat.size) == (digest, len(body))
    assert blob_store.exists(digest)
    assert blob_store.stat(digest).size == len(body)
    with blob_store.open(digest) as stream:
        assert hashlib.sha256(stream.read()).hexdigest() == digest.removeprefix("sha256:")
    assert blob_store.read_range(digest, 0, 8) == body[:8]
    assert all_digests(blob_store) == [digest]


def test_put_file_stores_the_file_as_its_blob(blob_store: BlobStore, body: bytes, tmp_path: Path) -> None:
    digest = sha(body)
    path = tmp_path / "merged.safetensors"
    path.write_bytes(body)
    stat = blob_store.put_file(path, digest, len(body))
    assert (stat.digest, stat.size) == (digest, len(body))
    assert blob_store.stat(digest).size == len(body)
    with blob_store.open(digest) as stream:
        assert stream.read() == body
    assert all_digests(blob_store) == [digest]


def test_put_file_of_a_stored_blob_is_harmless(blob_store: BlobStore, tmp_path: Path) -> None:
    digest = sha(SMALL)
    blob_store.put(io.BytesIO(SMALL), digest, len(SMALL))
    path = tmp_path / "again"
    path.write_bytes(SMALL)
    assert blob_store.put_file(path, digest, len(SMALL)).size == len(SMALL)
    assert blob_store.read_range(digest, 0, len(SMALL)) == SMALL
    assert all_digests(blob_store) == [digest]


def test_put_file_of_another_size_keeps_nothing(
    blob_store: BlobStore, tmp_path: Path, nothing_kept: Callable[[str], None]
) -> None:
    digest = sha(SMALL)
    path = tmp_path / "short"
    path.write_bytes(SMALL[:-1])
    with pytest.raises(SizeMismatchError):
        blob_store.put_file(path, digest, len(SMALL))
    nothing_kept(digest)


def test_put_empty_blob(blob_store: BlobStore) -> None:
    digest = sha(b"")
    assert blob_store.put(io.BytesIO(b""), digest, 0).size == 0
    assert blob_store.stat(digest).size == 0
    with blob_store.open(digest) as stream:
        assert stream.read() == b""
    assert blob_store.read_range(digest, 0, 10) == b""
    assert blob_store.read_range(digest, 0, 0) == b""


@pytest.mark.parametrize("size", [TEST_PART_SIZE - 1, TEST_PART_SIZE, TEST_PART_SIZE + 1, 2 * TEST_PART_SIZE])
def test_put_at_the_part_size_boundary(blob_store: BlobStore, size: int) -> None:
    data = pattern(size)
    digest = sha(data)
    blob_store.put(io.BytesIO(data), digest, None)
    assert blob_store.read_range(digest, size - 3, size + 3) == data[-3:]
    assert blob_store.stat(digest).size == size


def test_large_blob_reads_back_across_part_boundaries(blob_store: BlobStore, large: bytes) -> None:
    digest = sha(large)
    blob_store.put(io.BytesIO(large), digest, len(large))
    for edge in (TEST_PART_SIZE, 2 * TEST_PART_SIZE, CHUNK_SIZE):
        assert blob_store.read_range(digest, edge - 5, edge + 5) == large[edge - 5 : edge + 5]
    with blob_store.open(digest, TEST_PART_SIZE - 1) as stream:
        assert stream.read() == large[TEST_PART_SIZE - 1 :]


def test_digest_mismatch_keeps_nothing(blob_store: BlobStore, body: bytes, nothing_kept: Callable[[str], None]) -> None:
    claimed = sha(body)
    tampered = body + b"oh no"
    with pytest.raises(DigestMismatchError) as caught:
        blob_store.put(io.BytesIO(tampered), claimed, len(tampered))
    assert caught.value.detail["actual"] == sha(tampered)
    nothing_kept(claimed)
    nothing_kept(sha(tampered))


def test_body_longer_than_declared_keeps_nothing_and_is_not_read_to_the_end(
    blob_store: BlobStore, body: bytes, nothing_kept: Callable[[str], None]
) -> None:
    declared = len(body) - 1000  # large: past two parts, so an S3 multipart upload is open by then
    stream = io.BytesIO(body)
    with pytest.raises(SizeMismatchError):
        blob_store.put(stream, sha(body), declared)
    assert stream.tell() <= declared + 1
    nothing_kept(sha(body))


def test_body_shorter_than_declared_keeps_nothing(
    blob_store: BlobStore, body: bytes, nothing_kept: Callable[[str], None]
) -> None:
    with pytest.raises(SizeMismatchError):
        blob_store.put(io.BytesIO(body), sha(body), len(body) + 1)
    nothing_kept(sha(body))


def test_stream_failing_midway_keeps_nothing(
    blob_store: BlobStore, body: bytes, nothing_kept: Callable[[str], None]
) -> None:
    # Large: fails after two parts were read, so an S3 multipart upload is open by then.
    fail_after = len(body) // 2 if len(body) < TEST_PART_SIZE else 2 * TEST_PART_SIZE + MIB // 2
    with pytest.raises(Boom):
        blob_store.put(FailingStream(body, fail_after), sha(body), len(body))  # type: ignore[arg-type]
    nothing_kept(sha(body))


def test_repeated_put_of_the_same_bytes_is_harmless(blob_store: BlobStore, body: bytes) -> None:
    digest = sha(body)
    blob_store.put(io.BytesIO(body), digest, len(body))
    again = blob_store.put(io.BytesIO(body), digest, None)
    assert (again.digest, again.size) == (digest, len(body))
    assert all_digests(blob_store) == [digest]
    assert blob_store.read_range(digest, 0, len(body)) == body


def test_wrong_bytes_for_a_stored_digest_leave_the_blob_intact(blob_store: BlobStore) -> None:
    digest = sha(SMALL)
    blob_store.put(io.BytesIO(SMALL), digest, len(SMALL))
    with pytest.raises(DigestMismatchError):
        blob_store.put(io.BytesIO(SMALL[::-1]), digest, len(SMALL))
    with pytest.raises(SizeMismatchError):
        blob_store.put(io.BytesIO(SMALL + b"x"), digest, len(SMALL))
    assert blob_store.read_range(digest, 0, len(SMALL) + 1) == SMALL


BAD_DIGESTS = [
    "sha256:baddigeststring",
    "sha256:" + "A" * 64,
    "sha256:" + "0" * 63,
    "sha256:" + "0" * 65,
    "sha512:" + "0" * 64,
    "0" * 64,
    "sha256:" + "0" * 64 + "\n",
    " sha256:" + "0" * 64,
    "",
    "sha256:../../../../etc/passwd",
    "../blobs/sha256/00/" + "0" * 64,
    "sha256:" + "0" * 30 + "/../" + "0" * 30,
    "sha256:" + "0" * 62 + "\x00a",
]
OPERATIONS: dict[str, Callable[[BlobStore, str], object]] = {
    "put": lambda store, digest: store.put(io.BytesIO(b"x"), digest, 1),
    "open": lambda store, digest: store.open(digest),
    "read_range": lambda store, digest: store.read_range(digest, 0, 1),
    "exists": lambda store, digest: store.exists(digest),
    "stat": lambda store, digest: store.stat(digest),
    "delete": lambda store, digest: store.delete(digest),
    "local_path": lambda store, digest: store.local_path(digest),
    "presign_get": lambda store, digest: store.presign_get(digest),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_invalid_digest_strings_are_refused(blob_store: BlobStore, operation: str, tmp_path: Path) -> None:
    for bad in BAD_DIGESTS:
        with pytest.raises(DigestInvalidError):
            OPERATIONS[operation](blob_store, bad)
    assert all_digests(blob_store) == []
    assert {p.name for p in tmp_path.iterdir()} <= {"store"}


def test_missing_blob(blob_store: BlobStore) -> None:
    digest = sha(b"never stored")
    assert not blob_store.exists(digest)
    for call in (
        lambda: blob_store.open(digest),
        lambda: blob_store.open(digest, 3, 3),
        lambda: blob_store.read_range(digest, 0, 10),
        lambda: blob_store.stat(digest),
    ):
        with pytest.raises(BlobNotFoundError):
            call()
    blob_store.delete(digest)  # a missing blob is not an error


EDGES = [
    (0, None, slice(0, None)),
    (0, 0, slice(0, 0)),
    (0, 1, slice(0, 1)),
    (7, 8, slice(7, 8)),
    (len(SMALL) - 1, None, slice(len(SMALL) - 1, None)),
    (len(SMALL) - 1, len(SMALL), slice(len(SMALL) - 1, len(SMALL))),
    (len(SMALL), None, slice(len(SMALL), None)),
    (len(SMALL), len(SMALL), slice(0, 0)),
    (len(SMALL), len(SMALL) + 10, slice(0, 0)),
    (len(SMALL) + 10, None, slice(0, 0)),
    (10, 10**12, slice(10, None)),
]


@pytest.mark.parametrize(("start", "end", "expected"), EDGES, ids=[f"{s}-{e}" for s, e, _ in EDGES])
def test_ranged_reads_at_the_edges(blob_store: BlobStore, start: int, end: int | None, expected: slice) -> None:
    digest = sha(SMALL)
    blob_store.put(io.BytesIO(SMALL), digest, len(SMALL))
    with blob_store.open(digest, start, end) as stream:
        assert stream.read() == SMALL[expected]
    if end is not None:
        assert blob_store.read_range(digest, start, end) == SMALL[expected]


@pytest.mark.parametrize(("start", "end"), [(-1, None), (-1, 5), (5, 4), (1, -1)])
def test_reversed_or_negative_ranges_are_refused(blob_store: BlobStore, start: int, end: int | None) -> None:
    digest = sha(SMALL)
    blob_store.put(io.BytesIO(SMALL), digest, len(SMALL))
    with pytest.raises(RequestInvalidError):
        blob_store.open(digest, start, end)


def test_open_stream_reads_in_pieces_and_closes(blob_store: BlobStore) -> None:
    digest = sha(SMALL)
    blob_store.put(io.BytesIO(SMALL), digest, len(SMALL))
    stream = blob_store.open(digest, 2, 12)
    assert stream.read(3) == SMALL[2:5]
    buffer = bytearray(4)
    assert stream.readinto(buffer) == 4
    assert bytes(buffer) == SMALL[5:9]
    assert stream.read() == SMALL[9:12]
    assert stream.read(5) == b""
    stream.close()
    assert stream.closed


def test_open_stream_reads_into_a_buffer_straight_from_its_source(
    blob_store: BlobStore, large: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pull path reads whole blobs with readinto: the bytes land in its buffer from the file
    or the S3 response itself, never through read(n) and a copy (bench/server_cpu.py)."""
    digest = sha(large)
    blob_store.put(io.BytesIO(large), digest, len(large))

    def no_read(self: RangeStream, size: int | None = -1) -> bytes:
        raise AssertionError("readinto went through read()")

    monkeypatch.setattr(RangeStream, "read", no_read)
    view = memoryview(bytearray(len(large)))
    got = 0
    with blob_store.open(digest, 5) as stream:
        while n := stream.readinto(view[got:]):
            got += n
        assert stream.readinto(bytearray(8)) == 0
    assert got == len(large) - 5
    assert view[:got] == large[5:]


def test_a_source_that_ends_early_is_refused_by_readinto() -> None:
    source = io.BytesIO(b"0123")
    stream = RangeStream(source.read, 10, readinto=source.readinto)
    buffer = bytearray(16)
    assert stream.readinto(buffer) == 4
    with pytest.raises(StorageUnavailableError):
        stream.readinto(buffer)


def test_iter_digests_lists_every_blob_once(blob_store: BlobStore) -> None:
    blobs = [SMALL, b"", b"x", SMALL * 3]
    for data in blobs:
        blob_store.put(io.BytesIO(data), sha(data), len(data))
    listed = {stat.digest: stat for stat in blob_store.iter_digests()}
    assert set(listed) == {sha(data) for data in blobs}
    assert all(listed[sha(data)].size == len(data) for data in blobs)
    blob_store.delete(sha(b"x"))
    assert sha(b"x") not in all_digests(blob_store)
    assert not blob_store.exists(sha(b"x"))


def test_stat_reports_size_and_a_utc_time(blob_store: BlobStore) -> None:
    digest = sha(SMALL)
    before = datetime.now(UTC) - timedelta(minutes=5)
    blob_store.put(io.BytesIO(SMALL), digest, len(SMALL))
    stat = blob_store.stat(digest)
    assert isinstance(stat, BlobStat)
    assert stat.size == len(SMALL)
    assert stat.modified is not None and stat.modified.utcoffset() == timedelta(0)
    assert stat.modified > before


def test_deleted_blob_can_be_stored_again(blob_store: BlobStore) -> None:
    digest = sha(SMALL)
    blob_store.put(io.BytesIO(SMALL), digest, len(SMALL))
    blob_store.delete(digest)
    with pytest.raises(BlobNotFoundError):
        blob_store.open(digest)
    blob_store.put(io.BytesIO(SMALL), digest, len(SMALL))
    assert blob_store.read_range(digest, 0, 4) == SMALL[:4]


def test_negative_declared_size_is_refused(blob_store: BlobStore, nothing_kept: Callable[[str], None]) -> None:
    with pytest.raises(RequestInvalidError):
        blob_store.put(io.BytesIO(b""), sha(b""), -1)
    nothing_kept(sha(b""))


# -- local folder only ---------------------------------------------------------------------------


@pytest.fixture
def local_store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "store")


def test_local_layout_is_the_content_address(local_store: LocalBlobStore) -> None:
    digest = sha(SMALL)
    local_store.put(io.BytesIO(SMALL), digest, len(SMALL))
    hexdigest = digest.removeprefix("sha256:")
    path = local_store.root / "blobs" / "sha256" / hexdigest[:2] / hexdigest
    assert path.read_bytes() == SMALL
    assert local_store.local_path(digest) == path
    assert list((local_store.root / "uploads").iterdir()) == []
    assert local_store.presign_get(digest) is None
    with pytest.raises(BlobNotFoundError):
        local_store.local_path(sha(b"other"))


def test_local_put_file_moves_the_file_into_place_without_a_copy(local_store: LocalBlobStore, tmp_path: Path) -> None:
    digest = sha(SMALL)
    path = tmp_path / "out.bin"
    path.write_bytes(SMALL)
    inode = path.stat().st_ino
    local_store.put_file(path, digest, len(SMALL))
    assert not path.exists()
    assert local_store.local_path(digest).stat().st_ino == inode
    assert list((local_store.root / "uploads").glob("*")) == []


def test_local_out_of_space_is_insufficient_storage_and_removes_the_temp_file(
    local_store: LocalBlobStore, large: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = 0
    real_write = local_module._write_all

    def write_until_full(fd: int, data: bytes) -> None:
        nonlocal written
        if written + len(data) > 3 * MIB:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written += len(data)
        real_write(fd, data)

    monkeypatch.setattr(local_module, "_write_all", write_until_full)
    with pytest.raises(InsufficientStorageError):
        local_store.put(io.BytesIO(large), sha(large), len(large))
    assert list((local_store.root / "uploads").iterdir()) == []
    assert not local_store.exists(sha(large))
    monkeypatch.setattr(local_module, "_write_all", real_write)
    local_store.put(io.BytesIO(SMALL), sha(SMALL), len(SMALL))  # keeps serving once space is back
    assert local_store.read_range(sha(SMALL), 0, 4) == SMALL[:4]


def test_local_failed_puts_leak_no_file_descriptors(local_store: LocalBlobStore) -> None:
    local_store.put(io.BytesIO(SMALL), sha(SMALL), len(SMALL))
    baseline = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(Boom):
            local_store.put(FailingStream(SMALL, 100), sha(SMALL[::-1]), len(SMALL))  # type: ignore[arg-type]
        with pytest.raises(DigestMismatchError):
            local_store.put(io.BytesIO(SMALL), sha(b"x"), None)
        with local_store.open(sha(SMALL), 1, 5) as stream:
            stream.read()
    assert len(os.listdir("/proc/self/fd")) == baseline


def test_local_cleanup_staging_removes_only_stale_files(local_store: LocalBlobStore) -> None:
    uploads = local_store.root / "uploads"
    uploads.mkdir(parents=True)
    stale, fresh = uploads / "a", uploads / "b"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"in progress")
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).timestamp()
    os.utime(stale, (hour_ago, hour_ago))
    assert local_store.cleanup_staging(datetime.now(UTC) - timedelta(minutes=10)) == 1
    assert [p.name for p in uploads.iterdir()] == ["b"]
    assert local_store.cleanup_staging(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert list(uploads.iterdir()) == []
    with pytest.raises(ValueError):
        local_store.cleanup_staging(datetime.now())


def test_local_cleanup_staging_on_a_new_store_is_a_no_op(local_store: LocalBlobStore) -> None:
    assert local_store.cleanup_staging(datetime.now(UTC)) == 0
    assert list(local_store.iter_digests()) == []


def test_local_listing_skips_stray_files(local_store: LocalBlobStore) -> None:
    digest = sha(SMALL)
    local_store.put(io.BytesIO(SMALL), digest, len(SMALL))
    hexdigest = digest.removeprefix("sha256:")
    (local_store.root / "blobs" / "sha256" / hexdigest[:2] / "notes.txt").write_text("stray")
    wrong_fan = "ff" if hexdigest[:2] != "ff" else "00"
    (local_store.root / "blobs" / "sha256" / wrong_fan).mkdir()
    (local_store.root / "blobs" / "sha256" / wrong_fan / hexdigest).write_bytes(SMALL)
    assert all_digests(local_store) == [digest]


# -- S3 only ---------------------------------------------------------------------------------------


def s3_store(endpoint_url: str, bucket: str, **options: Any) -> Any:
    from loreg.registry.storage.s3 import S3BlobStore

    return S3BlobStore(bucket, endpoint_url=endpoint_url, region=REGION, **options)


@pytest.fixture
def s3_blob_store(moto_server: MotoServer, s3: Any) -> Iterator[Any]:
    bucket = f"loreg-s3-{os.urandom(8).hex()}"
    make_bucket(moto_server.endpoint_url, bucket, client=s3)
    store = s3_store(moto_server.endpoint_url, bucket, prefix="/team/", part_size=TEST_PART_SIZE)
    yield store
    store.close()


def test_s3_keys_live_under_the_prefix(s3_blob_store: Any, s3: Any) -> None:
    digest = sha(SMALL)
    s3_blob_store.put(io.BytesIO(SMALL), digest, len(SMALL))
    hexdigest = digest.removeprefix("sha256:")
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=s3_blob_store.bucket)["Contents"]]
    assert keys == [f"team/blobs/sha256/{hexdigest[:2]}/{hexdigest}"]
    assert s3_blob_store.local_path(digest) is None


def test_s3_empty_prefix_has_no_leading_slash(moto_server: MotoServer, s3: Any) -> None:
    bucket = f"loreg-s3-{os.urandom(8).hex()}"
    make_bucket(moto_server.endpoint_url, bucket, client=s3)
    with s3_store(moto_server.endpoint_url, bucket, prefix="/") as store:
        store.put(io.BytesIO(b"x"), sha(b"x"), 1)
        keys = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]]
        assert keys == [f"blobs/sha256/{sha(b'x')[7:9]}/{sha(b'x')[7:]}"]
        assert all_digests(store) == [sha(b"x")]


def test_s3_presigned_url_downloads_the_exact_bytes(s3_blob_store: Any, large: bytes) -> None:
    digest = sha(large)
    s3_blob_store.put(io.BytesIO(large), digest, len(large))
    url = s3_blob_store.presign_get(digest, expires_s=60)
    answer = httpx.get(url, timeout=30)
    assert answer.status_code == 200
    assert answer.content == large
    with pytest.raises(RequestInvalidError):
        s3_blob_store.presign_get(digest, expires_s=0)


def test_s3_part_upload_failure_aborts_the_multipart_upload(
    s3_blob_store: Any, s3: Any, large: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3_blob_store._client
    real_upload_part = client.upload_part

    def flaky_upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return real_upload_part(**kwargs)

    monkeypatch.setattr(client, "upload_part", flaky_upload_part)
    with pytest.raises(StorageUnavailableError):
        s3_blob_store.put(io.BytesIO(large), sha(large), len(large))
    assert s3.list_multipart_uploads(Bucket=s3_blob_store.bucket).get("Uploads", []) == []
    assert not s3_blob_store.exists(sha(large))


def test_s3_parts_in_flight_stay_within_max_concurrency(
    moto_server: MotoServer, s3: Any, large: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = f"loreg-s3-{os.urandom(8).hex()}"
    make_bucket(moto_server.endpoint_url, bucket, client=s3)
    lock = threading.Lock()
    in_flight = peak = 0
    with s3_store(moto_server.endpoint_url, bucket, part_size=TEST_PART_SIZE, max_concurrency=2) as store:
        real_upload_part = store._client.upload_part

        def counting_upload_part(**kwargs: Any) -> Any:
            nonlocal in_flight, peak
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            try:
                return real_upload_part(**kwargs)
            finally:
                with lock:
                    in_flight -= 1

        monkeypatch.setattr(store._client, "upload_part", counting_upload_part)
        body = large + large[:TEST_PART_SIZE]  # four parts
        store.put(io.BytesIO(body), sha(body), len(body))
        assert store.read_range(sha(body), len(large) - 2, len(large) + 2) == body[len(large) - 2 : len(large) + 2]
    assert 1 <= peak <= 2


def test_s3_a_part_cut_mid_send_is_sent_again_whole(moto_server: MotoServer, s3: Any, large: bytes) -> None:
    # parts go out as views of reused buffers (storage/s3.py _PartBody): botocore's retry must be
    # able to rewind one and send the same bytes again
    bucket = f"loreg-s3-{os.urandom(8).hex()}"
    make_bucket(moto_server.endpoint_url, bucket, client=s3)
    host, port = moto_server.endpoint_url.removeprefix("http://").split(":")
    with TcpProxy(host, int(port)) as proxy, s3_store(
        proxy.url, bucket, part_size=TEST_PART_SIZE, max_concurrency=1, max_attempts=3
    ) as store:
        proxy.reset_once_after(TEST_PART_SIZE + MIB)  # in the middle of the second part
        assert store.put(io.BytesIO(large), sha(large), len(large)).size == len(large)
        assert proxy.resets == 1
        with store.open(sha(large)) as stream:
            assert hashlib.sha256(stream.read()).hexdigest() == sha(large).removeprefix("sha256:")


def test_s3_puts_reuse_their_part_buffers(s3_blob_store: Any, large: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # a fresh part-sized allocation costs a page fault per 4 KiB: the buffers of one put serve the next
    from loreg.registry.storage import s3 as s3_module

    made: list[int] = []
    real = bytearray

    def counting(size: int) -> bytearray:
        made.append(size)
        return real(size)

    monkeypatch.setattr(s3_module, "bytearray", counting, raising=False)
    for i in range(3):
        body = large + bytes([i])
        s3_blob_store.put(io.BytesIO(body), sha(body), len(body))
        assert s3_blob_store.read_range(sha(body), len(body) - 2, len(body)) == body[-2:]
    assert made and len(made) <= s3_blob_store.max_concurrency + 1, made


def test_s3_existing_key_is_verified_but_not_written_again(
    s3_blob_store: Any, large: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = sha(large)
    s3_blob_store.put(io.BytesIO(large), digest, len(large))
    writes: list[str] = []
    client = s3_blob_store._client
    for name in ("put_object", "create_multipart_upload"):
        real = getattr(client, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            writes.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(client, name, spy)
    assert s3_blob_store.put(io.BytesIO(large), digest, None).size == len(large)
    with pytest.raises(DigestMismatchError):
        s3_blob_store.put(io.BytesIO(large[:-1] + b"!"), digest, None)
    assert writes == []


def test_s3_abort_stale_multipart_uploads(s3_blob_store: Any, s3: Any) -> None:
    bucket = s3_blob_store.bucket
    key = f"team/blobs/sha256/00/{'0' * 64}"
    s3.create_multipart_upload(Bucket=bucket, Key=key)
    s3.create_multipart_upload(Bucket=bucket, Key="elsewhere/object")  # not this store's
    # moto reports every upload as initiated on 2010-11-10, so "fresh" is tested against 2000.
    assert s3_blob_store.abort_stale_multipart_uploads(datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert s3_blob_store.abort_stale_multipart_uploads(datetime.now(UTC)) == 1
    left = [upload["Key"] for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == ["elsewhere/object"]


def test_s3_missing_bucket_is_storage_unavailable_with_the_s3_code(moto_server: MotoServer) -> None:
    with s3_store(moto_server.endpoint_url, "loreg-no-such-bucket", max_attempts=1) as store:
        with pytest.raises(StorageUnavailableError) as caught:
            store.put(io.BytesIO(SMALL), sha(SMALL), len(SMALL))
        assert caught.value.detail["s3_code"] == "NoSuchBucket"
        with pytest.raises(StorageUnavailableError):
            list(store.iter_digests())


S3_CALLS: dict[str, Callable[[Any], object]] = {
    "put": lambda store: store.put(io.BytesIO(SMALL), sha(SMALL), len(SMALL)),
    "open": lambda store: store.open(sha(SMALL)),
    "exists": lambda store: store.exists(sha(SMALL)),
    "stat": lambda store: store.stat(sha(SMALL)),
    "delete": lambda store: store.delete(sha(SMALL)),
    "iter_digests": lambda store: list(store.iter_digests()),
    "abort_stale": lambda store: store.abort_stale_multipart_uploads(datetime.now(UTC)),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", list(S3_CALLS))
def test_s3_unreachable_endpoint_is_storage_unavailable(call: str) -> None:
    closed_port = free_port()
    store = s3_store(f"http://127.0.0.1:{closed_port}", "loreg-any", connect_timeout=1, read_timeout=1, max_attempts=2)
    with store, pytest.raises(StorageUnavailableError) as caught:
        S3_CALLS[call](store)
    assert caught.value.status == 503


@pytest.mark.timeout(60)
def test_s3_endpoint_that_never_answers_is_storage_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with s3_store(endpoint, "loreg-any", connect_timeout=1, read_timeout=0.5, max_attempts=1) as store:
            with pytest.raises(StorageTimeoutError):
                store.exists(sha(SMALL))
            with pytest.raises(StorageTimeoutError):
                store.put(io.BytesIO(SMALL), sha(SMALL), len(SMALL))


def test_s3_refuses_parts_below_the_s3_minimum() -> None:
    with pytest.raises(ValueError):
        s3_store("http://127.0.0.1:1", "loreg-any", part_size=5 * MIB - 1)


# -- storage URLs ----------------------------------------------------------------------------------


def test_file_url_builds_a_local_store(tmp_path: Path) -> None:
    folder = tmp_path / "with space"
    store = store_from_url(folder.as_uri())
    assert isinstance(store, LocalBlobStore)
    assert store.root == folder
    assert not folder.exists()  # nothing is created before the first put


def test_s3_url_builds_an_s3_store() -> None:
    from loreg.registry.storage.s3 import S3BlobStore

    store = store_from_url("s3://models/loreg/prod/", s3_endpoint_url="http://127.0.0.1:1", s3_region=REGION)
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix) == ("models", "loreg/prod")
    store.close()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "/var/lib/loreg",
        "http://example.com/blobs",
        "file://relative/path",
        "file:relative",
        "file:///var/lib/loreg?x=1",
        "s3:///prefix-without-bucket",
        "s3://key:secret@bucket/prefix",
        "gs://bucket/prefix",
    ],
)
def test_unsupported_storage_urls_are_refused(url: str) -> None:
    with pytest.raises(LoregError) as caught:
        store_from_url(url)
    assert caught.value.message
    # a setting the operator wrote, not a malformed request: SETTINGS_INVALID, never a 400
    assert (caught.value.code, caught.value.status) == ("SETTINGS_INVALID", 500)

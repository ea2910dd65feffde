"""Blobs in an S3-compatible bucket (AWS S3, MinIO, R2, Ceph), through boto3.

Layout: ``<prefix>/blobs/sha256/<first 2 hex>/<64 hex>`` (no leading slash when the prefix is empty).

Verify before publish: a body up to ``part_size`` is buffered, hashed, and sent with one
PutObject only after its digest and size matched. A larger body goes to the final key as a
multipart upload, which stays invisible until completed; its parts are sent while the stream is
hashed, and the upload is completed only if the digest and size matched, else aborted. Any
failure aborts it too, so a failed put leaves no object and no open multipart upload (a crashed
process may leave one: ``abort_stale_multipart_uploads`` is for garbage collection).

Direct (presigned) uploads stage under ``<prefix>/staging/<64 hex>``, a name the service derives
from the token, adapter, digest and a server nonce: the client sends parts straight to S3 through
presigned part URLs, the server completes the upload, reads it once (digest and value scan), then
copies it to its blob key server-side and deletes the staged object. Nothing under ``staging/`` is
a blob: listing, stat and presence checks look under ``blobs/`` only.

Every botocore exception is translated into a loreg storage error before it leaves this module.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

import boto3
import urllib3.exceptions
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from loreg.registry.errors import (
    BlobNotFoundError,
    LoregError,
    RequestInvalidError,
    SizeMismatchError,
    StorageTimeoutError,
    StorageUnavailableError,
)
from loreg.registry.storage.protocol import (
    BlobStat,
    HashingReader,
    RangeStream,
    blob_key,
    check_digest,
    check_range,
    digest_from_key,
)

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MIN_PART_SIZE = 5 * MIB  # S3 refuses smaller parts (except the last)
MAX_PARTS = 10_000
MAX_COPY_SIZE = 5 * 1024 * MIB  # larger objects are copied part by part (UploadPartCopy)
STAGING_NAME_RE = re.compile(r"[0-9a-f]{64}")
_NOT_FOUND = {"NoSuchKey", "NoSuchUpload", "404", "NotFound"}
_TIMEOUT = {"RequestTimeout"}


def _storage_error(exc: Exception, action: str) -> LoregError:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = {"s3_code": code, "http_status": status, "action": action}
        if code in _TIMEOUT:
            return StorageTimeoutError(f"S3 timed out while trying to {action}", detail=detail)
        return StorageUnavailableError(f"S3 refused to {action}: {code}", detail=detail)
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError | urllib3.exceptions.TimeoutError | TimeoutError):
        return StorageTimeoutError(f"S3 did not answer in time while trying to {action}", detail={"action": action})
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageUnavailableError("no usable S3 credentials", detail={"action": action})
    return StorageUnavailableError(
        f"S3 is unreachable while trying to {action}: {type(exc).__name__}",
        detail={"action": action, "error": type(exc).__name__},
    )


_BACKEND_ERRORS = (BotoCoreError, ClientError, urllib3.exceptions.HTTPError, OSError)


@contextmanager
def _s3(action: str, digest: str | None = None) -> Iterator[None]:
    """Translate what boto3 raises; a missing key becomes BlobNotFoundError when ``digest`` is given."""
    try:
        yield
    except ClientError as exc:
        if digest is not None and str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND:
            raise BlobNotFoundError("no such blob", detail={"digest": digest}) from None
        raise _storage_error(exc, action) from exc
    except _BACKEND_ERRORS as exc:
        raise _storage_error(exc, action) from exc


@dataclass(frozen=True)
class StagedUpload:
    """A multipart upload to a staging key: the client PUTs part ``i + 1`` (``part_size`` bytes,
    the last one shorter) to ``urls[i]``."""

    upload_id: str
    part_size: int
    urls: list[str]


def _body_stream(answer: dict[str, Any], action: str) -> BinaryIO:
    """A GetObject body as a RangeStream whose ``readinto`` lands the socket's bytes straight in the
    caller's buffer: botocore's ``read(n)`` goes through urllib3, which allocates a fresh buffer per
    call and copies it into bytes (on the pull path that cost more than the sha256 of the bytes).
    The http.client response under it reads into any buffer; used when the bytes come as stored
    (no content encoding), else ``read`` alone."""
    body = answer["Body"]

    def read(n: int) -> bytes:
        with _s3(action):
            return cast(bytes, body.read(n))

    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    readinto = None
    if raw is not None and not raw.headers.get("content-encoding") and callable(getattr(fp, "readinto", None)):

        def readinto(buffer: memoryview) -> int:
            with _s3(action):
                return int(fp.readinto(buffer) or 0)

    return cast(BinaryIO, RangeStream(read, int(answer["ContentLength"]), body.close, readinto))


def _utc(value: Any) -> datetime | None:
    return value.astimezone(UTC) if isinstance(value, datetime) else None


class _PartBody:
    """The first ``length`` bytes of a part buffer, as botocore reads a request body: ``read`` hands
    out views of the buffer (nothing is copied on the way to the socket), ``seek(0)`` lets a retry
    send it again, ``len`` gives the Content-Length."""

    def __init__(self, buffer: bytearray, length: int):
        self._view = memoryview(buffer)[:length]
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

    def read(self, n: int | None = -1) -> memoryview:
        end = len(self._view) if n is None or n < 0 else min(self._pos + n, len(self._view))
        out, self._pos = self._view[self._pos:end], end
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, min(base + offset, len(self._view)))
        return self._pos

    def tell(self) -> int:
        return self._pos


class _PartBuffers:
    """Part-sized buffers lent to puts and kept for the next ones (at most ``keep``): a fresh
    allocation of this size costs page faults and zeroing on every part, more than the copy into it."""

    def __init__(self, size: int, keep: int):
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(self.size)

    def give(self, buffer: bytearray) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buffer)


class S3BlobStore:
    """BlobStore on an S3 bucket; see the module docstring for how a put is verified first.

    Args:
        bucket: the bucket, which must exist.
        prefix: a folder inside the bucket (slashes at either end are ignored).
        endpoint_url: for S3-compatible servers (MinIO, R2, Ceph); path-style addressing is used then.
        region: the bucket's region (else boto3's default chain).
        part_size: multipart part size and the largest body sent with one PutObject (>= 5 MiB).
        max_concurrency: parts in flight per put; a put holds at most (max_concurrency + 1) parts in memory.
        connect_timeout, read_timeout: seconds, per request.
        max_attempts: total attempts per request (botocore "standard" retry mode).
        presign_endpoint_url: the endpoint clients reach S3 at, when it differs from the server's
            (presigned URLs are signed for their host).
        client: a ready boto3 S3 client (then the connection settings above are ignored).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int = 8 * MIB,
        max_concurrency: int = 4,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        presign_endpoint_url: str | None = None,
        client: Any = None,
    ):
        if not bucket:
            raise ValueError("bucket must not be empty")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (the S3 minimum)")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self._buffers = _PartBuffers(part_size, keep=max_concurrency + 1)
        signer = None
        if client is None:
            options: dict[str, Any] = {
                # the store hashes every byte itself (sha256): botocore's default CRC32 on each
                # part and its MD5 on each response would be a second and third pass
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
                "connect_timeout": connect_timeout,
                "read_timeout": read_timeout,
                "retries": {"mode": "standard", "max_attempts": max_attempts},
                "max_pool_connections": max(10, 2 * max_concurrency),
            }
            # nor a sha256 of each body for the signature (botocore's default over http, and over
            # https when no checksum header is sent): the store's own sha256 covers every byte
            options["s3"] = {"payload_signing_enabled": False}
            if endpoint_url:
                # Custom endpoints rarely have wildcard DNS for virtual-hosted buckets.
                options["s3"]["addressing_style"] = "path"
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=Config(**options))
            if presign_endpoint_url:
                signer = session.client(
                    "s3", endpoint_url=presign_endpoint_url, region_name=region, config=Config(**options)
                )
        self._client = client
        self._signer = signer if signer is not None else client

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def close(self) -> None:
        """Close the client's connection pool."""
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> S3BlobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _key(self, digest: str) -> str:
        key = blob_key(digest)
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def _blobs_prefix(self) -> str:
        return f"{self.prefix}/blobs/sha256/" if self.prefix else "blobs/sha256/"

    # -- writing -------------------------------------------------------------------------------

    def put(self, stream: BinaryIO, expected_digest: str, size: int | None = None) -> BlobStat:
        """Store the stream as blob ``expected_digest``; see BlobStore.put.

        If the key exists already, the stream is still read and verified, and nothing is written.
        Exceptions raised by ``stream`` pass through unchanged (after the multipart upload is aborted).

        Raises:
            DigestInvalidError, DigestMismatchError, SizeMismatchError, StorageUnavailableError,
            StorageTimeoutError
        """
        key = self._key(expected_digest)
        reader = HashingReader(stream, size)
        try:
            existing: BlobStat | None = self.stat(expected_digest)
        except BlobNotFoundError:
            existing = None
        if existing is not None:
            reader.drain()
            reader.verify(expected_digest)
            return existing
        head = [self._buffers.take()]
        try:
            filled = [reader.readinto(head[0])]
            if filled[0] == self.part_size:  # more to come, or exactly one part: a second read tells
                head.append(self._buffers.take())
                filled.append(reader.readinto(head[1]))
            if len(filled) == 1 or filled[1] == 0:  # the whole body fits one PutObject
                reader.verify(expected_digest)
                with _s3("store a blob"):
                    self._client.put_object(
                        Bucket=self.bucket, Key=key, Body=_PartBody(head[0], filled[0]), ContentLength=filled[0]
                    )
                return BlobStat(expected_digest, reader.count)
            parts, head = list(zip(head, filled, strict=True)), []
            self._put_multipart(key, reader, expected_digest, parts)
        finally:
            for buffer in head:
                self._buffers.give(buffer)
        return BlobStat(expected_digest, reader.count)

    def put_file(self, path: Path, digest: str, size: int) -> BlobStat:
        """Upload the file at ``path`` as blob ``digest`` with boto3's transfer manager (parts in parallel).

        The digest is the caller's (see BlobStore.put_file); the size is checked before anything is sent.
        A failed multipart upload is aborted by the transfer manager.

        Raises:
            DigestInvalidError, SizeMismatchError, StorageUnavailableError, StorageTimeoutError
        """
        key = self._key(digest)
        with _s3("read a file to store"):
            found = Path(path).stat().st_size
        if found != size:
            raise SizeMismatchError(
                f"the file has {found} bytes, not the declared {size}", detail={"expected": size, "received": found}
            )
        try:
            return self.stat(digest)
        except BlobNotFoundError:
            pass
        config = TransferConfig(
            multipart_threshold=self.part_size, multipart_chunksize=self.part_size, max_concurrency=self.max_concurrency
        )
        try:
            with _s3("store a blob"):
                self._client.upload_file(str(path), self.bucket, key, Config=config)
        except S3UploadFailedError as exc:
            cause = exc.__context__
            if isinstance(cause, _BACKEND_ERRORS):
                raise _storage_error(cause, "store a blob") from exc
            raise StorageUnavailableError(f"S3 refused to store a blob: {exc}", detail={"action": "store a blob"}) from exc
        return BlobStat(digest, size)

    def _put_multipart(
        self, key: str, reader: HashingReader, expected_digest: str, head: list[tuple[bytearray, int]]
    ) -> None:
        """Send ``head`` (buffers already read, with their lengths; this takes them over) and the rest
        of ``reader`` as the parts of one multipart upload, at most ``max_concurrency`` in flight."""
        with _s3("start a multipart upload"):
            upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        inflight: deque[tuple[Future[dict[str, Any]], bytearray]] = deque()
        done: list[dict[str, Any]] = []
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="loreg-s3-part")
        try:
            number = 0
            while True:
                # Bounded memory: wait for the oldest part before reading past max_concurrency.
                while len(inflight) >= self.max_concurrency:
                    self._settle(inflight, done)
                buffer: bytearray | None
                buffer, length = head.pop(0) if head else (self._buffers.take(), None)
                try:
                    if length is None:
                        length = reader.readinto(buffer)
                    if not length:
                        break
                    number += 1
                    if number > MAX_PARTS:
                        raise RequestInvalidError(
                            f"the body needs more than {MAX_PARTS} parts of {self.part_size} bytes",
                            detail={"part_size": self.part_size},
                        )
                    part = pool.submit(self._upload_part, key, upload_id, number, _PartBody(buffer, length))
                    inflight.append((part, buffer))
                    buffer = None
                finally:
                    if buffer is not None:
                        self._buffers.give(buffer)
            reader.verify(expected_digest)
            while inflight:
                self._settle(inflight, done)
            parts = sorted(done, key=lambda part: part["PartNumber"])
            with _s3("complete a multipart upload"):
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            # Parts still being sent must finish before the abort, or one could land after it.
            pool.shutdown(wait=True, cancel_futures=True)
            self._abort(key, upload_id)
            raise
        finally:
            pool.shutdown(wait=True)  # no thread reads a buffer any more: they can be lent again
            for buffer in [b for b, _ in head] + [b for _, b in inflight]:
                self._buffers.give(buffer)

    def _settle(self, inflight: deque[tuple[Future[dict[str, Any]], bytearray]], done: list[dict[str, Any]]) -> None:
        """Wait for the oldest part in flight; its buffer is free again once it is sent."""
        done.append(inflight[0][0].result())
        self._buffers.give(inflight.popleft()[1])

    def _upload_part(self, key: str, upload_id: str, number: int, data: _PartBody) -> dict[str, Any]:
        with _s3("upload a part"):
            answer = self._client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
        return {"ETag": answer["ETag"], "PartNumber": number}

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            with _s3("abort a multipart upload"):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except LoregError:
            # The put's own error is the one to report; GC aborts what is left.
            log.warning("could not abort multipart upload %s of %s", upload_id, key, exc_info=True)

    def abort_stale_multipart_uploads(self, older_than: datetime) -> int:
        """Abort multipart uploads under this store's prefix (blob puts and staged direct uploads)
        started before ``older_than``.

        Returns:
            how many were aborted.
        """
        if older_than.tzinfo is None:
            raise ValueError("older_than must be timezone-aware")
        stale = []
        with _s3("list multipart uploads"):
            for prefix in (self._blobs_prefix, self._staging_prefix):
                pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
                for page in pages:
                    for upload in page.get("Uploads", []):
                        initiated = _utc(upload.get("Initiated"))
                        if initiated is not None and initiated < older_than:
                            stale.append((upload["Key"], upload["UploadId"]))
        for key, upload_id in stale:
            with _s3("abort a multipart upload"):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        return len(stale)

    # -- direct uploads (staging) ----------------------------------------------------------------

    @property
    def _staging_prefix(self) -> str:
        return f"{self.prefix}/staging/" if self.prefix else "staging/"

    def _staging_key(self, name: str) -> str:
        if STAGING_NAME_RE.fullmatch(name) is None:
            raise ValueError("a staging name is 64 lowercase hex (derived by the service)")
        return self._staging_prefix + name

    def stage_upload(
        self, name: str, size: int, expires_s: int, *, part_size: int | None = None, part_sha256: list[str] | None = None
    ) -> StagedUpload:
        """Start a multipart upload to staging key ``name`` and sign one PUT URL per part.

        With ``part_sha256`` (one base64 sha256 per ``part_size`` part), the upload is created with
        ChecksumAlgorithm SHA256 and each URL signs ``x-amz-checksum-sha256``: S3 refuses a part
        whose bytes do not match (moto 5.2 does not check them).
        """
        key = self._staging_key(name)
        if part_sha256 is None or part_size is None:
            part_size, part_sha256 = max(self.part_size, 16 * MIB, math.ceil(size / MAX_PARTS)), None
        count = max(1, math.ceil(size / part_size))
        if part_size < MIN_PART_SIZE or count > MAX_PARTS or (part_sha256 is not None and len(part_sha256) != count):
            raise RequestInvalidError("the parts do not fit S3's limits", detail={"part_size": part_size, "parts": count})
        checksums = {"ChecksumAlgorithm": "SHA256"} if part_sha256 is not None else {}
        with _s3("start a multipart upload"):
            upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=key, **checksums)["UploadId"]
        with _s3("sign a URL"):
            urls = []
            for number in range(1, count + 1):
                params = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": number}
                if part_sha256 is not None:
                    params.update(ChecksumAlgorithm="SHA256", ChecksumSHA256=part_sha256[number - 1])
                urls.append(self._signer.generate_presigned_url("upload_part", Params=params, ExpiresIn=expires_s))
        return StagedUpload(upload_id, part_size, urls)

    def complete_staged(self, name: str, upload_id: str) -> None:
        """Complete the staged upload from the parts S3 holds (the client's word is not needed).

        Raises:
            BlobNotFoundError: no such upload at this key (another token's, finished, or aborted).
        """
        key = self._staging_key(name)
        parts: list[dict[str, Any]] = []
        try:
            # some S3 servers (moto) find an upload by its id alone, whatever the key: the id must
            # be one of this key's own uploads, or another token's upload could be completed
            with _s3("list multipart uploads"):
                listed = self._client.list_multipart_uploads(Bucket=self.bucket, Prefix=key).get("Uploads", [])
            if not any(u["Key"] == key and u["UploadId"] == upload_id for u in listed):
                raise BlobNotFoundError("no such staged upload")
            with _s3("list the parts of an upload", "staged upload"):
                pages = self._client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=upload_id)
                for page in pages:
                    for p in page.get("Parts", []):
                        # an upload created with a checksum algorithm is completed with each part's checksum
                        checksum = {"ChecksumSHA256": p["ChecksumSHA256"]} if p.get("ChecksumSHA256") else {}
                        parts.append({"ETag": p["ETag"], "PartNumber": p["PartNumber"], **checksum})
        except BlobNotFoundError:
            parts = []
        if not parts:
            raise BlobNotFoundError(
                "this token staged no such upload (or it holds no parts)",
                detail={"upload_id": upload_id[:80]},
                hint="stage the upload again with the token that will adopt it",
            )
        with _s3("complete a multipart upload", "staged upload"):
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )

    def open_staged(self, name: str) -> BinaryIO:
        """The completed staged object, to be read (and verified) once."""
        with _s3("read a staged upload", "staged upload"):
            answer = self._client.get_object(Bucket=self.bucket, Key=self._staging_key(name))
        return _body_stream(answer, "read a staged upload")

    def publish_staged(self, name: str, digest: str, size: int) -> None:
        """Copy the verified staged object to blob ``digest`` inside S3 (unless it is stored), then
        delete the staged object."""
        source = {"Bucket": self.bucket, "Key": self._staging_key(name)}
        if not self.exists(digest):
            if size <= MAX_COPY_SIZE:
                with _s3("copy a staged upload"):
                    self._client.copy_object(Bucket=self.bucket, Key=self._key(digest), CopySource=source)
            else:
                self._copy_in_parts(source, self._key(digest), size)
        self.delete_staged(name)

    def _copy_in_parts(self, source: dict[str, str], key: str, size: int) -> None:
        part = max(MAX_COPY_SIZE // 5, math.ceil(size / MAX_PARTS))
        with _s3("start a multipart upload"):
            upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, size, part), start=1):
                with _s3("copy a part"):
                    answer = self._client.upload_part_copy(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, CopySource=source,
                        CopySourceRange=f"bytes={start}-{min(start + part, size) - 1}",
                    )
                parts.append({"ETag": answer["CopyPartResult"]["ETag"], "PartNumber": number})
            with _s3("complete a multipart upload"):
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            self._abort(key, upload_id)
            raise

    def delete_staged(self, name: str, upload_id: str | None = None) -> None:
        """Remove a staged object (and abort its upload when ``upload_id`` is given); missing is fine."""
        key = self._staging_key(name)
        if upload_id is not None:
            try:
                with _s3("abort a multipart upload", "staged upload"):
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except BlobNotFoundError:
                pass
        with _s3("delete a staged upload"):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def cleanup_staging(self, older_than: datetime) -> int:
        """Delete staged objects last written before ``older_than`` (an adoption that never ended).

        Returns:
            how many were deleted.
        """
        stale = []
        with _s3("list staged uploads"):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._staging_prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    modified = _utc(item.get("LastModified"))
                    if modified is not None and modified < older_than:
                        stale.append(item["Key"])
        for key in stale:
            with _s3("delete a staged upload"):
                self._client.delete_object(Bucket=self.bucket, Key=key)
        return len(stale)

    # -- reading -------------------------------------------------------------------------------

    def open(self, digest: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """Bytes ``[start, end)`` of the blob with one GetObject, ``end`` clamped to its size.

        Raises:
            DigestInvalidError, RequestInvalidError (a negative or reversed range),
            BlobNotFoundError, StorageUnavailableError, StorageTimeoutError
        """
        key = self._key(digest)
        check_range(start, end)
        if end is not None and end == start:
            self.stat(digest)
            return cast(BinaryIO, RangeStream(lambda n: b"", 0))
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start > 0 or end is not None:
            request["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            with _s3("read a blob", digest):
                answer = self._client.get_object(**request)
        except StorageUnavailableError as exc:
            if exc.detail.get("s3_code") == "InvalidRange":
                # The range starts at or past the end of the blob, which exists (else 404).
                return cast(BinaryIO, RangeStream(lambda n: b"", 0))
            raise
        return _body_stream(answer, "read a blob")

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        with self.open(digest, start, end) as stream:
            return stream.read()

    def exists(self, digest: str) -> bool:
        try:
            self.stat(digest)
        except BlobNotFoundError:
            return False
        return True

    def stat(self, digest: str) -> BlobStat:
        key = self._key(digest)
        with _s3("stat a blob", digest):
            answer = self._client.head_object(Bucket=self.bucket, Key=key)
        return BlobStat(digest, int(answer["ContentLength"]), _utc(answer.get("LastModified")))

    def delete(self, digest: str) -> None:
        key = self._key(digest)
        with _s3("delete a blob"):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def iter_digests(self) -> Iterator[BlobStat]:
        """Every blob under the prefix; other keys there are skipped."""
        skip = len(self.prefix) + 1 if self.prefix else 0
        with _s3("list blobs"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._blobs_prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    digest = digest_from_key(item["Key"][skip:])
                    if digest is not None:
                        yield BlobStat(digest, int(item["Size"]), _utc(item.get("LastModified")))

    def local_path(self, digest: str) -> None:
        check_digest(digest)
        return None

    def presign_get(self, digest: str, expires_s: int = 3600) -> str:
        """A GET URL for the blob, valid ``expires_s`` seconds (at most 7 days, as S3 allows)."""
        key = self._key(digest)
        if not 1 <= expires_s <= 7 * 24 * 3600:
            raise RequestInvalidError("expires_s must be between 1 s and 7 days", detail={"expires_s": expires_s})
        with _s3("sign a URL"):
            return cast(
                str,
                self._signer.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
                ),
            )

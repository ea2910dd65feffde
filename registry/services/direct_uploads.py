"""Direct uploads: the client sends a blob's bytes straight to S3 (presigned multipart part URLs for
a staging key), then asks the server to adopt it.

The staging key is derived here from the token, the adapter, the digest, the size and a server
nonce, never taken from the request: a token that did not stage an upload cannot name its key, so
it can adopt only what it staged. Adoption reads the staged object once through the same checks as
an upload through the API (format sniff, size cap, sha256, value scan); only then is it copied to
its blob key inside S3 and linked to the adapter. A staged object that fails is deleted; one whose
adoption never came is removed by garbage collection (staging keys and multipart uploads older
than the grace period).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

from loreg.registry.errors import LoregError, RequestInvalidError, TooLargeError
from loreg.registry.services.blobs import BlobService
from loreg.registry.services.context import AppContext
from loreg.registry.storage.protocol import HashingReader, check_digest

NONCE_RE = re.compile(r"[0-9a-f]{32}")
UPLOAD_ID_MAX = 1024


@dataclass(frozen=True)
class StagedBlob:
    """What a client needs to upload a blob straight to storage, then adopt it."""

    nonce: str
    upload_id: str
    part_size: int
    urls: list[str]


def staging_name(token_id: str, link: tuple[str, str], digest: str, size: int, nonce: str) -> str:
    """The staging object's name: 64 hex, bound to the token, adapter, digest and size."""
    material = "\0".join((token_id, link[0], link[1], digest, str(size), nonce))
    return hashlib.sha256(material.encode()).hexdigest()


class DirectUploadService:
    def __init__(self, registry: AppContext):
        self.registry = registry
        self.blobs = BlobService(registry)

    @property
    def available(self) -> bool:
        """Whether this server hands out direct upload URLs (the setting, and a store that can)."""
        return self.registry.settings.s3_presign_uploads and callable(getattr(self.registry.store, "stage_upload", None))

    def _store(self) -> Any:
        if not self.available:
            raise RequestInvalidError(
                "this server does not take direct uploads",
                hint="upload through the API (the client does so by itself when the server does not offer them)",
            )
        return self.registry.store

    def _check(self, digest: str, size: int) -> None:
        check_digest(digest)
        limit = self.registry.settings.max_file_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise RequestInvalidError("size must be an integer >= 0", detail={"size": repr(size)[:40]})
        if size > limit:
            raise TooLargeError(f"upload of {size} bytes is over the limit of {limit}", detail={"limit": limit})

    def stage(
        self, token_id: str, link: tuple[str, str], digest: str, size: int, *,
        part_size: int | None = None, part_sha256: list[str] | None = None,
    ) -> StagedBlob:
        """Start a staged upload of ``size`` bytes meant to become blob ``digest`` of adapter ``link``.

        With ``part_sha256`` (the client's ``part_size`` parts' base64 sha256), each part URL is
        signed with its checksum, so storage refuses a part whose bytes changed on the way.

        Raises:
            RequestInvalidError (direct uploads off; checksums without a part size, or not one per
            part), DigestInvalidError, TooLargeError, storage errors.
        """
        store = self._store()
        self._check(digest, size)
        if part_sha256 is not None:
            count = max(1, -(-size // part_size)) if part_size else 0
            if count != len(part_sha256):
                raise RequestInvalidError(
                    "part_sha256 needs part_size and one checksum per part",
                    detail={"parts": count, "checksums": len(part_sha256)},
                )
        nonce = secrets.token_hex(16)
        name = staging_name(token_id, link, digest, size, nonce)
        staged = store.stage_upload(
            name, size, self.registry.settings.s3_presign_expires_s, part_size=part_size, part_sha256=part_sha256
        )
        return StagedBlob(nonce, staged.upload_id, staged.part_size, staged.urls)

    def adopt(
        self, token_id: str, link: tuple[str, str], digest: str, size: int, nonce: str, upload_id: str
    ) -> tuple[int, bool]:
        """Complete the staged upload this token started, verify it as an API upload would be,
        store it as blob ``digest`` and link it to ``link``. Returns (size, created).

        Raises:
            BlobNotFoundError (no such staged upload for this token), DigestMismatchError,
            SizeMismatchError, TooLargeError, UnsupportedFormatError, storage errors. On any of
            them the staged object is deleted.
        """
        store = self._store()
        self._check(digest, size)
        if NONCE_RE.fullmatch(nonce) is None or not 0 < len(upload_id) <= UPLOAD_ID_MAX:
            raise RequestInvalidError("nonce or upload_id is malformed")
        name = staging_name(token_id, link, digest, size, nonce)
        store.complete_staged(name, upload_id)
        try:
            with store.open_staged(name) as staged:
                tapped, scanner = self.blobs.checked_stream(staged)
                reader = HashingReader(tapped, size)
                reader.drain()
                reader.verify(digest)
            created = not store.exists(digest)
            store.publish_staged(name, digest, size)
        except (LoregError, OSError):
            store.delete_staged(name)
            raise
        self.blobs.record(digest, size, scanner.finish(), link=link)
        return size, created

"""The blob store named by a storage URL (``LOREG_STORAGE_URL``)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from loreg.registry.errors import SettingsInvalidError
from loreg.registry.storage.protocol import BlobStore


def store_from_url(
    url: str, *, s3_endpoint_url: str | None = None, s3_region: str | None = None, s3_presign_endpoint_url: str | None = None
) -> BlobStore:
    """Build the store for ``file:///absolute/path`` or ``s3://bucket[/prefix]``.

    Creates no folder and opens no connection (the S3 backend, and boto3, are imported only here).

    Raises:
        SettingsInvalidError: any other URL, with what was wrong (a setting, not a request: 500).
    """
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise SettingsInvalidError(
            "a storage URL takes no query or fragment", detail={"url": url}, hint="file:///path or s3://bucket/prefix"
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise SettingsInvalidError(
                f"file storage URLs name an absolute local path, not host {parts.netloc!r}",
                detail={"url": url},
                hint="write file:///absolute/path (three slashes)",
            )
        path = unquote(parts.path)
        if not path.startswith("/") or "\x00" in path:
            raise SettingsInvalidError("file storage URLs need an absolute path", detail={"url": url})
        from loreg.registry.storage.local import LocalBlobStore

        return LocalBlobStore(Path(path))
    if parts.scheme == "s3":
        if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
            raise SettingsInvalidError(
                "s3 storage URLs name a bucket: s3://bucket/prefix",
                detail={"url": url},
                hint="set the endpoint with LOREG_S3_ENDPOINT_URL, not in the URL",
            )
        from loreg.registry.storage.s3 import S3BlobStore

        return S3BlobStore(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=s3_endpoint_url,
            region=s3_region,
            presign_endpoint_url=s3_presign_endpoint_url,
        )
    raise SettingsInvalidError(
        f"unsupported storage URL scheme {parts.scheme!r}",
        detail={"url": url},
        hint="use file:///absolute/path or s3://bucket/prefix",
    )

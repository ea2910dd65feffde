"""Fixtures of the storage suite: every conformance test runs on the local folder and on S3 (moto)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loreg.registry.storage.protocol import BlobStore
from loreg.registry.storage.local import LocalBlobStore
from tests.support.moto import REGION, MotoServer, make_bucket, s3_client

# Small enough that an ~11 MiB blob takes three parts; S3 (and moto) refuse parts under 5 MiB.
TEST_PART_SIZE = 5 * 1024 * 1024


# ``moto_server`` (session-scoped: one moto subprocess, fake AWS credentials set) is tests/conftest.py's.


@pytest.fixture(scope="session")
def s3(moto_server: MotoServer) -> Iterator[Any]:
    """A plain boto3 client on the test server, to make buckets and look behind the store's back."""
    client = s3_client(moto_server.endpoint_url)
    yield client
    client.close()


@pytest.fixture(params=["local", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "store")
        return
    from loreg.registry.storage.s3 import S3BlobStore

    server: MotoServer = request.getfixturevalue("moto_server")
    bucket = f"loreg-test-{uuid.uuid4().hex[:16]}"
    make_bucket(server.endpoint_url, bucket, client=request.getfixturevalue("s3"))
    store = S3BlobStore(bucket, "tenant/x", endpoint_url=server.endpoint_url, region=REGION, part_size=TEST_PART_SIZE)
    yield store
    store.close()

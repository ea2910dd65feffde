"""A real S3 protocol server on 127.0.0.1 for tests: moto's server mode, run as a subprocess.

Credentials are fake. The subprocess gets them from ``FAKE_AWS_ENV``; tests that build boto3
clients in-process (S3BlobStore, the API under test) must set the same variables in their own
environment too (``fake_aws_env`` below, used by the session fixtures), so that no real AWS
credentials, profile, config file or endpoint of the developer's machine is ever used.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import httpx

REGION = "us-east-1"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Variables that would point boto3 somewhere else than the test server.
UNSET_AWS_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
START_DEADLINE_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def fake_aws_env() -> Iterator[None]:
    """Set the fake credentials (and clear redirecting variables) in this process, then restore."""
    saved = {name: os.environ.get(name) for name in (*FAKE_AWS_ENV, *UNSET_AWS_ENV)}
    os.environ.update(FAKE_AWS_ENV)
    for name in UNSET_AWS_ENV:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class MotoServer:
    """A running ``python -m moto.server``; ``stop()`` ends it."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: tempfile._TemporaryFileWrapper[bytes]):
        self.process = process
        self.port = port
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self._log = log

    def log_text(self) -> str:
        self._log.flush()
        with open(self._log.name, "rb") as file:
            return file.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(endpoint_url: str) -> bool:
    try:
        return httpx.get(f"{endpoint_url}/moto-api/", timeout=1.0).status_code < 500
    except httpx.HTTPError:
        return False


def start_moto(port: int | None = None) -> MotoServer:
    """Start moto's S3 server on 127.0.0.1 and wait (with a deadline) until it answers.

    Without ``port`` a free one is picked, and picked again if another process took it first.
    """
    attempts = 1 if port is not None else 3
    failure = ""
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        env = {key: value for key, value in os.environ.items() if key not in UNSET_AWS_ENV}
        env.update(FAKE_AWS_ENV)
        log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log")  # noqa: SIM115 - closed by stop()
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(chosen)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        server = MotoServer(process, chosen, log)
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if _answers(server.endpoint_url):
                return server
            try:
                process.wait(timeout=0.05)  # returns at once if the server died (port taken, say)
                break
            except subprocess.TimeoutExpired:
                continue
        failure = server.log_text()[-2000:]
        server.stop()
    raise RuntimeError(f"moto server did not start on 127.0.0.1:\n{failure}")


def s3_client(endpoint_url: str) -> Any:
    """A plain boto3 client on the test server, for setting up and inspecting buckets."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


def make_bucket(endpoint_url: str, name: str, *, client: Any = None) -> None:
    """Create bucket ``name`` (with ``client`` when given: building one costs ~50 ms)."""
    if client is not None:
        client.create_bucket(Bucket=name)
        return
    own = s3_client(endpoint_url)
    try:
        own.create_bucket(Bucket=name)
    finally:
        own.close()

"""The merge writer's output files (outfile.OutFile): exact bytes, size and digest whether the bytes go out
with O_DIRECT, through the page cache, or through the page cache after a file system refused an O_DIRECT write."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from pathlib import Path

import pytest
import torch

from loreg.registry.merge import outfile

STAGE = 64 << 10  # a small staging buffer, so that pieces cross it many times
SIZES = [0, 1, 7, 4095, 4096, 4097, STAGE - 1, STAGE, STAGE + 1, 3 * STAGE + 4099, 12345, 8]


def _direct_supported(folder: Path) -> bool:
    if not outfile.O_DIRECT:
        return False
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | outfile.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


def _write(path: Path, seed: int) -> tuple[bytes, str, bool]:
    g = torch.Generator().manual_seed(seed)
    header = b'{"__metadata__":{"format":"pt"}}' + b" " * 5
    expected = bytearray(header)
    staging = outfile.Staging(torch)
    f = outfile.OutFile(path, staging)
    try:
        f.write(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        for n in SIZES:
            piece = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
            f.write(piece)
            expected += piece.numpy().tobytes()
        direct = f.direct
        digest = f.close()
    finally:
        f.abandon()
        staging.close()
    return bytes(expected), digest, direct


@pytest.fixture(autouse=True)
def small_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outfile, "STAGE_SIZE", STAGE)


def test_o_direct_output_has_the_exact_bytes_size_and_digest(tmp_path: Path) -> None:
    expected, digest, direct = _write(tmp_path / "out", 1)
    assert direct == _direct_supported(tmp_path)  # O_DIRECT whenever the file system takes it
    assert (tmp_path / "out").read_bytes() == expected  # the padded last piece was truncated away
    assert digest == "sha256:" + hashlib.sha256(expected).hexdigest()


def test_page_cache_output_is_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outfile, "O_DIRECT", 0)  # as on macOS
    expected, digest, direct = _write(tmp_path / "out", 2)
    assert not direct
    assert (tmp_path / "out").read_bytes() == expected
    assert digest == "sha256:" + hashlib.sha256(expected).hexdigest()


def test_a_refused_o_direct_write_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT at open; the open fallback is the page-cache test")
    refused = []
    real = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & outfile.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    expected, digest, direct = _write(tmp_path / "out", 3)
    assert refused == [0] and not direct
    assert (tmp_path / "out").read_bytes() == expected
    assert digest == "sha256:" + hashlib.sha256(expected).hexdigest()


def test_other_write_errors_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError) as info:
        _write(tmp_path / "out", 4)
    assert info.value.errno == errno.ENOSPC


def test_a_refusal_at_the_padded_last_piece_still_leaves_the_exact_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT at open; the open fallback is the page-cache test")
    real = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if len(data) != STAGE and fcntl.fcntl(fd, fcntl.F_GETFL) & outfile.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # only the zero-padded last piece
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    expected, digest, _direct = _write(tmp_path / "out", 5)
    assert (tmp_path / "out").read_bytes() == expected  # not followed by the padding
    assert digest == "sha256:" + hashlib.sha256(expected).hexdigest()

"""The merge reader's drop-behind: a base that was in the page cache stays there; a cold one is read once
and its pages are freed as the merge goes (the output is written with O_DIRECT: see test_outfile.py)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loreg.registry.formats.safetensors import read_header_from_file
from loreg.registry.merge import engine, pipeline

PAGE = 4096
pytestmark = pytest.mark.skipif(not pipeline.RWF_NOWAIT, reason="RWF_NOWAIT is Linux-only")


def cached_fraction(path: Path) -> float:
    """The share of the file's pages in the page cache, from mincore(2) (a probe that reads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        anchor = ctypes.c_char.from_buffer(mm)
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del anchor
        return sum(v & 1 for v in vec) / pages


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file({f"layers.{i}.weight": torch.randn(512, 1024, generator=g) for i in range(12)}, str(path))  # 24 MiB
    return path


def merge(base: Path, out: Path) -> Callable[[], None]:
    digest = "sha256:" + hashlib.sha256(base.read_bytes()).hexdigest()  # before the caller sets the cache state
    shard = engine.BaseShard(name=base.name, path=base, header=read_header_from_file(base))
    return lambda: _check(engine.merge_to_dir([shard], [], out, device="cpu"), digest)


def _check(written: list[engine.OutputFile], digest: str) -> None:
    (only,) = written
    assert only.digest == digest and not only.changed  # the bytes went through unchanged


def test_a_cold_base_is_not_left_in_the_page_cache(base: Path, tmp_path: Path) -> None:
    run = merge(base, tmp_path / "out")
    drop(base)
    if cached_fraction(base) > 0.1:
        pytest.skip("this file system keeps file pages in memory whatever we ask (tmpfs)")
    run()
    assert cached_fraction(base) < 0.5  # without drop-behind: 1.0; pages at read edges and readahead may stay


def test_a_warm_base_stays_in_the_page_cache(base: Path, tmp_path: Path) -> None:
    run = merge(base, tmp_path / "out")  # reads the base: all of it is cached
    assert cached_fraction(base) == 1.0
    run()
    assert cached_fraction(base) == 1.0


def test_a_file_system_without_rwf_nowait_gets_plain_reads(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(fd, buffers, offset)

    run = merge(base, tmp_path / "out")
    monkeypatch.setattr(os, "preadv", preadv)
    drop(base)
    run()

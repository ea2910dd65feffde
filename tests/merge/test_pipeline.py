"""The merge pipeline's one owner of stop and first error (merge/pipeline.py): a failing thread's error is the
merge's error, every blocked wait wakes when the merge stops, and nothing written is left behind."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from loreg.registry.formats.safetensors import read_header_from_file
from loreg.registry.merge import engine, pipeline

JOIN_S = 30  # a bound on joining a thread that must already be ending, not a pause


def _base(folder: Path) -> list[engine.BaseShard]:
    """Two shards of float32 tensors, big enough for several chunks (CHUNK_SIZE is 16 MiB)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    shards = []
    for i in range(2):
        path = folder / f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({f"w{i}.{j}": rng.standard_normal((1024, 2048), dtype=np.float32) for j in range(3)}, str(path))
        shards.append(engine.BaseShard(name=path.name, path=path, header=read_header_from_file(path)))
    return shards


def test_an_exception_from_progress_aborts_the_merge_and_removes_every_file_it_wrote(tmp_path: Path) -> None:
    shards = _base(tmp_path / "base")
    out = tmp_path / "out"

    class Cancelled(Exception):
        pass

    def progress(tensors_done: int, tensors_total: int, bytes_done: int, bytes_total: int) -> None:
        if tensors_done >= 1:  # at the latest the last call, after every file was renamed into place
            raise Cancelled

    with pytest.raises(Cancelled):
        engine.merge_to_dir(shards, [], out, device="cpu", progress=progress)
    assert list(out.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("loreg-merge")]


def test_a_writer_failure_is_the_merges_error_and_nothing_is_left(tmp_path: Path) -> None:
    shards = _base(tmp_path / "base")
    out = tmp_path / "out"
    (out / shards[1].name).mkdir(parents=True)  # the second file cannot be renamed into place
    with pytest.raises(IsADirectoryError):
        engine.merge_to_dir(shards, [], out, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == [shards[1].name]  # the first, written and renamed, is gone
    assert not [t for t in threading.enumerate() if t.name.startswith("loreg-merge")]


def _blocked(target: object) -> tuple[threading.Thread, list[BaseException]]:
    raised: list[BaseException] = []

    def main() -> None:
        try:
            target()  # type: ignore[operator]
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=main)
    thread.start()
    return thread, raised


def test_stopping_wakes_a_full_put_an_empty_get_and_a_pool_wait_and_keeps_the_first_error() -> None:
    control = pipeline.Control()
    full: pipeline.Channel[int] = pipeline.Channel(control, depth=1)
    full.put(1)
    empty: pipeline.Channel[int] = pipeline.Channel(control, depth=1)
    pool = pipeline.Pool(torch, budget=8 << 20, slab=4 << 20, pinned=False, control=control)
    pool.reserve(8 << 20)  # the budget is spent: the next reserve waits for a give that never comes
    waits = [_blocked(lambda: full.put(2)), _blocked(empty.get), _blocked(lambda: pool.reserve(4 << 20))]

    first, second = ValueError("first"), RuntimeError("second")
    control.stop(first)
    control.stop(second)
    for thread, raised in waits:
        thread.join(JOIN_S)
        assert not thread.is_alive()
        assert len(raised) == 1 and isinstance(raised[0], pipeline.Abort)
    assert control.stopped and control.error() is first


def test_a_spawned_threads_exception_stops_the_merge_as_its_error() -> None:
    control = pipeline.Control()
    channel: pipeline.Channel[int] = pipeline.Channel(control)
    failure = OSError("disk")

    def fail() -> None:
        raise failure

    thread = pipeline.spawn(control, "loreg-merge-test", fail)
    with pytest.raises(pipeline.Abort):
        channel.get()  # blocks until the other thread's failure stops the merge
    thread.join(JOIN_S)
    assert control.error() is failure

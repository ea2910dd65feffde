"""The merge pipeline: a reader thread, the calling thread computing, a writer thread (engine.py has the why).

The threads pass typed messages through two bounded channels (reader -> compute -> writer), and a normal
end travels down them as ``END``. One ``Control`` owns the stop signal and the first error: a thread that
fails hands its exception to it, and stopping wakes every blocked wait (both channels and the buffer
pool), so no wait polls; a thread woken that way raises ``Abort`` and ends.
"""

from __future__ import annotations

import errno
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from loreg.registry.errors import MergeUnsupportedError
from loreg.registry.formats.safetensors import DTYPE_SIZES
from loreg.registry.merge import ops
from loreg.registry.merge.outfile import OutFile, Staging
from loreg.registry.merge.plan import (
    AdapterInput,
    BaseShard,
    MergePlan,
    OutputFile,
    PlannedFile,
    PlannedTensor,
)

ProgressFn = Callable[[int, int, int, int], None]

CHUNK_SIZE = 16 << 20  # untouched tensors travel in pieces of at most this many bytes
QUEUE_DEPTH = 4
BYTE_BUDGET = 96 << 20  # host buffer bytes the reader may hold in flight (read, queued, being written)
_POOL_MIN = 1 << 20  # smaller buffers come from malloc's heap, which reuses them anyway
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux: a read that takes only what the page cache holds


# ------------------------------------------------------------------------------------------------
# messages


@dataclass(frozen=True)
class OpenFile:
    index: int  # into plan.files


@dataclass(frozen=True)
class CloseFile:
    index: int


@dataclass(frozen=True)
class Chunk:
    """A piece of an untouched tensor, as read (a uint8 buffer); the calling thread casts it if needed."""

    tensor: PlannedTensor
    data: Any
    last: bool


@dataclass(frozen=True)
class Touched:
    """A tensor an adapter changes, whole, with every adapter tensor it needs."""

    tensor: PlannedTensor
    base: Any
    loaded: ops.Loaded


@dataclass(frozen=True)
class Data:
    """Output bytes for the writer, and the pooled buffers it gives back once they are written."""

    data: Any  # uint8, host
    last: bool  # the tensor's last piece
    event: Any  # CUDA event the copy into ``data`` completes at, or None
    original: Any  # the base bytes, when the output has their dtype (tells whether the file changed)
    release: tuple[Any, ...]


class _End:
    def __repr__(self) -> str:
        return "END"


END = _End()  # the last message down each channel on a normal run

ReadMessage = OpenFile | CloseFile | Chunk | Touched | _End
WriteMessage = OpenFile | CloseFile | Data | _End
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# stop, first error, blocking waits


class Abort(Exception):
    """Raised in a thread waiting on a channel or the pool once the merge has stopped."""


class Control:
    """The one owner of the merge's stop signal and of its first error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._error: BaseException | None = None
        self._wakers: list[Callable[[], None]] = []

    def watch(self, wake: Callable[[], None]) -> None:
        """``wake`` is called once, on stop (every waiter registers before the threads start)."""
        self._wakers.append(wake)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self, error: BaseException | None = None) -> None:
        """Stop the merge; the first error handed here is the one the merge raises."""
        with self._lock:
            if error is not None and self._error is None and not isinstance(error, Abort):
                self._error = error
            if self._stopped:
                return
            self._stopped = True
        for wake in self._wakers:
            wake()

    def error(self) -> BaseException:
        return self._error or RuntimeError("the merge stopped")


class Channel(Generic[T]):
    """A bounded FIFO between two threads; both ends block, and wake with Abort when the merge stops."""

    def __init__(self, control: Control, depth: int = QUEUE_DEPTH):
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._depth, self._control = depth, control
        control.watch(self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def put(self, item: T) -> None:
        with self._cond:
            while len(self._items) >= self._depth and not self._control.stopped:
                self._cond.wait()
            if self._control.stopped:
                raise Abort
            self._items.append(item)
            self._cond.notify_all()

    def get(self) -> T:
        with self._cond:
            while not self._items and not self._control.stopped:
                self._cond.wait()
            if self._control.stopped:
                raise Abort
            item = self._items.popleft()
            self._cond.notify_all()
            return item


def spawn(control: Control, name: str, target: Callable[[], None]) -> threading.Thread:
    """Start ``target`` in a thread whose exception, if any, stops the merge as its error."""

    def main() -> None:
        try:
            target()
        except Abort:
            pass
        except BaseException as exc:  # handed to the calling thread through control
            control.stop(exc)

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    return thread


class Pool:
    """Reused uint8 host buffers ("slabs") and a budget on the bytes in flight between the three threads.

    Fresh multi-MB buffers for every tensor or chunk cost a page fault per 4 KiB (and the kernel zeroing the
    page). Every buffer of at least ``_POOL_MIN`` bytes and at most ``slab`` bytes (the largest touched tensor,
    read or written, or a chunk) is a view of one slab, so any idle slab serves any request; the writer hands
    them back. ``take`` blocks while ``budget`` bytes are out (unless nothing is out: one tensor larger than
    the budget still passes); ``take(wait=False)`` (the calling thread's output buffers) never blocks, since
    the reader's budget already bounds what the calling thread can produce. A pooled buffer counts as a
    whole slab against the budget (that is the memory it holds). Idle slabs are kept until the merge ends.
    """

    def __init__(self, torch: Any, budget: int, slab: int, pinned: bool, control: Control):
        self.torch, self.budget, self.slab, self.pinned, self.control = torch, budget, slab, pinned, control
        self.cond = threading.Condition()
        self.idle: list[Any] = []
        self.slabs: dict[int, Any] = {}  # data_ptr -> slab, for every slab handed out
        self.out = 0  # bytes taken and not given back
        control.watch(self._wake)

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def charge(self, nbytes: int) -> int:
        """The bytes a buffer of ``nbytes`` counts against the budget."""
        return self.slab if _POOL_MIN <= nbytes <= self.slab else nbytes

    def reserve(self, nbytes: int) -> None:
        """Wait for room for ``nbytes`` and count them; ``take(..., reserved=True)`` then hands them out."""
        with self.cond:
            while self.out and self.out + nbytes > self.budget and not self.control.stopped:
                self.cond.wait()
            if self.control.stopped:
                raise Abort
            self.out += nbytes

    def take(self, nbytes: int, wait: bool = True, reserved: bool = False) -> Any:
        if wait and not reserved:
            self.reserve(self.charge(nbytes))
        elif not reserved:
            with self.cond:
                self.out += self.charge(nbytes)
        if not _POOL_MIN <= nbytes <= self.slab:
            return self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=self.pinned and nbytes > 0)
        with self.cond:
            slab = self.idle.pop() if self.idle else None
        if slab is None:
            slab = self.torch.empty(self.slab, dtype=self.torch.uint8, pin_memory=self.pinned)
        with self.cond:
            self.slabs[slab.data_ptr()] = slab
        return slab[:nbytes]

    def give(self, view: Any) -> None:
        with self.cond:
            self.out -= self.charge(view.numel())
            slab = self.slabs.pop(view.data_ptr(), None) if view.numel() >= _POOL_MIN else None
            if slab is not None:  # kept: there are never more slabs than the peak in flight
                self.idle.append(slab)
            self.cond.notify_all()


def slab_size(plan: MergePlan) -> int:
    """The largest buffer the pool hands out: a chunk read or cast, a touched tensor or its output."""
    slab = CHUNK_SIZE
    for tensors in plan.tensors:
        for t in tensors:
            wider = max(1.0, DTYPE_SIZES[t.out_dtype] / DTYPE_SIZES[t.src.dtype])
            slab = max(slab, math.ceil(CHUNK_SIZE * wider) if t.ops is None else
                       math.prod(t.src.shape) * max(DTYPE_SIZES[t.src.dtype], DTYPE_SIZES[t.out_dtype]))
    return slab


# ------------------------------------------------------------------------------------------------
# reader


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise MergeUnsupportedError("a file ended before the tensor it should hold", detail={"offset": offset})
        view, offset = view[n:], offset + n


class Reader:
    """Reads tensors in file order: untouched ones in chunks, touched ones whole with their adapter tensors."""

    def __init__(self, plan: MergePlan, shards: Sequence[BaseShard], adapters: Sequence[AdapterInput],
                 pool: Pool, out: Channel[ReadMessage]):
        self.plan, self.shards, self.adapters, self.pool, self.out = plan, shards, adapters, pool, out
        self.nowait = bool(RWF_NOWAIT) and hasattr(os, "posix_fadvise")  # drop-behind for cold base reads
        self.cold = False  # the current shard was found outside the page cache

    def run(self) -> None:
        fds: list[int] = []
        try:
            for adapter in self.adapters:
                fds.append(os.open(adapter.path, os.O_RDONLY))
            for index, shard in enumerate(self.shards):
                fd = os.open(shard.path, os.O_RDONLY)
                self.cold = False
                try:
                    self.out.put(OpenFile(index))
                    for t in self.plan.tensors[index]:
                        self.read(fd, shard, t, fds)
                    self.out.put(CloseFile(index))
                finally:
                    os.close(fd)
            self.out.put(END)
        finally:
            for fd in fds:
                os.close(fd)

    def read(self, fd: int, shard: BaseShard, t: PlannedTensor, adapter_fds: list[int]) -> None:
        start = shard.header.data_offset + t.src.start
        if t.ops is not None:
            sources = t.ops.sources()
            sizes = [t.src.nbytes] + [src.info.nbytes for src in sources]
            self.pool.reserve(sum(map(self.pool.charge, sizes)))  # all of them or none: no deadlock
            base_buf = self.buffer(fd, start, t.src.nbytes, reserved=True, base=True)
            loaded = {}
            for src in sources:
                offset = self.adapters[src.adapter].header.data_offset + src.info.start
                loaded[(src.adapter, src.key)] = self.buffer(adapter_fds[src.adapter], offset, src.info.nbytes,
                                                             reserved=True)
            self.out.put(Touched(t, base_buf, loaded))
            return
        step = CHUNK_SIZE - CHUNK_SIZE % DTYPE_SIZES[t.src.dtype]
        position, end = start, start + t.src.nbytes
        while True:
            n = min(step, end - position)
            data = self.buffer(fd, position, n, base=True)  # a cast is done on the CPU by the calling thread
            position += n
            self.out.put(Chunk(t, data, position == end))
            if position == end:
                return

    def buffer(self, fd: int, offset: int, nbytes: int, reserved: bool = False, base: bool = False) -> Any:
        buf = self.pool.take(nbytes, reserved=reserved)
        if nbytes:
            view = memoryview(buf.numpy())
            if base and self.nowait:
                self._read_base(fd, view, offset)
            else:
                _pread_into(fd, view, offset)
        return buf

    def _read_base(self, fd: int, view: memoryview, offset: int) -> None:
        """Read base bytes; a shard that was not in the page cache is dropped from it as it is read.

        A shard already cached (registered a moment ago, or merged before) stays cached and is read at
        memory speed. A cold one is read once and not kept (drop-behind): the pages just read are freed and
        reused by the next reads, instead of every read taking fresh pages and evicting others (for a model
        larger than memory caching it would only evict everything else; on VMs whose host backs guest memory
        lazily each fresh page costs a host fault). RWF_NOWAIT reads only cached pages: the first read that
        falls short marks the shard cold, for the rest of it (the kernel's readahead then caches pages ahead
        of the reads, which a per-read test would take for a warm file).
        """
        if not self.cold:
            try:
                n = os.preadv(fd, [view], offset, RWF_NOWAIT)
            except BlockingIOError:
                n = 0  # the first page is not cached
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.nowait = False  # this file system cannot tell: plain reads from now on
                _pread_into(fd, view, offset)
                return
            if n >= len(view):
                return
            self.cold = True
            view, offset = view[n:], offset + n
        _pread_into(fd, view, offset)
        os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)


# ------------------------------------------------------------------------------------------------
# compute (the calling thread)


def _cast_chunk(torch: Any, msg: Chunk, pool: Pool) -> Data:
    t, data = msg.tensor, msg.data
    if t.out_dtype != t.src.dtype:  # cast into a pooled buffer; the read one goes back at once
        out = pool.take(data.numel() // DTYPE_SIZES[t.src.dtype] * DTYPE_SIZES[t.out_dtype], wait=False)
        ops.cast_into(torch, t, data, out)
        pool.give(data)
        data = out
    return Data(data, msg.last, None, None, (data,))


def _merge(torch: Any, device: str, msg: Touched, pool: Pool, scratch: dict[str, Any]) -> Data:
    t, base_buf, loaded = msg.tensor, msg.base, msg.loaded
    host = pool.take(math.prod(t.src.shape) * DTYPE_SIZES[t.out_dtype], wait=False)
    event = None
    with torch.no_grad():
        if device.startswith("cuda"):  # copy back into pinned memory; the writer waits on the event, not this thread
            flat = ops.merge_tensor(torch, t, base_buf, loaded, device, scratch).reshape(-1)
            host.view(flat.dtype).copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            ops.merge_tensor(torch, t, base_buf, loaded, device, scratch, out=host)
    original = base_buf if t.out_dtype == t.src.dtype else None
    # every buffer goes back to the pool once written (after the event: CUDA copies read them until then)
    return Data(host, True, event, original, (host, base_buf, *loaded.values()))


def _compute(torch: Any, device: str, reads: Channel[ReadMessage], writes: Channel[WriteMessage], pool: Pool,
             tick: Callable[[], None]) -> None:
    """Compute what the reader hands over and pass it on to the writer, END included."""
    scratch: dict[str, Any] = {}
    tick()
    while True:
        msg = reads.get()
        if isinstance(msg, (OpenFile, CloseFile, _End)):
            writes.put(msg)
            if msg is END:
                return
        elif isinstance(msg, Chunk):
            writes.put(_cast_chunk(torch, msg, pool))
        else:
            writes.put(_merge(torch, device, msg, pool, scratch))
        del msg  # no buffer stays referenced while this thread waits
        tick()


# ------------------------------------------------------------------------------------------------
# writer


class Writer:
    """Writes and hashes the output files; counts what is done for progress."""

    def __init__(self, plan: MergePlan, out_dir: Path, inbox: Channel[WriteMessage], torch: Any, pool: Pool):
        self.plan, self.out_dir, self.inbox, self.torch, self.pool = plan, out_dir, inbox, torch, pool
        self.outputs: list[OutputFile] = []
        self.created: list[Path] = []  # removed by the calling thread if the merge fails
        self.done = (0, 0)  # tensors, bytes; read by the calling thread for progress
        self.file: OutFile | None = None
        self.planned: PlannedFile | None = None
        self.partial: Path | None = None
        self.changed = False

    def run(self) -> None:
        staging = Staging(self.torch)  # reused for every file
        try:
            while True:
                msg = self.inbox.get()
                if msg is END:
                    return
                if isinstance(msg, OpenFile):
                    self.open(msg.index, staging)
                elif isinstance(msg, Data):
                    self.write(msg)
                elif isinstance(msg, CloseFile):
                    self.close()
                del msg  # written buffers are not kept alive while this thread waits
        finally:
            if self.file is not None:
                self.file.abandon()
            staging.close()

    def open(self, index: int, staging: Staging) -> None:
        self.planned = self.plan.files[index]
        self.partial = self.out_dir / f".{self.planned.name}.partial"
        self.created.append(self.partial)
        self.file = OutFile(self.partial, staging)
        self.file.write(self.torch.frombuffer(bytearray(self.planned.header_bytes), dtype=self.torch.uint8))
        self.changed = self.planned.rebuilt
        self.done = (self.done[0], self.done[1] + len(self.planned.header_bytes))

    def write(self, msg: Data) -> None:
        assert self.file is not None
        if msg.event is not None:
            msg.event.synchronize()
        self.file.write(msg.data)
        if msg.original is not None and not self.changed:
            self.changed = not self.torch.equal(msg.data, msg.original)  # a fast memcmp on uint8 tensors
        self.done = (self.done[0] + msg.last, self.done[1] + msg.data.numel())
        for buf in msg.release:  # reused by the reader and the calling thread
            self.pool.give(buf)

    def close(self) -> None:
        assert self.file is not None and self.planned is not None and self.partial is not None
        digest = self.file.close()
        self.file = None
        final = self.out_dir / self.planned.name
        os.replace(self.partial, final)
        self.created.append(final)
        size = final.stat().st_size
        if size != self.planned.size:
            raise RuntimeError(f"wrote {size} bytes to {self.planned.name}, planned {self.planned.size}")
        self.outputs.append(OutputFile(self.planned.name, size, digest, self.changed, self.planned.data_size))


# ------------------------------------------------------------------------------------------------
# one run


def _ticker(progress: ProgressFn | None, plan: MergePlan, writer: Writer) -> Callable[..., None]:
    """``tick(final=False)``: report the writer's counts, at most every 0.1 s unless a tensor was finished."""
    totals = (plan.tensors_total, plan.bytes_total)
    reported: tuple[int, int] | None = None
    last_call = 0.0

    def tick(final: bool = False) -> None:
        nonlocal reported, last_call
        if progress is None:
            return
        done = totals if final else writer.done
        now = time.monotonic()
        if done == reported or (not final and reported and done[0] == reported[0] and now - last_call < 0.1):
            return
        reported, last_call = done, now
        progress(done[0], totals[0], done[1], totals[1])

    return tick


def run(plan: MergePlan, shards: Sequence[BaseShard], adapters: Sequence[AdapterInput], out_dir: Path, torch: Any,
        device: str, progress: ProgressFn | None) -> list[OutputFile]:
    """Merge ``plan`` into ``out_dir``; on any error every file this run created is removed."""
    control = Control()
    pool = Pool(torch, BYTE_BUDGET, slab_size(plan), device.startswith("cuda"), control)
    reads: Channel[ReadMessage] = Channel(control)
    writes: Channel[WriteMessage] = Channel(control)
    reader = Reader(plan, shards, adapters, pool, reads)
    writer = Writer(plan, out_dir, writes, torch, pool)
    tick = _ticker(progress, plan, writer)
    threads = [spawn(control, "loreg-merge-reader", reader.run), spawn(control, "loreg-merge-writer", writer.run)]
    ok = False
    try:
        with ops.on_device(torch, device):
            _compute(torch, device, reads, writes, pool, tick)
        threads[1].join()
        if control.stopped:  # the writer failed after the last message
            raise control.error()
        tick(final=True)
        ok = True
        return list(writer.outputs)
    except BaseException as exc:
        control.stop(exc)
        first = control.error()
        if first is exc:
            raise
        raise first from None
    finally:
        control.stop()
        for thread in threads:
            thread.join()
        if not ok:
            for path in writer.created:
                path.unlink(missing_ok=True)

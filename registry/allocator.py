"""The C allocator tuned for a process that streams large bodies (`loreg serve`).

Uploads arrive as 256 KiB pieces (one per socket read) and downloads leave in 1 MiB pieces. With
glibc's defaults a piece that size is served by mmap, or by heap growth that free() trims again, so
every piece lands on fresh pages: a page fault and a zeroed page per 4 KiB, which on a push cost the
server more CPU than hashing the bytes (bench/server_cpu.py; tests/faults/test_load.py counts the
faults). With the thresholds below, pieces up to ``MMAP_THRESHOLD`` come from the heap, and up to
``TRIM_THRESHOLD`` of freed heap stays mapped for the next ones: the process keeps at most that much
more memory than it uses.
"""

from __future__ import annotations

import ctypes
import platform

MIB = 1024 * 1024
MMAP_THRESHOLD = 4 * MIB
TRIM_THRESHOLD = 64 * MIB
_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3


def tune_for_streaming() -> bool:
    """Set glibc's mmap and trim thresholds for this process; whether it was done (glibc only:
    other C libraries keep their defaults)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))

"""Give freed heap memory back to the operating system during long runs (shard runs, GPU servers).

Both allocate and free many image-sized buffers (64 kB to a few MB) from several threads. glibc's
malloc keeps such freed memory in its arenas rather than returning it, so the process' RSS creeps up
while the live Python heap stays flat (``bench/soak.py --trace`` showed a flat traced heap under a
rising RSS). ``malloc_trim(0)`` returns the free pages of every arena; it takes milliseconds.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)  # glibc has it; musl does not
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return free heap pages to the OS where the C library can (glibc); True when it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

"""release_free_memory hands freed heap pages back to the OS (glibc), which a plain free() does not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from imgpipe_dagster import host_memory
from imgpipe_dagster.host_memory import release_free_memory

# In a fresh interpreter: 256 MB in 64 kB buffers (malloc'd from the heap, below the mmap threshold),
# one kept at the end so the heap's top cannot shrink on its own, the rest freed.
_PROBE = """
import json, psutil
from imgpipe_dagster.host_memory import release_free_memory
rss = lambda: psutil.Process().memory_info().rss / 2**20
before = rss()
buffers = [bytearray(64 * 1024) for _ in range(4096)]
pinned = bytearray(64 * 1024)
allocated = rss()
del buffers
freed = rss()
trimmed = release_free_memory()
after = rss()
print(json.dumps({"before": before, "allocated": allocated, "freed": freed, "after": after, "trimmed": trimmed}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_freed_buffers_leave_rss_only_after_a_trim():
    figures = json.loads(subprocess.run([sys.executable, "-c", _PROBE], check=True, capture_output=True,
                                        text=True).stdout)  # fmt: skip
    assert figures["trimmed"] is True
    assert figures["allocated"] - figures["before"] > 200  # the buffers were really resident
    assert figures["freed"] - figures["before"] > 150  # free() alone kept most of them
    assert figures["after"] - figures["before"] < 50  # the trim returned them


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_calling_it_again_trims_again():
    assert release_free_memory() is True
    assert release_free_memory() is True  # nothing is used up by the first call


def test_without_malloc_trim_it_says_it_could_not(monkeypatch):
    """A C library without malloc_trim (musl, macOS): nothing to call, and the caller is told so."""
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)

    assert release_free_memory() is False

"""Process settings for training: torch threads and how the C allocator treats freed tensor memory.

Both are set by the application (the commands and their worker processes), never on import.
"""
from __future__ import annotations

import ctypes
import os
import sys

KEEP_FREED_BYTES = 256 << 20
"""Free memory glibc keeps at the top of the heap instead of returning it to the system."""
HEAP_MAX_BLOCK_BYTES = 32 << 20
"""Blocks up to this size come from the heap, so the next batch reuses them (glibc's largest allowed value)."""


def set_threads(threads: int) -> None:
    """Torch (and OpenMP) threads of this process: one per process when several share a machine."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def keep_freed_memory() -> bool:
    """Let glibc reuse freed tensor memory instead of unmapping it (Linux with glibc; True when applied).

    By default glibc serves blocks above a few MB with ``mmap`` and returns them to the system when
    freed, so every batch's activations start as fresh pages: on a CPU the page faults cost about as
    much as the convolutions (the demo's training step 40 % slower). Serving blocks up to 32 MB from
    the heap and keeping up to 256 MB of freed memory avoids that. ``SER_LIGHTNING_MALLOC=default``
    keeps glibc's settings.
    """
    if os.environ.get("SER_LIGHTNING_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # another C library (musl, ...): its own allocator, left alone
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    applied = [libc.mallopt(m_mmap_threshold, HEAP_MAX_BLOCK_BYTES), libc.mallopt(m_trim_threshold, KEEP_FREED_BYTES),
               libc.mallopt(m_top_pad, 64 << 20)]
    return all(applied)

"""Process settings for training: torch threads, how the C allocator treats freed tensor memory, how
often torch asks the system for CUDA devices, and ending a distributed run's process group.

All are applied by the application (the commands, their worker processes, ``build_cli``), never on import.
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


def configure_worker(threads: int) -> None:
    """Settings of a study's worker process (one fold or one trial): its threads, the allocator as the commands set it."""
    set_threads(threads)
    keep_freed_memory()


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


def cache_cuda_check() -> bool:
    """On a machine without CUDA devices, answer ``torch.cuda.is_available()`` from torch's cached count.

    Importing Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (a device check through NVML that
    keeps forked processes able to use CUDA). torch does not cache that answer before CUDA is
    initialised, and every optimizer step asks it (the graph-capture health check): without NVML
    each ask is a failed library load (0.3-0.8 ms a step measured on a 2-core CPU). With no CUDA device
    there is nothing a fork could break, so torch's own cached check is used instead (True when
    switched). Call it after Lightning is imported; with devices present nothing changes.
    """
    import torch

    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1" or torch.cuda.device_count() > 0:
        return False
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    return True


def end_process_group() -> None:
    """Destroy the torch.distributed process group a command ran in (DDP), if any, before the process exits.

    Left to the interpreter's exit, gloo's worker threads can be torn down while still running, and the
    process then aborts ("terminate called without an active exception") after its work is done.
    """
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()

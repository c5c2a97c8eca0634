"""The process's memory allocator while models are timed: keep freed memory instead of handing it back.

PyTorch's CPU tensors come from ``malloc``. glibc's malloc serves a block above its mmap threshold (128 KiB, rising
with use to at most 32 MiB) with fresh pages from ``mmap`` and unmaps them at ``free``, and returns the heap's free
top to the system above its trim threshold; each forward pass then page-faults on its large activations again and
the kernel zeroes every page. Measured with this suite (``deit_t384`` batch 4, 2 threads, eval, Sparsifiner and full
attention alike): 33-41k minor page faults and 90-130 ms of system time per forward, 12-15 % of the CPU time;
``deit_s`` batch 64: 370-680k faults and 1.1-2.0 s of system time per forward. Inference servers avoid this
with an allocator that keeps memory (jemalloc or tcmalloc, the PyTorch CPU performance guide's advice; on GPUs
PyTorch's caching allocator), so timings with the default would measure the kernel's page zeroing, not the models.

``retain`` (the default of ``speed`` and ``run``) asks glibc for the same with two ``mallopt`` calls for the whole
process: ``M_MMAP_MAX = 0`` (no block is mmap'd on its own: every one comes from the heap) and ``M_TRIM_THRESHOLD =
INT_MAX`` (freed memory stays mapped), after which a warmed-up forward has no page faults (the test checks it). The
process's resident memory then stays at its peak. ``system`` leaves glibc's defaults (or sets them back).
An allocator preloaded with ``LD_PRELOAD`` (jemalloc, tcmalloc, mimalloc) is left alone and named in the rows;
on a C library other than glibc (macOS, musl) both modes leave the allocator as it is.

Every row records the allocator it was timed under (:func:`allocator_description`, in the row's ``versions``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache

__all__ = ["ALLOCATOR_MODES", "use_allocator", "allocator_description", "glibc_version", "preloaded_allocator"]

ALLOCATOR_MODES = ("retain", "system")
"""``--allocator`` values: ``retain`` (freed memory stays with the process) or ``system`` (glibc's defaults)."""

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc <malloc.h>
INT_MAX = 2**31 - 1  # mallopt's value is a C int
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 128 * 1024, M_TRIM_THRESHOLD: 128 * 1024}
RETAIN = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: INT_MAX}
_PRELOADS = ("jemalloc", "tcmalloc", "mimalloc")

_mode = "system"  # what this process runs under now (glibc's defaults until use_allocator changes them)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


def glibc_version() -> str | None:
    """glibc's version (e.g. ``"2.36"``), or None on another C library."""
    libc = _libc()
    return None if libc is None else libc.gnu_get_libc_version().decode()


def preloaded_allocator() -> str | None:
    """The allocator named in ``LD_PRELOAD`` (``jemalloc``, ``tcmalloc``, ``mimalloc``), or None."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in _PRELOADS if name in preload), None)


def use_allocator(mode: str) -> str:
    """Run this process's allocations under ``mode`` from now on (see the module docstring); returns
    :func:`allocator_description`.

    Raises:
        ValueError: for a mode not in :data:`ALLOCATOR_MODES`.
    """
    global _mode
    if mode not in ALLOCATOR_MODES:
        raise ValueError(f"--allocator takes {' or '.join(ALLOCATOR_MODES)}, got {mode!r}")
    libc = _libc()
    if libc is not None and preloaded_allocator() is None and mode != _mode:
        for param, value in (RETAIN if mode == "retain" else GLIBC_DEFAULTS).items():
            if libc.mallopt(param, value) != 1:
                raise RuntimeError(f"mallopt({param}, {value}) failed")
        _mode = mode
    return allocator_description()


def allocator_description() -> str:
    """The allocator timings of this process run under, as rows record it: e.g. ``"glibc 2.36 malloc, freed memory
    retained (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2147483647)"``, ``"glibc 2.36 malloc, defaults"``, ``"jemalloc
    (LD_PRELOAD)"``, ``"system malloc (not glibc)"``."""
    preloaded = preloaded_allocator()
    if preloaded:
        return f"{preloaded} (LD_PRELOAD)"
    version = glibc_version()
    if version is None:
        return "system malloc (not glibc)"
    if _mode == "retain":
        return f"glibc {version} malloc, freed memory retained (M_MMAP_MAX 0, M_TRIM_THRESHOLD {INT_MAX})"
    return f"glibc {version} malloc, defaults"

"""Keep freed CPU memory in the process while a decomposition runs.

A decomposition allocates and frees the same large tensors (quadrature nodes × directions ×
outputs × parameters) thousands of times. glibc serves every allocation above its mmap
threshold (128 KiB, raised at most to 32 MiB) with a fresh ``mmap`` and unmaps it on free, so
the kernel faults in and zeroes every block again (``bench/bench_heap.py`` measures what is
left of that since units keep the parameters at θ, ``engine.decompose.at_point``). ``retained_heap``
raises the mmap threshold to 512 MiB and the trim threshold to its maximum for its duration,
so freed blocks stay in the heap and are reused; on exit it hands the free memory back
(``malloc_trim``) and restores glibc's initial thresholds. Two things stay: glibc no longer
raises the mmap threshold on its own for the rest of the process (``mallopt`` switches that
off), and the room handed back inside the heap is reused later without ``mmap``. Blocks above
512 MiB still come from ``mmap``: kept in the heap as well, they fragmented it, up to 1.7×
the peak memory.

The command line enters it before a command starts; ``explain_history`` enters it too (nested
uses are counted, only the outermost one restores). The setting is process-wide. Elsewhere
than glibc (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DEFAULT_THRESHOLD = 128 * 1024        # glibc's initial value of both thresholds
RETAINED_MMAP_THRESHOLD = 2**29       # 512 MiB; larger blocks still come from mmap
RETAINED_TRIM_THRESHOLD = 2**31 - 1   # mallopt takes an int: never trim on free

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # only glibc has it


_LIBC = _glibc()


def available() -> bool:
    """Whether this process's C library honours ``retained_heap``."""
    return _LIBC is not None


def _set(mmap_threshold: int, trim_threshold: int) -> None:
    assert _LIBC is not None
    _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


@contextlib.contextmanager
def retained_heap() -> Iterator[None]:
    """Within the block, freed allocations of up to 512 MiB are kept for reuse."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _set(RETAINED_MMAP_THRESHOLD, RETAINED_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(_DEFAULT_THRESHOLD, _DEFAULT_THRESHOLD)
                _LIBC.malloc_trim(0)

"""Keep freed CPU memory in the process while a decomposition runs.

A decomposition allocates and frees the same large tensors (quadrature nodes × directions ×
outputs × parameters) thousands of times. glibc serves every allocation above its mmap
threshold (128 KiB, raised at most to 32 MiB) with a fresh ``mmap`` and unmaps it on free, so
the kernel faults in and zeroes every block again: on the grokking transformer that was more
than half of the wall time. ``retained_heap`` raises the mmap and trim thresholds for its
duration, so freed blocks stay in the heap and are reused; on exit it hands the free memory
back (``malloc_trim``) and restores glibc's defaults.

The command line enters it before a command starts, where it leaves peak memory as it was;
``explain_history`` enters it too (nested uses are counted, only the outermost one restores),
where, entered that late into a process, the heap takes a few more blocks to settle. The
setting is process-wide. Elsewhere than glibc (macOS, musl, Windows) it does nothing.
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
_RETAINED_MMAP = 2**30                 # larger blocks than this still come from mmap
_RETAINED_TRIM = 2**31 - 1             # mallopt takes an int: never trim on free

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
    """Within the block, freed memory up to 1 GiB per allocation is kept for reuse."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _set(_RETAINED_MMAP, _RETAINED_TRIM)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(_DEFAULT_THRESHOLD, _DEFAULT_THRESHOLD)
                _LIBC.malloc_trim(0)

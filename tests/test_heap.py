"""engine.decompose.heap: inside ``retained_heap`` a freed large block is reused without new page faults."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.decompose import heap

pytestmark = pytest.mark.skipif(not heap.available(), reason="needs glibc")

BLOCK = 64 * 2**20            # above glibc's largest dynamic mmap threshold (32 MiB)
PAGES = BLOCK // resource.getpagesize()


def _faults_per_allocation(n: int = 30) -> list[int]:
    """Minor page faults of allocating, filling and freeing one block, n times.

    Inside the heap the first few blocks are new: a freed block is reused once it has
    coalesced with its neighbours into room for the aligned request."""
    faults = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(BLOCK // 4).fill_(1.0)
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


def _faults_in_a_fresh_process(retained: bool) -> list[int]:
    """``_faults_per_allocation`` in a new interpreter: a process that has left a retained heap
    keeps the free room it hands back, and reuses it without faults even outside."""
    measure = "json.dumps(_faults_per_allocation())"
    body = f"with heap.retained_heap(): print({measure})" if retained else f"print({measure})"
    code = ("import json\nfrom engine.decompose import heap\n"
            f"from tests.test_heap import _faults_per_allocation\n{body}\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_outside_every_allocation_is_faulted_in_again():
    assert all(f > PAGES // 2 for f in _faults_in_a_fresh_process(retained=False)[-4:])


def test_inside_a_freed_block_is_reused():
    assert all(f < PAGES // 10 for f in _faults_in_a_fresh_process(retained=True)[-4:])


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def test_nesting_is_counted_and_the_outermost_exit_hands_memory_back():
    large = 4 * BLOCK
    with heap.retained_heap():
        with heap.retained_heap():
            pass
        before = _resident()
        block = torch.empty(large // 4).fill_(1.0)
        del block
        inside = _resident()
        assert inside > before + large // 2  # the inner exit kept it: the freed block stayed
    assert _resident() < inside - large // 2

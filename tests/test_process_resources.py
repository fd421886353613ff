"""What a training process sets up for itself: its allocator keeps the memory a step frees."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh process: where a 16 MiB tensor's memory comes from, and whether the process still
# holds it once the tensor is freed (glibc's mallinfo2: hblkhd is memory in mmapped blocks,
# arena the heap's size).
STEP = """
import ctypes, sys, torch
from vastdet.engine.threads import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "kept":
    assert keep_freed_memory()
before = libc.mallinfo2()
x = torch.empty(4 << 20).fill_(1.0)  # 16 MiB
during = libc.mallinfo2()
del x
after = libc.mallinfo2()
print((during.hblkhd - before.hblkhd) >> 20, after.arena >> 20)
"""


def allocation(mode: str) -> tuple[int, int]:
    """(MiB of the tensor served by mmap, MiB of heap held after it was freed)."""
    out = subprocess.run(
        [sys.executable, "-c", STEP, mode], capture_output=True, text=True, check=True
    )
    mapped, heap = out.stdout.split()[-2:]
    return int(mapped), int(heap)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_step_reuses_the_memory_it_freed():
    # glibc's defaults: a fresh mmap for the tensor, unmapped when it is freed, so the next
    # step faults all of its pages in again (a CPU dino_tiny step ran ~25% slower)
    mapped, _ = allocation("default")
    assert mapped >= 16
    # kept: the tensor comes from the heap, and the heap keeps it after it is freed
    mapped, heap = allocation("kept")
    assert mapped == 0 and heap >= 16


def test_the_fault_tests_kill_only_ray_train_workers_of_their_own_cluster(tmp_path):
    """`two_nodes.train_worker_pids` (what the recovery tests SIGKILL) finds a process titled
    as a Ray Train worker below this process, and not one that another job on the machine
    started (here: detached with setsid and a double fork, so init is its parent)."""
    import os
    import time

    from two_nodes import train_worker_pids

    title = "ray::RayTrainWorker.__init__"
    ours = subprocess.Popen(["bash", "-c", f"exec -a '{title}' sleep 60"])
    marker = tmp_path / "theirs.pid"
    detached = f"( exec -a '{title}' sleep 60 & echo $! > {marker} ) &"
    subprocess.run(["setsid", "bash", "-c", detached], check=True)
    try:
        deadline = time.monotonic() + 10
        while not (marker.is_file() and marker.read_text().strip()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        theirs = int(marker.read_text())
        while ours.pid not in train_worker_pids():
            assert time.monotonic() < deadline, "our worker was not found"
            time.sleep(0.05)
        found = train_worker_pids()
        assert ours.pid in found and theirs not in found
        assert theirs in train_worker_pids(root=1)  # below init, where the detached one lives
    finally:
        ours.kill()
        if marker.is_file() and marker.read_text().strip():
            os.kill(int(marker.read_text()), 9)

"""Each training process takes its share of the cores, no more, and reuses its memory.

On a shared node, intra-op thread pools that together hold more runnable threads than there are
cores wait at every operator's barrier for a thread that is not running: a `dino_tiny` step took
4.6 s with 2 threads against 0.54 s with 1 while another process shared the 2 cores (8.6x).

The share: the CPUs this process may run on (its affinity, which Ray and container limits set),
or OMP_NUM_THREADS when the launcher sets it, divided by the training processes on the node
(LOCAL_WORLD_SIZE from torchrun and Ray Train, LOCAL_SIZE from DeepSpeed's launcher). Loader
workers decode with one thread each at a lower scheduling priority (`pipelines.loader`), so they
fill the cycles the trainer leaves and yield the cores when it computes.

Each training process also keeps the memory a step frees for the next step
(`keep_freed_memory`), rather than handing it back to the system and faulting it in again.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """Training processes on this node, from the launcher's environment (1 when unknown)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    return 1


def thread_share() -> tuple[int, str]:
    """(intra-op threads, how they were chosen) for this process."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        given, source = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
        return max(1, given), f"{source}={given}"
    cpus, procs = available_cpus(), local_processes()
    return max(1, cpus // procs), f"{cpus} CPUs / {procs} training processes on the node"


def set_threads(requested: int | None = None) -> int:
    """Set this process's intra-op threads: `requested` (the config's `threads`) or its share;
    logs the choice. Returns the count."""
    threads, why = (requested, "config threads") if requested else thread_share()
    torch.set_num_threads(threads)
    log.info("intra-op threads: %d (%s)", threads, why)
    return threads


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep the memory a training step frees for the next step.

    By default glibc serves large allocations (a CPU step's activations and gradients) with
    fresh mmaps, or trims them off the heap when freed, so every step faults its tensors' pages
    in again: `vastdet train` of `dino_tiny` (one process, 2 threads) ran at 14 images/s that
    way and at 18-24 with this, while the bare loop of `benchmarks/bench_trainer.py` gained
    only 4%. Allocations up to 32 MiB then come from the heap, and up to 1 GiB of freed memory
    stays mapped. A no-op (False) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if ok:
        log.info("allocator: freed memory kept for reuse (glibc mmap threshold 32 MiB)")
    return ok

"""Joining the process group: a plain process, any launcher, or a Ray Train worker. Rank, world
size and rendezvous come from the environment, never from the caller."""

from __future__ import annotations

import os

import torch


def prepare_deepspeed():
    """Import DeepSpeed for this machine: the CPU accelerator when there is no GPU, and no JIT
    build of the shared-memory communication op (gloo does the work)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def init_distributed(deepspeed) -> tuple[int, int]:
    """Join the process group the environment describes. A plain single process (no
    WORLD_SIZE) makes a world of one over an in-memory store: it opens no rendezvous port."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            store = torch.distributed.HashStore()
            torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1

"""Joining the process group: a plain process, any launcher, or a Ray Train worker. Rank, world
size and rendezvous come from the environment, never from the caller."""

from __future__ import annotations

import os

import torch


def choose_accelerator() -> None:
    """DeepSpeed's CPU accelerator when there is no GPU, chosen before DeepSpeed is imported
    (left to itself, it warns on every command that it could not detect a GPU)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def prepare_deepspeed():
    """Import DeepSpeed for this machine: the CPU accelerator when there is no GPU, and no JIT
    build of the shared-memory communication op (gloo does the work)."""
    choose_accelerator()
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def init_distributed(deepspeed) -> tuple[int, int]:
    """Join the process group the environment describes. A plain single process (no
    WORLD_SIZE, or a world of one with no rendezvous address, as a parent process that ran
    one leaves behind) makes a world of one over an in-memory store: it opens no port."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        alone = os.environ.get("WORLD_SIZE", "1") == "1" and "MASTER_ADDR" not in os.environ
        if alone:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            store = torch.distributed.HashStore()
            torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1

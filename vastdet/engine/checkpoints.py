"""Checkpoints that survive a kill at any moment: written under a temporary tag, renamed when
every rank has finished, found again by the newest complete tag."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(directory: str | os.PathLike) -> list[str]:
    """Complete checkpoint tags, oldest first (partial ones end in `.partial` and are ignored)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG.match(p.name))


def save(engine, directory: str | os.PathLike, step: int, client_state: dict, keep: int) -> Path:
    """Every rank calls this (DeepSpeed's save is collective)."""
    root = Path(directory)
    final = root / tag_for(step)
    partial = tag_for(step) + ".partial"
    engine.save_checkpoint(str(root), tag=partial, client_state=client_state, save_latest=False)
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / partial, final)
        for old in complete_tags(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(root / old, ignore_errors=True)
    _barrier()
    return final


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

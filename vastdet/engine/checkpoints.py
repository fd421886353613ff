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


MARKER = ".rank_"  # a rank was here: names which ranks see one partial folder


def save(engine, directory: str | os.PathLike, step: int, client_state: dict, keep: int) -> Path:
    """Every rank calls this (DeepSpeed's save is collective).

    The output folder may be one disk every rank sees, a disk per node, or anything between:
    each rank leaves a marker in the partial folder, and on every disk view the lowest rank
    whose marker is seen there renames the partial folder to its final name and prunes old
    tags. Nothing depends on the launcher's idea of which ranks share a node."""
    root = Path(directory)
    final = root / tag_for(step)
    partial = root / (tag_for(step) + ".partial")
    engine.save_checkpoint(
        str(root), tag=partial.name, client_state=client_state, save_latest=False
    )
    rank, mark = _rank(), f"{MARKER}{_save_token()}_"  # markers of an earlier, killed save
    partial.mkdir(parents=True, exist_ok=True)  # carry another token and are not counted
    (partial / f"{mark}{rank}").touch()
    _barrier()
    seen = [int(m.name[len(mark) :]) for m in partial.glob(f"{mark}*")]
    _barrier()  # every rank has looked before any marker goes
    if min(seen) == rank:
        for marker in partial.glob(f"{MARKER}*"):
            marker.unlink()
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in complete_tags(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(root / old, ignore_errors=True)
    _barrier()
    return final


def _save_token() -> str:
    """A token every rank shares for this save (rank 0's, broadcast)."""
    token = [os.urandom(6).hex()]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(token, src=0)
    return token[0]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

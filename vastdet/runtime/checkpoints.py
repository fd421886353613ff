"""Checkpoints that survive a kill at any moment: written under a temporary tag, renamed when
every rank has finished, found again by the newest complete tag. A disk that fills while one
rank writes its part stops every rank with the same message, none left waiting."""

from __future__ import annotations

import gc
import os
import re
import shutil
from pathlib import Path

import torch

from taxonomy.files import NoSpaceError, disk_full, free_text, size_text
from vastdet.runtime.partitions import load_checkpoint_file

TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(directory: str | os.PathLike) -> list[str]:
    """Complete checkpoint tags, oldest first (partial ones end in `.partial` and are ignored)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG.match(p.name))


class CheckpointEngine:
    """DeepSpeed's checkpoint engine as a run uses it. A checkpoint is read as data
    (`load_checkpoint_file`), never unpickled: a run folder may have been handed to us. A write
    that finds its disk full is noted instead of raised: this rank then goes on through the
    save's collectives with the others (raising there would leave them waiting for it in the
    save's last barrier), writing nothing more of that checkpoint, and `save` stops every rank
    together. Everything else (commit, makedirs) is the wrapped engine's."""

    def __init__(self, inner):
        self._inner = inner
        self.disk_full = False

    def load(self, path: str, map_location=None) -> dict:
        return load_checkpoint_file(path)

    def save(self, state_dict, path: str) -> None:
        if self.disk_full:
            return  # the checkpoint is lost already
        try:
            self._inner.save(state_dict, path)
        except (OSError, RuntimeError) as err:
            if not disk_full(err, Path(path).parent):
                raise
            self.disk_full = True

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


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
    writes = engine.checkpoint_engine  # a CheckpointEngine (the trainer sets it up)
    writes.disk_full = False
    try:
        engine.save_checkpoint(
            str(root), tag=partial.name, client_state=client_state, save_latest=False
        )
    except (OSError, RuntimeError) as err:  # DeepSpeed's own file work (the folder, rank 0's
        # recovery scripts, rewritten in place): a save that starts on a full disk. A rank that
        # lands here while the others went on would not meet them in the gather below (not
        # handled: the writes that fill a disk are the engine's)
        if not disk_full(err, root):
            raise
        writes.disk_full = True
    message = None
    if writes.disk_full:  # out of the except block: the failed write's frames, and its open
        gc.collect()  # file, are gone (an unlinked file that is still open keeps its space)
        shutil.rmtree(partial, ignore_errors=True)  # it can never be completed: give it back
        message = (_rank(), str(no_space_for_checkpoint(root, final)))
    failed = [f for f in _gather(message) if f]  # every rank hears of every full disk
    if failed:
        shutil.rmtree(partial, ignore_errors=True)
        rank, text = failed[0]
        if rank != _rank():
            text = text.replace(f"{final}:", f"{final} (on rank {rank}'s disk):", 1)
        raise NoSpaceError(text)
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


def no_space_for_checkpoint(root: Path, final: Path) -> NoSpaceError:
    """The error for a checkpoint the disk had no room for: what a checkpoint of this run
    takes (the newest complete one's size), what is free, and what to resume from."""
    tags = complete_tags(root)
    if tags:
        newest = root / tags[-1]
        size = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
        need = f"a checkpoint of this run takes about {size_text(size)}"
        resume = f"the newest complete checkpoint is {newest}"
    else:
        need = "no checkpoint of this run was complete yet to size one"
        resume = "no checkpoint is complete, so a resumed run starts from step 0"
    return NoSpaceError(
        f"no space left to write checkpoint {final}: {need}, {free_text(root)}; {resume}; "
        "free space there (or give output_dir on a larger disk) and start the run again to "
        "resume"
    )


def _gather(item):
    """`item` from every rank, in rank order ([item] alone without a process group)."""
    if not torch.distributed.is_initialized():
        return [item]
    items = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(items, item)
    return items


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

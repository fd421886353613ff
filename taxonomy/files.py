"""File helpers every package uses: atomic writes, streaming digests and data-only loading of
PyTorch files."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class NoSpaceError(OSError):
    """A file could not be written because its disk is full. The message names the file, the
    space it needed (at least what was written before the disk filled) and what is free; the
    file it was to replace, if any, is intact."""


FULL_BELOW = 1 << 20  # a disk with less free space than this after a failed write is full


def disk_full(err: BaseException, directory: str | os.PathLike) -> bool:
    """Whether a failed write's error comes from a full disk: ENOSPC, or (PyTorch's writer
    reports a full disk as a stream error without errno) almost nothing free under
    `directory` while the partial file still takes its space."""
    import errno
    import shutil

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(directory).free < FULL_BELOW
    except OSError:
        return False


def size_text(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


def free_text(directory: str | os.PathLike) -> str:
    import shutil

    try:
        return f"{size_text(shutil.disk_usage(directory).free)} free"
    except OSError:
        return "free space unknown"


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so `.gz` stays gzip); on success it is
    renamed onto `path`, on error removed. Readers never see a half-written file. A write that
    fails on a full disk raises `NoSpaceError` naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if isinstance(err, NoSpaceError) or not disk_full(err, path.parent):
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        if tmp.exists():
            tmp.unlink()
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise NoSpaceError(
            f"no space left to write {path}: it needs more than {size_text(written)} (written "
            f"before the disk filled), {free_text(path.parent)}{kept}; free space there or "
            "write elsewhere"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks (shards can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class UnsafeFileError(ValueError):
    """A file that would run code (or build objects outside an allow-list) when loaded."""


_REFUSED = re.compile(r"GLOBAL ([\w.]+)|[Uu]nsupported operand (\S+)")


def load_data(path: str | os.PathLike, allowed: Iterable[type] = ()) -> Any:
    """`torch.load` of a file someone may have handed us, as data only: tensors, numbers,
    strings and containers, plus the classes in `allowed` (e.g. DeepSpeed's loss-scaler
    record in its checkpoints). A pickle that asks for anything else (a function to call, a
    class to build) is refused with `UnsafeFileError`, which names the file and what it asked
    for; nothing in it runs."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _REFUSED.search(str(err))
        what = (found.group(1) or found.group(2)) if found else "an object that is not data"
        raise UnsafeFileError(
            f"{path}: refused to load: it names {what}, which is not data "
            "(vastdet reads checkpoint, model and embedding files as tensors, numbers and "
            "strings only, so that a file cannot run anything)"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable PyTorch file ({err})") from None

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


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so `.gz` stays gzip); on success it is
    renamed onto `path`, on error removed. Readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
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

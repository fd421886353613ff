"""Helpers shared by the taxonomy file formats: opening (optionally gzipped) files, node ids."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path
from typing import IO

from taxonomy.files import atomic_output

CATEGORY_NODE_PREFIX = "category:"
SUPERCATEGORY_NODE_PREFIX = "supercategory:"


def open_text(path: str | os.PathLike, mode: str = "r") -> IO[str]:
    """Open a UTF-8 text file for reading or writing; `.gz` paths are (de)compressed."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8", newline="")
    return open(path, mode, encoding="utf-8", newline="")


def atomic_write_text(path: str | os.PathLike, write) -> None:
    """Call `write(handle)` on a temporary file next to `path`, then rename it into place."""
    with atomic_output(path) as tmp, open_text(tmp, "w") as handle:
        write(handle)


def base_suffix(path: str | os.PathLike) -> str:
    """The suffix that names the format: `x.json.gz` -> `.json`."""
    suffixes = Path(path).suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def category_node_id(category_id: int) -> str:
    """Node id given to a category read from a format that has no node ids of its own."""
    return f"{CATEGORY_NODE_PREFIX}{category_id}"

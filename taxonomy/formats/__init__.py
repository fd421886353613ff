"""Reading and writing taxonomy files in every supported format.

| format       | file                              | holds                                     |
|--------------|-----------------------------------|-------------------------------------------|
| `vastdet`    | `.json` / `.json.gz` (our own)    | everything                                |
| `v3det`      | V3Det category-tree `.json`       | DAG, names, descriptions, synonyms        |
| `coco`       | COCO `categories` `.json`         | categories + one supercategory level      |
| `cqdino-csv` | CQ-DINO tree `.csv`               | category-only DAG, names, descriptions    |
| `names`      | `.txt`, line i names category i   | names only                                |
"""

from __future__ import annotations

import json
import os

from taxonomy.formats.coco import from_coco, is_coco, write_coco
from taxonomy.formats.common import base_suffix, open_text
from taxonomy.formats.cqdino_csv import read_cqdino_csv, write_cqdino_csv
from taxonomy.formats.names import read_names, write_names
from taxonomy.formats.native import from_native, is_native, write_native
from taxonomy.formats.v3det import from_v3det, is_v3det, write_v3det
from taxonomy.tree import Taxonomy, TaxonomyError

FORMATS = ("vastdet", "v3det", "coco", "cqdino-csv", "names")
_WRITERS = {
    "vastdet": write_native,
    "v3det": write_v3det,
    "coco": write_coco,
    "cqdino-csv": write_cqdino_csv,
    "names": write_names,
}
_JSON_READERS = (
    ("vastdet", is_native, from_native),
    ("v3det", is_v3det, from_v3det),
    ("coco", is_coco, from_coco),
)


def _check_format(fmt: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown taxonomy format {fmt!r}; choose one of {', '.join(FORMATS)}")


def load_taxonomy(path: str | os.PathLike, fmt: str | None = None) -> Taxonomy:
    """Read a taxonomy file; the format is detected from the suffix and content unless given."""
    _check_format(fmt)
    source = os.fspath(path)
    suffix = base_suffix(path)
    if fmt == "cqdino-csv" or (fmt is None and suffix == ".csv"):
        return read_cqdino_csv(path)
    if fmt == "names" or (fmt is None and suffix == ".txt"):
        return read_names(path)
    with open_text(path) as handle:
        try:
            obj = json.load(handle)
        except json.JSONDecodeError as err:
            raise TaxonomyError(f"{source}: not valid JSON ({err})") from None
    for name, detect, read in _JSON_READERS:
        if fmt == name or (fmt is None and detect(obj)):
            return read(obj, source)
    raise TaxonomyError(
        f"{source}: cannot tell the taxonomy format (not a vastdet taxonomy file, a V3Det category "
        "tree or COCO categories); pass the format explicitly"
    )


def default_format(path: str | os.PathLike) -> str:
    """The format a path's suffix implies when writing: .csv, .txt, otherwise our own JSON."""
    return {".csv": "cqdino-csv", ".txt": "names"}.get(base_suffix(path), "vastdet")


def save_taxonomy(taxonomy: Taxonomy, path: str | os.PathLike, fmt: str | None = None) -> None:
    """Write `taxonomy` to `path` atomically in `fmt` (default: implied by the suffix)."""
    _check_format(fmt)
    _WRITERS[fmt or default_format(path)](taxonomy, path)


__all__ = ["FORMATS", "default_format", "load_taxonomy", "save_taxonomy"]

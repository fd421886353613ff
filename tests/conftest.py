"""Shared fixtures: small hand-made taxonomies and the real V3Det category files (carried in
`tests/data/v3det`, gzip-compressed; see its README for the licence)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from taxonomy import Node, Taxonomy

# One intra-op thread for the suite's own torch work and for every process it starts (they
# inherit the variable), unless OMP_NUM_THREADS says otherwise. The suite runs processes side by
# side (two ranks, a Ray cluster, loader workers), often beside other jobs, and a pool of two
# threads on two busy cores waits at every operator's barrier for a thread that is not running
# (`vastdet.engine.threads`): 15 steps of the memorise test's DINO took 102.7 s with 2 threads
# against 7.4 s with 1 beside two busy processes.
if not os.environ.get("OMP_NUM_THREADS", "").isdigit():
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))

V3DET_DATA = Path(__file__).resolve().parent / "data" / "v3det"
V3DET_NAMES = V3DET_DATA / "category_name_13204_v3det_2023_v1.txt.gz"
V3DET_CAT_INFO = V3DET_DATA / "v3det_2023_v1_train_cat_info.json.gz"


def pytest_report_header(config):
    """The free disk where tests write: a test that runs out of it fails in ways that do not say
    so (a truncated checkpoint, a worker that dies), so the header says how much there was."""
    base = Path(config.option.basetemp or tempfile.gettempdir()).resolve()
    while not base.exists():
        base = base.parent
    free = shutil.disk_usage(base).free
    return f"free disk under {base}: {free / 2**30:.1f} GiB (the suite needs about 2 at a time)"


@pytest.fixture
def vehicles() -> Taxonomy:
    """A small DAG: `thing` is not a category; `amphibious car` has two parents.

    thing
    ├── vehicle #1
    │   ├── car #2
    │   │   ├── sedan #3
    │   │   └── amphibious car #5   (also under boat)
    │   ├── boat #4
    │   │   └── amphibious car #5
    │   └── truck #6
    └── animal #7
        └── cat #8
    """
    return Taxonomy(
        [
            Node("thing", "thing", description="root, not a category"),
            Node("vehicle", "vehicle", ("thing",), 1, synonyms=("conveyance",)),
            Node("car", "car", ("vehicle",), 2, synonyms=("auto", "automobile")),
            Node("sedan", "sedan", ("car",), 3, description="a car for four"),
            Node("boat", "boat", ("vehicle",), 4),
            Node("amph", "amphibious car", ("car", "boat"), 5, attributes={"novel": True}),
            Node("truck", "truck", ("vehicle",), 6),
            Node("animal", "animal", ("thing",), 7),
            Node("cat", "cat", ("animal",), 8, attributes={"name_zh": "猫"}),
        ],
        metadata={"name": "vehicles"},
    )


def columns_equal(a: Taxonomy, b: Taxonomy, fields=None) -> None:
    """Assert two taxonomies hold the same nodes (compared by node id, order-insensitive)."""
    fields = fields or ("name", "parents", "category_id", "synonyms", "description", "attributes")
    assert sorted(a.ids) == sorted(b.ids)
    for node_id in a.ids:
        x, y = a.node(node_id), b.node(node_id)
        for f in fields:
            vx, vy = getattr(x, f), getattr(y, f)
            if f == "parents":
                vx, vy = sorted(vx), sorted(vy)
            assert vx == vy, f"{node_id}.{f}: {vx!r} != {vy!r}"


class NewTensorsShaped(TorchDispatchMode):
    """Within it, the ops that create a tensor of `shape` (views and in-place writes do not):
    how a test sees a full-size temporary that a memory-lean path must not make."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.made = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape:
                    self.made.append(str(func))
        return out

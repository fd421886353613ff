"""The DeepSpeed training engine: one process with resume, and two ranks under ZeRO-2 and ZeRO-3
on gloo where batches without targets occur (every parameter must take part on every rank)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.shards import write_shards
from pipelines.synthetic import SynthConfig, SyntheticRenderer, make_records
from taxonomy import Node, Taxonomy, save_taxonomy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """24 small synthetic images, about half of them without objects."""
    root = tmp_path_factory.mktemp("engine")
    tax = Taxonomy(
        [Node("r", "thing", category_id=1)]
        + [Node(f"c{i}", f"kind {i}", ("r",), i) for i in range(2, 6)]
    )
    save_taxonomy(tax, root / "tax.json")
    cfg = SynthConfig(
        num_train=24, num_val=0, min_side=64, max_side=96, min_objects=0, max_objects=2, seed=3
    )
    write_shards(
        make_records(tax, cfg)["train"],
        SyntheticRenderer(tax, cfg),
        root / "shards",
        max_samples=8,
        workers=1,
        categories_file=root / "tax.json",
        progress=False,
    )
    return root


def config(dataset: Path, out: Path, **overrides) -> Path:
    cfg = {
        "model": "dino_tiny",
        "data": {
            "train_shards": str(dataset / "shards"),
            "batch_size": 1,
            "num_workers": 1,
            "shuffle_buffer": 8,
            "transforms": {"scales": [64, 80], "max_size": 112, "crop_resize": []},
        },
        "optim": {"lr": 1e-3, "clip_grad": 1.0},
        "steps": 8,
        "steps_per_epoch": 5,
        "log_every": 1,
        "checkpoint_every": 4,
        "zero_stage": 0,
        "output_dir": str(out),
    }
    cfg.update(overrides)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(config_path: Path, world: int = 1) -> list[dict]:
    """Run `python -m vastdet.engine.train` as `world` ranks; returns the metrics lines."""
    env_base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vastdet.engine.train", "--config", str(config_path)],
            env={**env_base, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    cfg = yaml.safe_load(config_path.read_text())
    return [
        json.loads(line)
        for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]


def test_resumed_run_matches_an_uninterrupted_one(dataset, tmp_path):
    straight = run(config(dataset, tmp_path / "straight"))
    assert [m["step"] for m in straight] == list(range(1, 9))
    stopped = config(dataset, tmp_path / "stopped", steps=4)
    first = run(stopped)
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    resumed = run(
        config(dataset, tmp_path / "stopped", steps=8)
    )  # same run directory: resumes at 4
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a, b)
    assert all(m["skipped_steps"] == 0 for m in resumed)
    # export: the plain file holds exactly the weights DeepSpeed saved, and loads without it
    from vastdet.cli import main

    exported = tmp_path / "model.pt"
    assert main(["export", str(tmp_path / "straight"), "-o", str(exported)]) == 0
    payload = torch.load(exported, map_location="cpu", weights_only=True)
    saved = torch.load(
        tmp_path / "straight" / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=True,
    )["module"]
    assert set(payload["model"]) == set(saved)
    assert all(torch.equal(payload["model"][k], saved[k]) for k in saved)
    assert main(["plot", str(tmp_path / "straight")]) == 0
    assert (tmp_path / "straight" / "plots" / "losses.png").stat().st_size > 1000


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_train_under_zero(dataset, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    metrics = run(config(dataset, out, zero_stage=stage, steps=10, checkpoint_every=10), world=2)
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 10 and all(l == l for l in losses)  # noqa: E741 - finite, no NaN
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    shards = sorted(p.name for p in (out / "checkpoints" / "step_00000010").iterdir())
    assert any("zero_pp_rank_1" in name for name in shards), (
        shards
    )  # both ranks hold a ZeRO partition

"""CQ-DINO's two-stage pipeline submitted with the Ray Jobs API to a real `ray start` cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_engine import config, dataset, free_port  # noqa: F401 - the shared synthetic dataset

from cluster.local import loopback_environment
from cluster.submit import submit_pipeline, wait_for


@pytest.fixture
def ray_cluster(tmp_path):
    """A head node on loopback, token auth off, the venv's python first on PATH (jobs run it)."""
    env = {
        **os.environ,
        **loopback_environment(),
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    port, dashboard = free_port(), free_port()
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run(
        [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port)]
        + ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2"]
        + ["--include-dashboard", "true", "--disable-usage-stats"],
        env=env,
        check=True,
        capture_output=True,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)


def test_pipeline_runs_as_a_submitted_ray_job(ray_cluster, dataset, tmp_path):  # noqa: F811
    address, env = ray_cluster
    stage1 = yaml.safe_load(
        config(dataset, tmp_path / "s1", model="cq_dino_tiny_stage1", steps=2).read_text()
    )
    stage2 = yaml.safe_load(
        config(dataset, tmp_path / "s2", evaluate=True, model="cq_dino_tiny", steps=3).read_text()
    )
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        yaml.safe_dump({"stage1": stage1, "stage2": stage2, "num_workers": 1, "max_failures": 0})
    )
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the client side of a cluster without tokens
    try:
        job = submit_pipeline(address, pipeline)
        status = wait_for(address, job, timeout_s=600)
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
    assert status == "SUCCEEDED"
    metrics = json.loads((tmp_path / "s2" / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 5 and "AR_C" in metrics
    # stage 2 started from stage 1: the pipeline filled in init_from
    saved = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert saved["model"]["init_from"] == str(tmp_path / "s1")


def test_relative_paths_reach_ray_workers_as_absolute_ones(tmp_path, monkeypatch):
    from cluster.pipeline import absolute_paths

    monkeypatch.chdir(tmp_path)
    stage = {
        "output_dir": "runs/s2",
        "data": {"train_shards": "shards/train", "val_shards": None, "categories": "/t.json"},
        "model": {"init_from": "runs/s1", "backbone_weights": None, "category_embeddings": None},
    }
    out = absolute_paths(stage)
    assert out["output_dir"] == str(tmp_path / "runs/s2")
    assert out["data"]["train_shards"] == str(tmp_path / "shards/train")
    assert out["data"]["categories"] == "/t.json" and out["data"]["val_shards"] is None
    assert out["model"]["init_from"] == str(tmp_path / "runs/s1")
    assert stage["output_dir"] == "runs/s2"  # the caller's config is left as it was

"""CQ-DINO's two-stage pipeline submitted with the Ray Jobs API to a real `ray start` cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_engine import config, dataset, free_port  # noqa: F401 - the shared synthetic dataset

from cluster.jobs import wait_for
from cluster.local import local_environment


@pytest.fixture
def ray_cluster(tmp_path):
    """A head node on loopback with workers not niced, token auth off, the venv's python first on
    PATH (jobs run it)."""
    env = {
        **os.environ,
        **local_environment(),
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


def vastdet(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vastdet.cli", *args], env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


def submitted(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    return re.search(r"submitted (\S+)", done.stdout).group(1)


def test_pipeline_runs_as_a_submitted_ray_job(ray_cluster, dataset, tmp_path):  # noqa: F811
    """`vastdet submit` to a `ray start` head: stage 1 -> stage 2 -> evaluation, each a Ray
    Train job, recorded in the run folder; `vastdet jobs logs` shows the driver's progress; a
    re-submission skips every finished step; a failing step names itself and its cause;
    `vastdet jobs stop` stops a job."""
    address, env = ray_cluster
    env = {**env, "RAY_AUTH_MODE": "disabled"}  # the client side of a cluster without tokens
    stage1 = yaml.safe_load(
        config(dataset, tmp_path / "s1", model="cq_dino_tiny_stage1", steps=2).read_text()
    )
    stage2 = yaml.safe_load(
        config(dataset, tmp_path / "s2", evaluate=True, model="cq_dino_tiny", steps=3).read_text()
    )
    settings = {"stage1": stage1, "stage2": stage2, "num_workers": 1, "max_failures": 0}
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(settings))
    secret = "s3cr3t-value"
    job = submitted(
        vastdet("submit", str(pipeline), "--address", address, "--env", f"TOKEN={secret}", env=env)
    )
    assert wait_for(address, job, timeout_s=900) == "SUCCEEDED"
    logs = vastdet("jobs", "--address", address, "logs", job, env=env).stdout
    assert re.search(r"stage2 +step +3/3 +loss", logs), logs[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 5 and "AR_C" in metrics
    from vastdet.runtime.metrics import evaluation_rows

    assert evaluation_rows(tmp_path / "s2")[-1] == {  # the end of stage 2's learning curve
        "step": 3,
        **{f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    state = json.loads((tmp_path / "pipeline.json").read_text())["steps"]
    assert [state[s]["status"] for s in ("stage1", "stage2", "eval")] == ["finished"] * 3
    # stage 2 started from stage 1's checkpoint in Ray's storage, and trained without its own
    # end-of-run evaluation (the pipeline's step does it)
    saved = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert saved["model"]["init_from"].startswith(str(tmp_path / "s2" / ".init-"))
    assert saved["eval_at_end"] is False and not (tmp_path / "s2" / "eval").exists()
    # listings never print the job's environment values
    listing = vastdet("jobs", "--address", address, "status", job, env=env).stdout
    assert "TOKEN" in listing and secret not in listing

    again = submitted(vastdet("submit", str(pipeline), "--address", address, env=env))
    assert wait_for(address, again, timeout_s=600) == "SUCCEEDED"
    logs = vastdet("jobs", "--address", address, "logs", again, env=env).stdout
    for step in ("stage1", "stage2", "eval"):
        assert f"{step} finished earlier" in logs, logs[-3000:]
    assert json.loads((tmp_path / "pipeline.json").read_text())["steps"] == state

    broken = {**settings, "evaluation": {"val_shards": str(tmp_path / "missing")}}
    pipeline.write_text(yaml.safe_dump(broken))
    failing = submitted(vastdet("submit", str(pipeline), "--address", address, env=env))
    assert wait_for(address, failing, timeout_s=600) == "FAILED"
    logs = vastdet("jobs", "--address", address, "logs", failing, env=env).stdout
    assert re.search(r"pipeline step eval failed .*no shard manifest", logs, re.S), logs[-3000:]
    record = json.loads((tmp_path / "pipeline.json").read_text())["steps"]
    assert record["eval"]["status"] == "failed" and "no shard manifest" in record["eval"]["error"]
    assert record["stage2"] == state["stage2"]  # the stages were not run again

    pipeline.write_text(yaml.safe_dump({**settings, "run_dir": str(tmp_path / "other")}))
    stopping = submitted(vastdet("submit", str(pipeline), "--address", address, env=env))
    stop = vastdet("jobs", "--address", address, "stop", stopping, env=env)
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert wait_for(address, stopping, timeout_s=300) == "STOPPED"
    listed = vastdet("jobs", "--address", address, "list", env=env).stdout
    assert re.search(rf"{stopping} +STOPPED", listed) and re.search(rf"{job} +SUCCEEDED", listed)


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
    shipped = {**stage, "model": {**stage["model"], "backbone_weights": "vastdet:resnet18_synth"}}
    assert absolute_paths(shipped)["model"]["backbone_weights"] == "vastdet:resnet18_synth"

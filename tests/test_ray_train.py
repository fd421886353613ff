"""The training function under a real 2-worker Ray Train TorchTrainer on a local Ray instance."""

from __future__ import annotations

import json

import pytest
import ray
import yaml
from test_engine import config, dataset  # noqa: F401 - the shared synthetic dataset fixture

from cluster.workers import run_training_stage


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_engine_runs_as_two_ray_train_workers(local_ray, dataset, tmp_path):  # noqa: F811
    cfg = yaml.safe_load(
        config(dataset, tmp_path / "ray", zero_stage=2, steps=4, checkpoint_every=4).read_text()
    )
    result = run_training_stage(cfg, num_workers=2, storage_path=str(tmp_path / "ray_results"))
    assert result.error is None
    lines = [json.loads(x) for x in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all(m["world_size"] == 2 for m in lines)  # the workers formed one process group
    assert (tmp_path / "ray" / "checkpoints" / "step_00000004").is_dir()

"""The training function under a real 2-worker Ray Train TorchTrainer on a local Ray instance,
and its recovery when a worker is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
import yaml
from test_engine import config, dataset  # noqa: F401 - the shared synthetic dataset fixture
from two_nodes import train_worker_pids

from cluster.local import start_local_ray
from cluster.workers import run_training_stage


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(num_cpus=2, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


LISTENING = """
import json, os, psutil, ray
from cluster.local import start_local_ray
start_local_ray(num_cpus=2, log_to_driver=False)
niceness = ray.get([ray.remote(lambda: os.nice(0)).remote() for _ in range(2)])  # workers listen too
processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
print(json.dumps({"niceness": [os.nice(0), *niceness], "listening": sorted({
    (p.name(), c.laddr.ip) for p in processes for c in p.net_connections(kind="inet")
    if c.status == psutil.CONN_LISTEN
})}))
ray.shutdown()
"""


def test_local_ray_listens_on_loopback_only_and_its_workers_are_as_nice_as_the_driver():
    """Every socket the embedded instance listens on (GCS, raylet, agents, workers, the
    driver's own server) is bound to loopback; its workers run at the niceness of the command
    that started it (Ray's default would add 15: on a shared machine training then gets what
    the other processes leave). Checked from a fresh driver process, started at niceness 3."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    done = subprocess.run(
        ["nice", "-n", "3", sys.executable, "-c", LISTENING],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    driver, *workers = seen["niceness"]
    assert workers == [driver, driver], seen["niceness"]
    listening = seen["listening"]
    assert {"gcs_server", "raylet"} <= {name for name, _ in listening}, listening
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip in listening), listening


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.timeout(1800)  # Ray on a busy 2-core machine starts slowly
def test_a_killed_worker_is_restarted_and_the_run_resumes(local_ray, dataset, tmp_path):  # noqa: F811
    out = tmp_path / "killed"
    cfg = yaml.safe_load(
        config(dataset, out, zero_stage=2, steps=8, checkpoint_every=2).read_text()
    )
    killed: list[int] = []
    finished = threading.Event()

    def kill_at_step_three():  # however long Ray Train takes to start on a busy machine
        while not finished.is_set() and not killed:
            metrics = out / "metrics.jsonl"
            steps = (
                [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
                if metrics.is_file()
                else []
            )
            pids = train_worker_pids()
            if steps and max(steps) >= 3 and pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_at_step_three, daemon=True)
    watcher.start()
    try:
        result = run_training_stage(
            cfg, num_workers=2, storage_path=str(tmp_path / "ray_results"), max_failures=1
        )
    finally:
        finished.set()
    watcher.join(timeout=5)
    assert killed, "no worker was killed: the test did not exercise recovery"
    assert result.error is None
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(steps) == set(range(1, 9)) and steps[-1] == 8
    assert (out / "checkpoints" / "step_00000008").is_dir()

"""A training stage on a simulated two-node Ray cluster (`ray.cluster_utils.Cluster`: two
raylets on this machine, one CPU and so one Ray Train worker each), each worker in a scratch
folder of its own node, checkpoints in the S3 storage named by the environment
(AWS_ENDPOINT_URL). Run by tests/test_ray_cluster.py in a process of its own:

    python tests/two_nodes.py SETTINGS.json RESULT.json

SETTINGS: {"config": a TrainConfig dict, "storage": "s3://...", "runs": [{"name", "kill"}]}.
A run with "kill" loses one worker (SIGKILL) once rank 0 has logged step 3 and Ray has
registered a checkpoint in storage, and every node's scratch folder of the run is deleted at
once, so the restarted group has only Ray's storage to resume from. RESULT: for each run its error, the metrics.jsonl travelling with its final
checkpoint, the progress lines the driver printed, the nodes that worked and whether a
worker was killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path


def train_worker_pids(root: int | None = None) -> list[int]:
    """Processes of live Ray Train workers below `root` (default: this process, which started
    the Ray cluster or its driver), so that another Ray job on the machine is never touched.
    Ray titles them `ray::RayTrainWorker...`; their loader workers inherit the title and are
    left out."""
    root = os.getpid() if root is None else root
    parents, titled = {}, set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents[int(entry.name)] = parent
            if title.startswith("ray::RayTrainWorker"):
                titled.add(int(entry.name))

    def below_root(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False

    return sorted(p for p in titled if parents[p] not in titled and below_root(p))


def logged_steps(scratch: Path) -> list[int]:
    steps = []
    for metrics in scratch.glob("*/metrics.jsonl"):
        for line in metrics.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                pass
    return steps


def registered_checkpoints(storage: str, run: str) -> int:
    """Checkpoints Ray Train has registered for `run` (its snapshot in storage)."""
    from pipelines.sources import read_bytes

    try:
        snapshot = json.loads(read_bytes(f"{storage}/{run}/checkpoint_manager_snapshot.json"))
    except (OSError, ValueError):
        return 0
    return len(snapshot.get("checkpoint_results", []))


def kill_one_worker_at_step_three(
    scratch: Path, storage: str, killed: list[int], finished: threading.Event
) -> None:
    """Once rank 0 has logged step 3 and Ray holds a checkpoint in storage: SIGKILL one worker
    and delete every node's scratch folder of the run (watching until the run ends, however
    slowly a busy machine starts it)."""
    while not finished.is_set() and not killed:
        pids = train_worker_pids()
        if (
            scratch.is_dir()
            and max(logged_steps(scratch), default=0) >= 3
            and len(pids) == 2
            and registered_checkpoints(storage, scratch.name)
        ):
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])
            shutil.rmtree(scratch)  # every node's copy: only Ray's storage is left
            return
        time.sleep(0.1)


def main() -> int:
    settings = json.loads(Path(sys.argv[1]).read_text())
    from cluster.local import local_environment

    # both raylets on 127.0.0.1 (without single-machine mode Ray maps that to the outward
    # address), and their workers not niced below the busy processes a loaded test meets
    os.environ.update(local_environment())
    import ray
    from ray.cluster_utils import Cluster

    from cluster.progress import ProgressPrinter
    from cluster.workers import fetch_checkpoint, run_training_stage

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    out = {}
    try:
        for run in settings["runs"]:
            output_dir = Path(settings["config"]["output_dir"])
            scratch = output_dir / run["name"]
            killed: list[int] = []
            finished = threading.Event()
            watcher = threading.Thread(
                target=kill_one_worker_at_step_three,
                args=(scratch, settings["storage"], killed, finished),
                daemon=True,
            )
            if run["kill"]:
                watcher.start()
            lines: list[str] = []
            with ProgressPrinter(lines.append, every_s=0.5) as progress:
                try:
                    result = run_training_stage(
                        settings["config"], num_workers=2, storage_path=settings["storage"],
                        max_failures=1, name=run["name"], per_node_output=run["name"],
                        progress=progress.name, stage=run["name"],
                    )  # fmt: skip
                finally:
                    finished.set()
            final = output_dir / f"{run['name']}-final"
            if result.checkpoint is not None:
                fetch_checkpoint(result.checkpoint, final, fresh=True)
            metrics = final / "metrics.jsonl"
            out[run["name"]] = {
                "error": None if result.error is None else repr(result.error),
                "checkpoint": result.checkpoint.path if result.checkpoint else None,
                "rows": [json.loads(x) for x in metrics.read_text().splitlines()]
                if metrics.is_file()
                else [],
                "lines": lines,
                "nodes": sorted(p.name for p in scratch.iterdir()) if scratch.is_dir() else [],
                "killed": bool(killed),
            }
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(sys.argv[2]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training stages and evaluations as Ray Train jobs: `vastdet.engine.train` and
`vastdet.evaluation.runner.run_eval` run unchanged inside the workers.

Ray Train starts the process group (gloo on CPU, NCCL on GPU) and sets the rank variables; the
engine finds them in the environment and DeepSpeed reuses the group. Checkpoints go through Ray
Train's storage: at every checkpoint each worker reports the files it wrote (its ZeRO shard;
rank 0 also the shared model states, the run's config.json and a note of the tag), Ray merges
them into one folder in storage, and a restarted worker group, on whatever nodes, fetches the
newest one into its (possibly node-local) output folder before the engine resumes from it as it
always does. A stage-2 run's `init_from` is stage 1's checkpoint in storage. The log rows are
reported too (Ray's dashboard, `Result.metrics_dataframe`) and rank 0 sends them to the driver's
progress board (`cluster.progress`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from vastdet.config import from_dict
from vastdet.engine.config import TrainConfig

NOTE = "vastdet_checkpoint.json"  # in a reported checkpoint: {"tag", "step"}
BESIDE = ("config.json", "metrics.jsonl")  # rank 0's run files travelling with a checkpoint
OWNER = re.compile(r"zero_pp_rank_(\d+)_")  # a ZeRO partition names its rank; the rest is rank 0's


def owned_files(folder: Path, rank: int) -> list[Path]:
    """The files of a complete checkpoint folder that `rank` wrote."""
    files = []
    for path in sorted(folder.iterdir()):
        found = OWNER.search(path.name)
        if (int(found.group(1)) if found else 0) == rank:
            files.append(path)
    return files


def fetch_checkpoint(
    checkpoint, run_dir: Path, fresh: bool = False, retry_s: float | None = None
) -> str | None:
    """Put a reported checkpoint's folder into `run_dir/checkpoints/<tag>`, and the run files
    that travel with it (config.json, metrics.jsonl up to that step) beside, where they are
    missing; with `fresh`, in place of what `run_dir` holds. Returns the tag (None for a
    checkpoint without one). Storage that does not answer is waited out for `retry_s` seconds
    (default `cluster.storage.RETRY_S`): a group restarted by a storage outage would otherwise
    fail again on the restore, using up its restarts while the outage lasts."""
    from cluster.storage import RETRY_S, checkpoint_folder
    from vastdet.runtime import checkpoints

    with checkpoint_folder(checkpoint, RETRY_S if retry_s is None else retry_s) as local:
        note = Path(local) / NOTE
        if not note.is_file():
            return None
        tag = json.loads(note.read_text())["tag"]
        target = run_dir / "checkpoints" / tag
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in BESIDE:
            if (Path(local) / name).is_file() and (fresh or not (run_dir / name).exists()):
                shutil.copy(Path(local) / name, run_dir / name)
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        source = Path(local) / "checkpoints" / tag
        staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".fetch-"))
        if tag in checkpoints.complete_tags(run_dir / "checkpoints"):
            # this node's copy holds only the files its ranks wrote: add the other ranks'
            for path in source.iterdir():
                if not (target / path.name).exists():
                    shutil.copy(path, staging / path.name)
                    os.replace(staging / path.name, target / path.name)
        else:
            shutil.copytree(source, staging / tag)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staging / tag, target)
            except OSError:  # another worker on this node put it there first
                pass
        shutil.rmtree(staging, ignore_errors=True)
    return tag


class RayReports:
    """The engine's hooks under Ray Train: every log row and every checkpoint reported (each
    worker calls `report` equally often: a log row at a checkpoint step travels with the
    checkpoint), rank 0's rows to the driver's progress board."""

    def __init__(self, cfg: TrainConfig, rank: int, progress=None, stage: str = ""):
        self.cfg, self.rank, self.progress, self.stage = cfg, rank, progress, stage

    def on_log(self, row: dict) -> None:
        import ray.train

        if self.progress is not None and self.rank == 0:
            self.progress.push.remote(self.stage, {**row, "steps": self.cfg.steps})
        if not self.cfg.checkpoint_step(row["step"]):
            ray.train.report(row)

    def on_checkpoint(self, folder: Path, step: int, row: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="report-") as staging:
            kit = Path(staging)
            (kit / "checkpoints" / folder.name).mkdir(parents=True)
            for path in owned_files(folder, self.rank):
                os.link(path, kit / "checkpoints" / folder.name / path.name)
            if self.rank == 0:
                for name in BESIDE:
                    if (folder.parent.parent / name).is_file():
                        shutil.copy(folder.parent.parent / name, kit / name)
                (kit / NOTE).write_text(json.dumps({"tag": folder.name, "step": step}))
            checkpoint = ray.train.Checkpoint.from_directory(str(kit))
            ray.train.report(row or {"step": step}, checkpoint=checkpoint)


def node_output(output_dir: str, run: str) -> str:
    """`output_dir/<run>/<node id>`: a scratch folder of this node's own for one Ray run, for
    nodes that share a disk but must not share one (and for showing on one machine that
    nothing depends on it)."""
    import ray

    return str(Path(output_dir) / run / ray.get_runtime_context().get_node_id()[:12])


def drop_newer_checkpoints(run_dir: Path, tag: str) -> None:
    """Remove this node's checkpoints newer than the one Ray restored: they were never
    reported, another node's rank may not have them, and every rank must resume from one step."""
    from vastdet.runtime import checkpoints

    for other in checkpoints.complete_tags(run_dir / "checkpoints"):
        if other > tag:
            shutil.rmtree(run_dir / "checkpoints" / other, ignore_errors=True)


def train_worker(loop: dict) -> None:
    """Ray Train's `train_loop_per_worker` for a training stage. `loop` holds the stage's
    `config` (a TrainConfig as a dict), and optionally `init_checkpoint` (stage 1's Ray
    checkpoint, for stage 2), `per_node_output` (the run's name: each node then works in a
    scratch folder of its own under `output_dir`), `progress` (the board's actor name),
    `stage` (its label) and `storage_retry_s` (how long a restore waits out storage that does
    not answer)."""
    import ray
    import ray.train

    from cluster.progress import board_handle
    from vastdet.engine.train import TrainHooks, train

    config = dict(loop["config"])
    if loop.get("per_node_output"):
        config["output_dir"] = node_output(config["output_dir"], loop["per_node_output"])
    cfg = from_dict(TrainConfig, config, "<ray train config>")
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed = ray.train.get_checkpoint()
    if resumed is not None:  # a restarted group: the newest checkpoint, from storage
        tag = fetch_checkpoint(resumed, run_dir, retry_s=loop.get("storage_retry_s"))
        if tag is not None:
            drop_newer_checkpoints(run_dir, tag)
    if loop.get("init_checkpoint") is not None and resumed is None:
        init_dir = Path(tempfile.mkdtemp(dir=run_dir, prefix=".init-"))
        fetch_checkpoint(loop["init_checkpoint"], init_dir, retry_s=loop.get("storage_retry_s"))
        cfg.model.init_from = str(init_dir)
    context = ray.train.get_context()
    reports = RayReports(
        cfg, context.get_world_rank(), board_handle(loop.get("progress")), loop.get("stage", "")
    )
    train(cfg, TrainHooks(on_log=reports.on_log, on_checkpoint=reports.on_checkpoint))


def eval_worker(loop: dict) -> None:
    """Ray Train's `train_loop_per_worker` for an evaluation: the model of `checkpoint` (a
    stage's Ray checkpoint) over `val_shards`, as `vastdet eval` runs it (`eval`: the
    EvalConfig's settings, `categories`, `train_shards`, `storage_retry_s`). Rank 0 reports the
    metrics with its output folder (metrics.json, results.json, charts) as a checkpoint."""
    import ray.train

    from vastdet.evaluation.runner import EvalConfig, run_eval

    work = Path(tempfile.mkdtemp(prefix="vastdet-eval-"))
    fetch_checkpoint(loop["checkpoint"], work / "model", retry_s=loop.get("storage_retry_s"))
    out = work / "out"
    cfg = from_dict(EvalConfig, loop.get("eval") or {}, "<ray eval config>")
    metrics = run_eval(
        work / "model", loop["val_shards"], out, cfg, loop.get("categories"),
        loop.get("train_shards"),
    )  # fmt: skip
    rank = ray.train.get_context().get_world_rank()
    if rank == 0 and metrics is not None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(out)))
    else:
        ray.train.report({})
    shutil.rmtree(work, ignore_errors=True)


def run_job(
    loop_fn,
    loop: dict,
    num_workers: int,
    use_gpu: bool = False,
    storage_path: str | None = None,
    storage_filesystem=None,
    max_failures: int = 0,
    name: str | None = None,
):
    """Run `loop_fn(loop)` as a Ray Train job of `num_workers` workers; returns Ray's `Result`
    (its `checkpoint` is the newest reported one, in storage)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop_fn,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def run_training_stage(
    config: dict,
    num_workers: int,
    use_gpu: bool = False,
    storage_path: str | None = None,
    max_failures: int = 0,
    storage_endpoint: str | None = None,
    name: str | None = None,
    **loop,
):
    """One training stage as a Ray Train job (see `train_worker` for `loop`'s keys); storage
    as `cluster.storage` reads it."""
    from cluster.storage import storage_filesystem

    filesystem, storage = storage_filesystem(storage_path, storage_endpoint)
    return run_job(
        train_worker, {"config": config, **loop}, num_workers, use_gpu, storage, filesystem,
        max_failures, name,
    )  # fmt: skip

"""CQ-DINO's pipeline on Ray: stage 1 (selector) -> stage 2 (detector, initialised from stage
1) -> evaluation of stage 2 over the val shards -> charts.

Each step is a Ray Train job (`cluster.workers`): training stages report their DeepSpeed
checkpoints to Ray Train's storage (`storage_path`: a folder, NFS, `s3://`, `gs://`, or an S3
endpoint of your choice) and a restarted worker group, on whatever nodes, resumes from the
newest one; the evaluation job loads stage 2's checkpoint from storage. The driver prints each
stage's progress while its workers run.

The pipeline's run folder (`run_dir`) records each step in `pipeline.json`: its status, the
fingerprint of its settings, its checkpoint in storage, how long it took and, for a failed
step, the error. A re-run skips every step that finished with the same settings (a stage whose
settings changed runs again, and so does everything after it); a step that failed half-way is
resumed from its newest checkpoint, since Ray Train restores a run of the same name. Each
stage's `output_dir` ends up a normal run folder (final checkpoint, config.json,
metrics.jsonl, charts) that `vastdet eval`, `export` and `plot` read; the evaluation's
metrics, detections and charts go to `run_dir/eval`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vastdet.config import at_least, load_config
from vastdet.engine.config import TrainConfig
from vastdet.evaluation.runner import EvalConfig

log = logging.getLogger(__name__)
STATE = "pipeline.json"
STEPS = ("stage1", "stage2", "eval")


@dataclass
class EvaluationStep:
    """The pipeline's last step: stage 2's final model over the val shards, as a Ray Train job
    (the distributed `vastdet eval`)."""

    enabled: bool = True
    val_shards: str | None = None  # default: stage 2's data.val_shards
    num_workers: int | None = at_least(1, None)  # default: the pipeline's num_workers
    settings: EvalConfig | None = None  # default: stage 2's `eval` settings


@dataclass
class PipelineConfig:
    """Two training configurations and how to run them. `stage2.model.init_from` is stage 1's
    final checkpoint (from storage) unless set."""

    stage1: TrainConfig
    stage2: TrainConfig
    evaluation: EvaluationStep = field(default_factory=EvaluationStep)
    num_workers: int = at_least(1, 2)
    use_gpu: bool = False
    max_failures: int = at_least(-1, 1)  # -1: restart without limit (Ray's convention)
    storage_retry_s: float = at_least(0, 300.0)  # a restore waits out unanswering storage this long
    storage_path: str | None = None  # Ray Train's storage (default: run_dir/ray)
    storage_endpoint: str | None = None  # an S3-compatible server for s3:// storage (MinIO...)
    per_node_output: bool = False  # each node trains in a scratch folder of its own
    run_dir: str | None = None  # the pipeline's record (default: stage 2's output_dir's parent)
    name: str | None = None  # Ray run names' prefix (default: run_dir's name)

    def __post_init__(self) -> None:
        if self.stage1.model.architecture != "cq_selector":
            raise ValueError("stage1 must train a cq_selector model (CQ-DINO's stage 1)")
        if self.stage2.model.architecture != "cq_dino":
            raise ValueError("stage2 must train a cq_dino model")
        if self.run_dir is None:
            self.run_dir = str(Path(self.stage2.output_dir).parent)
        if self.name is None:
            self.name = Path(os.path.abspath(self.run_dir)).name or "vastdet"
        if self.evaluation.enabled:
            if not (self.evaluation.val_shards or self.stage2.data.val_shards):
                raise ValueError(
                    "evaluation needs val shards: set evaluation.val_shards or "
                    "stage2.data.val_shards (or evaluation.enabled: false)"
                )
            self.stage2.eval_at_end = False  # the pipeline's own step evaluates the final model


def load_pipeline(path: str | os.PathLike) -> PipelineConfig:
    return load_config(path, PipelineConfig)


class PipelineStepError(RuntimeError):
    """A step of the pipeline failed; the message names the step and the cause."""


PATH_KEYS = {
    "data": ("train_shards", "val_shards", "categories"),
    "model": ("backbone_weights", "category_embeddings", "init_from"),
}


def absolute(location: str | None) -> str | None:
    """A path made absolute from this process's folder (Ray workers run in folders of their
    own, where a relative path names nothing); URLs and shipped weights as they are."""
    from pipelines.sources import is_url
    from vastdet.runtime.weights import SHIPPED_SCHEME

    if not location or is_url(location) or location.startswith(SHIPPED_SCHEME):
        return location  # a URL, or weights that ship with vastdet (`vastdet:<name>`)
    return os.path.abspath(location)


def absolute_paths(stage: dict) -> dict:
    """A stage's settings with every path in them made absolute."""
    out = {**stage, "output_dir": os.path.abspath(stage["output_dir"])}
    for section, keys in PATH_KEYS.items():
        part = dict(out[section])
        for key in keys:
            part[key] = absolute(part.get(key))
        out[section] = part
    return out


def fingerprint(settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class PipelineState:
    """`run_dir/pipeline.json`: what each step did, written after every change."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATE
        self.steps: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.steps = json.loads(self.path.read_text()).get("steps", {})
            except ValueError:
                log.warning("%s is not readable JSON: every step runs again", self.path)

    def finished(self, step: str, key: str) -> dict | None:
        entry = self.steps.get(step)
        if entry and entry.get("status") == "finished" and entry.get("fingerprint") == key:
            return entry
        return None

    def record(self, step: str, **entry) -> None:
        from taxonomy.files import atomic_output

        self.steps[step] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps({"steps": self.steps}, indent=1, default=str))


class Pipeline:
    """One run of the pipeline on the Ray cluster this process is connected to."""

    def __init__(self, cfg: PipelineConfig, emit=None):
        from cluster.storage import storage_filesystem

        self.cfg = cfg
        self.run_dir = Path(os.path.abspath(cfg.run_dir))
        self.state = PipelineState(self.run_dir)
        storage = cfg.storage_path or str(self.run_dir / "ray")
        self.filesystem, self.storage = storage_filesystem(absolute(storage), cfg.storage_endpoint)
        self.emit = emit or (lambda line: print(line, flush=True))

    def checkpoint(self, path: str):
        """A Ray checkpoint in this pipeline's storage, from its recorded path."""
        from ray.train import Checkpoint

        if self.filesystem is None:
            return Checkpoint(path)
        return Checkpoint(path, filesystem=self.filesystem)

    def _job(self, step: str, key: str, loop_fn, loop: dict, num_workers: int):
        from cluster.workers import run_job

        name = f"{self.cfg.name}-{step}-{key[:10]}"  # a changed step is a new Ray run
        start = time.perf_counter()
        self.emit(f"{step}: Ray Train run {name}, {num_workers} workers, storage {self.storage}")
        self.state.record(step, status="running", fingerprint=key, ray_run=name)
        loop = {**loop, "storage_retry_s": self.cfg.storage_retry_s}  # not in the fingerprint
        try:
            result = run_job(
                loop_fn, loop, num_workers, self.cfg.use_gpu, self.storage, self.filesystem,
                self.cfg.max_failures, name,
            )  # fmt: skip
            error = result.error
        except Exception as err:  # noqa: BLE001 - Ray raises some failures, returns others
            result, error = None, err
        seconds = time.perf_counter() - start
        self.emit(f"{step}: {'failed' if error is not None else 'done'} in {seconds:.0f} s")
        if error is not None:
            reason = f"{type(error).__name__}: {error}"
            self.state.record(
                step, status="failed", fingerprint=key, ray_run=name, seconds=seconds,
                error=reason,
            )  # fmt: skip
            raise PipelineStepError(
                f"pipeline step {step} failed after {seconds:.0f} s (Ray run {name} in "
                f"{self.storage}): {reason}"
            ) from error
        return result, name, seconds

    def train_stage(self, step: str, stage: TrainConfig, upstream: str | None) -> str:
        """Run (or skip) a training stage; returns its final checkpoint's path in storage."""
        from cluster.workers import fetch_checkpoint, train_worker
        from vastdet.runtime.plot import plot_run

        settings = absolute_paths(dataclasses.asdict(stage))
        key = fingerprint({"stage": settings, "init": upstream, "workers": self.cfg.num_workers})
        done = self.state.finished(step, key)
        if done is not None:
            self.emit(f"{step} finished earlier ({done['checkpoint']}): not run again")
            return done["checkpoint"]
        loop: dict = {"config": settings, "stage": step, "progress": self.progress_name}
        if upstream is not None and not stage.model.init_from:
            loop["init_checkpoint"] = self.checkpoint(upstream)
        if self.cfg.per_node_output:
            loop["per_node_output"] = f"{self.cfg.name}-{step}-{key[:10]}"
        result, name, seconds = self._job(step, key, train_worker, loop, self.cfg.num_workers)
        if result.checkpoint is None:
            raise PipelineStepError(f"pipeline step {step} reported no checkpoint")
        # the stage's output_dir as a normal run folder, whichever nodes trained it
        fetch_checkpoint(
            result.checkpoint, Path(settings["output_dir"]), fresh=self.cfg.per_node_output,
            retry_s=self.cfg.storage_retry_s,
        )  # fmt: skip
        plot_run(settings["output_dir"])
        self.state.record(
            step, status="finished", fingerprint=key, ray_run=name, seconds=seconds,
            checkpoint=result.checkpoint.path, final=result.metrics,
        )  # fmt: skip
        return result.checkpoint.path

    def evaluate(self, upstream: str) -> dict:
        from cluster.storage import checkpoint_folder
        from cluster.workers import eval_worker
        from vastdet.runtime.metrics import append_evaluation
        from vastdet.runtime.plot import plot_run

        cfg, stage2 = self.cfg.evaluation, self.cfg.stage2
        settings = dataclasses.asdict(cfg.settings or stage2.eval)
        loop = {
            "checkpoint": None,
            "val_shards": absolute(cfg.val_shards or stage2.data.val_shards),
            "train_shards": absolute(stage2.data.train_shards),
            "categories": absolute(stage2.data.categories),
            "eval": settings,
        }
        key = fingerprint({**loop, "model": upstream})
        out = self.run_dir / "eval"
        done = self.state.finished("eval", key)
        if done is not None and (out / "metrics.json").is_file():
            self.emit(f"eval finished earlier ({out}): not run again")
            return json.loads((out / "metrics.json").read_text())
        loop["checkpoint"] = self.checkpoint(upstream)
        workers = cfg.num_workers or self.cfg.num_workers
        result, name, seconds = self._job("eval", key, eval_worker, loop, workers)
        if result.checkpoint is None:
            raise PipelineStepError("pipeline step eval reported no results")
        with checkpoint_folder(result.checkpoint, self.cfg.storage_retry_s) as folder:
            staging = self.run_dir / ".eval-fetch"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(folder, staging)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
        metrics = json.loads((out / "metrics.json").read_text())
        # the final point of stage 2's learning curve
        append_evaluation(stage2.output_dir, stage2.steps, metrics)
        plot_run(stage2.output_dir)
        self.state.record(
            "eval", status="finished", fingerprint=key, ray_run=name, seconds=seconds,
            output=str(out), metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
        )  # fmt: skip
        return metrics

    def run(self) -> dict:
        """{stage1, stage2: each stage's last training row, eval: the evaluation's metrics or
        None, steps: the pipeline's record}."""
        from cluster.progress import ProgressPrinter
        from vastdet.runtime.metrics import training_rows

        self.run_dir.mkdir(parents=True, exist_ok=True)
        summary: dict = {}
        with ProgressPrinter(self.emit) as progress:
            self.progress_name = progress.name
            first = self.train_stage("stage1", self.cfg.stage1, None)
            final = self.train_stage("stage2", self.cfg.stage2, first)
        for step in ("stage1", "stage2"):
            rows = training_rows(getattr(self.cfg, step).output_dir)
            summary[step] = rows[-1] if rows else {}
        summary["eval"] = self.evaluate(final) if self.cfg.evaluation.enabled else None
        summary["steps"] = self.state.steps
        return summary


def run_pipeline(cfg: PipelineConfig, emit=None) -> dict:
    """Run the pipeline on the Ray cluster this process is connected to (`ray.init` first);
    `emit` receives the progress lines (default: print)."""
    return Pipeline(cfg, emit).run()


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.pipeline PIPELINE.yaml [--address ADDR]`: the entry point a Ray job
    runs (`vastdet submit`)."""
    import argparse

    import ray

    parser = argparse.ArgumentParser(description="run CQ-DINO's pipeline on Ray")
    parser.add_argument("config", help="a pipeline YAML file")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: the job's, or a new local one on 127.0.0.1)",
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance")
    args = parser.parse_args(argv)
    from vastdet.cli import configure_logging

    configure_logging()
    cfg = load_pipeline(args.config)
    if args.address is None and "RAY_ADDRESS" not in os.environ:  # a local instance of our own
        from cluster.local import start_local_ray

        start_local_ray(num_cpus=args.num_cpus)
    else:  # a cluster's (a job's own, or the one named)
        ray.init(address=args.address)
    try:
        summary = run_pipeline(cfg)
    except PipelineStepError as err:
        print(f"vastdet: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        ray.shutdown()
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

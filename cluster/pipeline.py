"""CQ-DINO's two-stage pipeline on Ray: stage 1 (selector) -> stage 2 (detector, initialised
from stage 1, evaluated at its end on the val shards) -> charts.

Each stage is a Ray Train job of DeepSpeed workers (`cluster.workers`). A worker that dies is
restarted up to `max_failures` times; the engine resumes from the newest complete checkpoint
in the stage's output folder, so the folders must sit on storage every node sees. A stage whose
run already finished (its last checkpoint is at its final step) is not run again, so a
pipeline restarted after a failure picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vastdet.config import at_least, load_config
from vastdet.engine import checkpoints
from vastdet.engine.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Two training configurations and how to run them. `stage2.model.init_from` defaults to
    stage 1's output folder."""

    stage1: TrainConfig
    stage2: TrainConfig
    num_workers: int = at_least(1, 2)
    use_gpu: bool = False
    max_failures: int = at_least(-1, 1)  # -1: restart without limit (Ray's convention)
    storage_path: str | None = None  # Ray Train's results folder (default: beside the runs)

    def __post_init__(self) -> None:
        if self.stage1.model.architecture != "cq_selector":
            raise ValueError("stage1 must train a cq_selector model (CQ-DINO's stage 1)")
        if self.stage2.model.architecture != "cq_dino":
            raise ValueError("stage2 must train a cq_dino model")
        if not self.stage2.model.init_from:
            self.stage2.model.init_from = self.stage1.output_dir


def load_pipeline(path: str | os.PathLike) -> PipelineConfig:
    return load_config(path, PipelineConfig)


PATH_KEYS = {
    "data": ("train_shards", "val_shards", "categories"),
    "model": ("backbone_weights", "category_embeddings", "init_from"),
}


def absolute_paths(stage: dict) -> dict:
    """Relative paths made absolute from this process's folder: Ray workers run in folders of
    their own, where a relative path names nothing."""
    out = {**stage, "output_dir": os.path.abspath(stage["output_dir"])}
    for section, keys in PATH_KEYS.items():
        part = dict(out[section])
        for key in keys:
            if part.get(key):
                part[key] = os.path.abspath(part[key])
        out[section] = part
    return out


def finished(cfg: TrainConfig) -> bool:
    """True when the run's newest complete checkpoint is at its final step."""
    tags = checkpoints.complete_tags(Path(cfg.output_dir) / "checkpoints")
    return bool(tags) and tags[-1] == checkpoints.tag_for(cfg.steps)


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run both stages on the Ray cluster this process is connected to (`ray.init` first);
    returns {stage1, stage2: final metrics lines, eval: stage 2's evaluation or None}."""
    from cluster.workers import run_training_stage
    from vastdet.engine.plot import plot_run

    summary: dict = {}
    for name in ("stage1", "stage2"):
        stage: TrainConfig = getattr(cfg, name)
        if finished(stage):
            log.info("%s already finished in %s: not run again", name, stage.output_dir)
        else:
            storage = cfg.storage_path or str(Path(stage.output_dir).resolve().parent / "ray")
            result = run_training_stage(
                absolute_paths(dataclasses.asdict(stage)),
                cfg.num_workers,
                cfg.use_gpu,
                storage,
                cfg.max_failures,
            )
            if result.error is not None:
                raise RuntimeError(f"{name} failed: {result.error}") from result.error
        lines = (Path(stage.output_dir) / "metrics.jsonl").read_text().splitlines()
        summary[name] = json.loads(lines[-1]) if lines else {}
        plot_run(stage.output_dir)
    evaluation = Path(cfg.stage2.output_dir) / "eval" / "metrics.json"
    summary["eval"] = json.loads(evaluation.read_text()) if evaluation.is_file() else None
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.pipeline PIPELINE.yaml [--address ADDR]`: the entry point a Ray job
    runs (see `cluster.submit`)."""
    import argparse

    import ray

    parser = argparse.ArgumentParser(description="run CQ-DINO's two-stage pipeline on Ray")
    parser.add_argument("config", help="a pipeline YAML file")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: the job's, or a new local one on 127.0.0.1)",
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_pipeline(args.config)
    if args.address is None and "RAY_ADDRESS" not in os.environ:  # a local instance of our own
        from cluster.local import start_local_ray

        start_local_ray(num_cpus=args.num_cpus)
    else:  # a cluster's (a job's own, or the one named)
        ray.init(address=args.address)
    try:
        summary = run_pipeline(cfg)
    finally:
        ray.shutdown()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

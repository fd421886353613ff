"""Training stages as Ray Train workers: `vastdet.engine.train` runs unchanged inside them.

Ray Train starts the process group (gloo on CPU, NCCL on GPU) and sets the rank variables;
the engine finds them in the environment and DeepSpeed reuses the group.
"""

from __future__ import annotations

from vastdet.config import from_dict
from vastdet.engine.config import TrainConfig


def train_worker(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: train, then report the final metrics once per worker."""
    import ray.train

    from vastdet.engine.train import train

    summary = train(from_dict(TrainConfig, config, "<ray train config>"))
    ray.train.report(
        {"step": summary["step"], "world_size": summary["world_size"], **summary["last"]}
    )


def run_training_stage(
    config: dict,
    num_workers: int,
    use_gpu: bool = False,
    storage_path: str | None = None,
    max_failures: int = 0,
):
    """Run one training stage as a Ray Train job of `num_workers` DeepSpeed workers; returns
    Ray's `Result` (its `metrics` are rank 0's final report). A failed worker group is
    restarted up to `max_failures` times and resumes from the run's newest checkpoint."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            storage_path=storage_path, failure_config=FailureConfig(max_failures=max_failures)
        ),
    )
    return trainer.fit()

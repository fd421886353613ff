"""The training configuration (YAML -> dataclasses, see `vastdet.config`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipelines.transforms import TransformConfig
from vastdet.config import at_least, load_config
from vastdet.evaluation.runner import EvalConfig
from vastdet.models.build import ModelConfig


@dataclass
class ParamGroup:
    """Parameters whose name matches `pattern` (a regular expression) train at `lr_mult` times
    the base learning rate (and `weight_decay_mult` times its weight decay). First match wins."""

    pattern: str
    lr_mult: float = 1.0
    weight_decay_mult: float = 1.0


@dataclass
class OptimConfig:
    """AdamW with DINO's defaults: lr 1e-4, backbone at 0.1x, weight decay 1e-4 on every
    parameter, clip 0.1."""

    lr: float = at_least(0.0, 1e-4)
    weight_decay: float = at_least(0.0, 1e-4)
    betas: tuple[float, float] = (0.9, 0.999)
    param_groups: list[ParamGroup] = field(
        default_factory=lambda: [ParamGroup(r"^backbone\.", 0.1)]
    )
    warmup_steps: int = at_least(0, 0)
    warmup_start: float = at_least(0.0, 0.0)  # warm-up's first factor (mmengine start_factor)
    decay_steps: list[int] = at_least(0, default_factory=list)  # lr x decay_gamma at each
    decay_gamma: float = at_least(0.0, 0.1)
    clip_grad: float = at_least(0.0, 0.1)
    decay_1d: bool = True  # weight decay on norms and biases too (DINO); False exempts them
    # the category table's Adam moments: fp32 (exact), or bf16 with stochastic rounding (half
    # their memory, 3 GB less at 10^6 x 768; `vastdet.engine.optim`)
    table_moments: str = "fp32"

    def __post_init__(self) -> None:
        if self.table_moments not in ("fp32", "bf16"):
            raise ValueError(f"table_moments must be fp32 or bf16, not {self.table_moments!r}")


@dataclass
class DataConfig:
    train_shards: str = ""
    val_shards: str | None = None
    categories: str | None = None  # a taxonomy/category file; default: the manifest's
    batch_size: int = at_least(1, 2)  # per rank and micro-step
    num_workers: int = at_least(0, 2)
    shuffle_buffer: int = at_least(1, 1000)
    repeat_threshold: float | None = at_least(0.0, 1e-3)
    group_by_aspect: bool = True  # landscape and portrait images in separate batches
    worker_nice: int = at_least(0, 10)  # loader workers' added niceness (0: the trainer's)
    transforms: TransformConfig = field(default_factory=TransformConfig)


@dataclass
class TrainConfig:
    model: ModelConfig | str = "dino_r50_4scale"  # a preset name, a file, or the settings inline
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = at_least(1, 1000)  # optimizer steps in all
    steps_per_epoch: int = at_least(1, 500)  # batches per rank per epoch (resampled streams)
    grad_accum: int = at_least(1, 1)
    zero_stage: int = 2
    precision: str = "fp32"  # fp32 or bf16
    seed: int = 42
    output_dir: str = "runs/default"
    checkpoint_every: int = at_least(1, 500)
    keep_checkpoints: int = at_least(0, 2)  # 0 keeps every checkpoint
    log_every: int = at_least(1, 10)
    max_nonfinite: int = at_least(0, 5)  # consecutive non-finite losses before the run stops
    threads: int | None = at_least(1, None)  # intra-op threads; None: this process's share
    eval: EvalConfig = field(default_factory=EvalConfig)  # run at the end when data.val_shards
    eval_every: int = at_least(0, 0)  # also evaluate every this many steps (0: at the end only)
    eval_at_end: bool = True  # evaluate the final model (a pipeline's own eval step turns it off)

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = load_config(self.model, ModelConfig)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, not {self.zero_stage}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {self.precision!r}")
        if not self.data.train_shards:
            raise ValueError("data.train_shards is required (a shard folder or manifest)")

    def checkpoint_step(self, step: int) -> bool:
        """Whether the run saves a checkpoint after optimizer step `step` (every
        `checkpoint_every` steps and the last one)."""
        return step % self.checkpoint_every == 0 or step == self.steps

    def to_dict(self) -> dict:
        return asdict(self)


def load_train_config(path: str) -> TrainConfig:
    return load_config(path, TrainConfig)

"""A trained run's newest checkpoint as one plain PyTorch file, loadable without DeepSpeed."""

from __future__ import annotations

import os
from pathlib import Path

from vastdet.runtime.loading import consolidated_state, write_model_file


def export_checkpoint(
    run_dir: str | os.PathLike, output: str | os.PathLike, tag: str | None = None
) -> Path:
    """Consolidate a (ZeRO-partitioned) checkpoint into {format, model, category_ids, config}.

    The file holds tensors, numbers and strings only, so it loads with
    `torch.load(path, weights_only=True)`; an `output` ending in `.safetensors` is written in
    that format instead (the tensors, with the format, config and tag as its metadata).
    """
    state, config, tag = consolidated_state(run_dir, tag)
    return write_model_file(state, config, tag, output)

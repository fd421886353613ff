"""A trained run's newest checkpoint as one plain PyTorch file, loadable without DeepSpeed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from taxonomy.files import atomic_output
from vastdet.engine.loading import EXPORT_FORMAT, consolidated_state


def export_checkpoint(
    run_dir: str | os.PathLike, output: str | os.PathLike, tag: str | None = None
) -> Path:
    """Consolidate a (ZeRO-partitioned) checkpoint into {format, model, category_ids, config}.

    The file holds tensors, numbers and strings only, so it loads with
    `torch.load(path, weights_only=True)`.
    """
    state, config, tag = consolidated_state(run_dir, tag)
    payload = {
        "format": EXPORT_FORMAT,
        "model": state,
        "category_ids": state["category_ids"].clone(),
        "config": json.dumps(config),
        "tag": tag,
    }
    with atomic_output(output) as tmp:
        torch.save(payload, tmp)
    return Path(output)

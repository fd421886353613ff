"""A trained run's newest checkpoint as one plain PyTorch file, loadable without DeepSpeed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from taxonomy.files import atomic_output
from vastdet.runtime.loading import EXPORT_FORMAT, consolidated_state


def export_checkpoint(
    run_dir: str | os.PathLike, output: str | os.PathLike, tag: str | None = None
) -> Path:
    """Consolidate a (ZeRO-partitioned) checkpoint into {format, model, category_ids, config}.

    The file holds tensors, numbers and strings only, so it loads with
    `torch.load(path, weights_only=True)`; an `output` ending in `.safetensors` is written in
    that format instead (the tensors, with the format, config and tag as its metadata).
    """
    state, config, tag = consolidated_state(run_dir, tag)
    if Path(output).suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
        metadata = {"format": EXPORT_FORMAT, "config": json.dumps(config), "tag": tag}
        with atomic_output(output) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return Path(output)
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

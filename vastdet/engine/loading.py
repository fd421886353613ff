"""A trained model back from what training left: a run folder (its newest complete checkpoint,
ZeRO partitions put together as data) or an exported file; and stage 2's initial weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from taxonomy.files import load_data
from vastdet.engine import checkpoints
from vastdet.engine.partitions import consolidated_weights

EXPORT_FORMAT = "vastdet.model/1"


def consolidated_state(
    run_dir: str | os.PathLike, tag: str | None = None
) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(fp32 state dict, run config, tag) of a run's checkpoint (default: the newest complete
    one), gathered from ZeRO partitions when there are any. Every file is read as data only
    (`vastdet.engine.partitions`): a run folder may come from anyone."""
    run = Path(run_dir)
    ckpt_dir = run / "checkpoints"
    tags = checkpoints.complete_tags(ckpt_dir)
    if not tags:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}")
    tag = tag or tags[-1]
    state = consolidated_weights(ckpt_dir / tag)
    return state, json.loads((run / "config.json").read_text()), tag


def _model_from_state(state: dict, config: dict, source: str):
    from vastdet.config import from_dict
    from vastdet.models.backbone import SWINS
    from vastdet.models.build import ModelConfig, build_model

    settings = dict(config["model"])
    # runs written before `backbone_norm` existed kept a ResNet's frozen batch norm
    if settings.get("backbone", ModelConfig.backbone) not in SWINS:
        settings.setdefault("backbone_norm", "frozen_bn")
    model_cfg = from_dict(ModelConfig, settings, source, "model")
    # the trained weights replace any initial ones; the tree's edges are buffers in `state`
    model_cfg.backbone_weights = model_cfg.category_embeddings = model_cfg.init_from = None
    if "category_queries.embedding.weight" in state:
        model_cfg.text_dim = state["category_queries.embedding.weight"].shape[1]
    model, _, post = build_model(model_cfg, state["category_ids"].tolist(), restoring=True)
    model.load_state_dict(state, strict=True)
    if hasattr(model, "category_queries"):  # CQ-DINO: the encoded queries are all inference needs
        model.category_queries.freeze_for_inference()
    return model.eval(), post, config


def load_model(path: str | os.PathLike):
    """(model in eval mode, postprocessor, run config) from an exported file or a run folder
    (its newest complete checkpoint, consolidated in memory)."""
    if Path(path).is_dir():
        state, config, _ = consolidated_state(path)
        return _model_from_state(state, config, str(path))
    return load_exported(path)


def read_exported(path: str | os.PathLike) -> dict:
    """An exported file's payload; names a file that is not one."""
    payload = load_data(path)  # an exported model is data a user hands us, never code to run
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a vastdet exported model (make one with `vastdet export`)")
    return payload


def load_exported(path: str | os.PathLike):
    """(model in eval mode, postprocessor, config dict) from an exported file, no DeepSpeed."""
    payload = read_exported(path)
    return _model_from_state(payload["model"], json.loads(payload["config"]), str(path))


def load_weights_from(model: torch.nn.Module, source: str | os.PathLike) -> int:
    """Copy every tensor of another model's weights (an exported file or a run folder) into
    `model`: CQ-DINO's stage 2 starts from stage 1's backbone, category queries and selector.
    Every source tensor must exist in `model` with the same shape; returns how many were
    loaded."""
    if Path(source).is_dir():
        state, _, _ = consolidated_state(source)
    else:
        state = read_exported(source)["model"]
    own = model.state_dict()
    missing = [k for k in state if k not in own]
    if missing:
        raise ValueError(f"{source} has weights this model lacks: {missing[:10]}")
    shapes = [k for k in state if own[k].shape != state[k].shape]
    if shapes:
        raise ValueError(
            f"{source}: shapes differ for {shapes[:10]} (was it trained with the same categories?)"
        )
    model.load_state_dict(state, strict=False)
    return len(state)

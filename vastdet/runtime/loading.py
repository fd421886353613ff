"""A trained model back from what training left: a run folder (its newest complete checkpoint,
ZeRO partitions put together as data) or an exported file; and stage 2's initial weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from taxonomy.files import load_data
from vastdet.runtime import checkpoints
from vastdet.runtime.partitions import consolidated_weights

EXPORT_FORMAT = "vastdet.model/1"


class NotARunError(FileNotFoundError):
    """A path given as a run folder that is not one (missing, a shard or checkpoint folder, a
    run without a complete checkpoint); the message says what to give instead."""


RUN_HINT = "give a run folder (a training config's output_dir) or an exported model file"


def check_run_dir(path: str | os.PathLike, needs_checkpoint: bool = True) -> Path:
    """`path` as a run folder, or `NotARunError` saying what it is and what to give."""
    run = Path(path)
    if not run.exists():
        raise NotARunError(f"{run} does not exist: {RUN_HINT}")
    if not run.is_dir():
        return run
    if (run / "config.json").is_file() or (run / "metrics.jsonl").is_file():
        tags = checkpoints.complete_tags(run / "checkpoints")
        if needs_checkpoint and not tags:
            partial = sorted((run / "checkpoints").glob("*.partial"))
            detail = f" ({len(partial)} partial, cut short)" if partial else ""
            raise NotARunError(
                f"run {run} has no complete checkpoint yet{detail}: train it on "
                f"(`vastdet train --config ...` resumes) until it saves one"
            )
        return run
    if run.name == "checkpoints" and (run.parent / "config.json").is_file():
        raise NotARunError(
            f"{run} is the checkpoint folder of run {run.parent}: give the run folder, {run.parent}"
        )
    if checkpoints.TAG.match(run.name) and (run.parent.parent / "config.json").is_file():
        raise NotARunError(
            f"{run} is one checkpoint of run {run.parent.parent}: give the run folder "
            f"({run.parent.parent}; `vastdet export --tag {run.name}` picks this one)"
        )
    if (
        any(run.glob("manifest.json"))
        or any(run.glob("*/manifest.json"))
        or any(run.glob("*/*/manifest.json"))
    ):
        raise NotARunError(f"{run} holds shards, not a trained run: {RUN_HINT}")
    raise NotARunError(f"{run} is not a run folder (no config.json): {RUN_HINT}")


def consolidated_state(
    run_dir: str | os.PathLike, tag: str | None = None
) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(fp32 state dict, run config, tag) of a run's checkpoint (default: the newest complete
    one), gathered from ZeRO partitions when there are any. Every file is read as data only
    (`vastdet.runtime.partitions`): a run folder may come from anyone."""
    run = check_run_dir(run_dir)
    ckpt_dir = run / "checkpoints"
    tags = checkpoints.complete_tags(ckpt_dir)
    if tag is not None and tag not in tags:
        raise NotARunError(f"run {run} has no complete checkpoint {tag} (it has {', '.join(tags)})")
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
    if check_run_dir(path).is_dir():
        state, config, _ = consolidated_state(path)
        return _model_from_state(state, config, str(path))
    return load_exported(path)


def write_model_file(state: dict, config: dict, tag: str, output: str | os.PathLike) -> Path:
    """A model file {format, model, category_ids, config, tag} (what `vastdet export` and
    `vastdet convert` write): a PyTorch file of tensors, numbers and strings only (it loads with
    `torch.load(path, weights_only=True)`), or, for an `output` ending in `.safetensors`, the
    tensors in that format with the format, config and tag as its metadata."""
    from taxonomy.files import atomic_output

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


def read_exported(path: str | os.PathLike) -> dict:
    """An exported file's payload (a PyTorch file or safetensors); names a file that is not
    one."""
    if Path(path).suffix == ".safetensors":
        return read_exported_safetensors(path)
    payload = load_data(path)  # an exported model is data a user hands us, never code to run
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a vastdet exported model (make one with `vastdet export`)")
    return payload


def read_exported_safetensors(path: str | os.PathLike) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if metadata.get("format") != EXPORT_FORMAT or "category_ids" not in state:
        raise ValueError(f"{path} is not a vastdet exported model (make one with `vastdet export`)")
    return {
        "format": EXPORT_FORMAT,
        "model": state,
        "category_ids": state["category_ids"],
        "config": metadata["config"],
        "tag": metadata.get("tag"),
    }


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

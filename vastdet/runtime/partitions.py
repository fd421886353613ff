"""A DeepSpeed checkpoint read back as data: every file loaded with `weights_only=True`, ZeRO
partitions put back together here.

Run folders travel between people, so their checkpoint files are untrusted input. DeepSpeed's
own loaders unpickle them in full, code included (a crafted file runs code); here a file may
hold tensors, numbers, strings, containers and the three record types DeepSpeed writes into its
optimizer files (`DEEPSPEED_TYPES`), nothing else.

The layout read (DeepSpeed 0.16-0.19):

- every stage: `[zero_pp_rank_R_]mp_rank_00_model_states.pt` holds `module` (the state dict:
  whole at stages 0-2, buffers only meaningful at stage 3), `buffer_names`, `param_shapes` (per
  optimizer group, name -> shape, in flattening order), `frozen_param_shapes` /
  `frozen_param_fragments` (parameters without gradient; stage 1 leaves them out, so the
  module's copy serves) and `shared_params` (aliases);
- stages 1-2: `zero_pp_rank_R_mp_rank_00_optim_states.pt` holds rank R's slice of each group's
  flat fp32 vector (`single_partition_of_fp32_groups`); the slices concatenated in rank order are
  the group's parameters back to back (plus `param_alignment_paddings` after each), the whole
  padded to a multiple of 2 x world size;
- stage 3: every parameter is split on its own into `ceil(numel / world)` elements per rank;
  rank R's `fp32_flat_groups` hold its piece of each parameter back to back.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from taxonomy.files import load_data

MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_00_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class CheckpointFormatError(ValueError):
    """A checkpoint folder that is not the DeepSpeed layout this reader knows."""


def deepspeed_types() -> list[type]:
    """The record classes DeepSpeed pickles into its optimizer files: a loss-scaler state, the
    ZeRO stage enum and a fragment address (two ints). Building them runs no code of the file's
    choosing: their state is set as attributes."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """One file of a DeepSpeed checkpoint, as data only (`taxonomy.files.load_data`)."""
    state = load_data(path, deepspeed_types())
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: not a DeepSpeed checkpoint file (no mapping inside)")
    return state


def _files(folder: Path, pattern: re.Pattern) -> list[Path]:
    """Files matching `pattern`, ordered by their rank number."""
    found = [(m, p) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: int(mp[0].group(1) or 0))]


def _require(state: dict, key: str, path: Path):
    if key not in state:
        raise CheckpointFormatError(f"{path}: no {key!r}: not a DeepSpeed checkpoint file")
    return state[key]


def consolidated_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the model saved in one checkpoint folder (a tag), whatever
    the ZeRO stage and world size it was written with. Needs neither DeepSpeed's engine nor a
    process group."""
    folder = Path(folder)
    model_files = _files(folder, MODEL_STATES)
    if not model_files:
        raise CheckpointFormatError(f"{folder}: no *mp_rank_00_model_states.pt file")
    optim_files = _files(folder, OPTIM_STATES)
    first = load_checkpoint_file(model_files[0])
    module = _require(first, "module", model_files[0])
    if not optim_files:  # stage 0: the module's weights are stored whole
        return {k: v for k, v in module.items()}
    optim = [_require(load_checkpoint_file(p), "optimizer_state_dict", p) for p in optim_files]
    world = len(optim)
    buffers = set(_require(first, "buffer_names", model_files[0]))
    state = {
        k: (v.float() if v.is_floating_point() else v) for k, v in module.items() if k in buffers
    }
    shapes = _require(first, "param_shapes", model_files[0])
    if "fp32_flat_groups" in optim[0]:  # stage 3
        models = [first] + [load_checkpoint_file(p) for p in model_files[1:]]
        if len(models) != world:
            raise CheckpointFormatError(
                f"{folder}: {len(models)} model-state files for {world} optimizer partitions"
            )
        state.update(_frozen_stage3(models, world))
        state.update(_trainable_stage3(optim, shapes, folder))
    else:
        state.update(_trainable_stage12(optim, shapes, folder))
        # parameters without gradient: whole in `frozen_param_fragments` at stage 2; stage 1
        # leaves them out, and only the module holds them
        state.update(first.get("frozen_param_fragments") or {})
        for name, value in module.items():
            state.setdefault(name, value.float() if value.is_floating_point() else value)
    for alias, target in (first.get("shared_params") or {}).items():
        if target in state:
            state[alias] = state[target]
    return state


def _trainable_stage12(optim: list[dict], shapes: list[dict], folder: Path) -> dict:
    world = len(optim)
    groups = [o.get("single_partition_of_fp32_groups") for o in optim]
    if any(g is None or len(g) != len(shapes) for g in groups):
        raise CheckpointFormatError(
            f"{folder}: optimizer partitions do not hold {len(shapes)} fp32 groups each"
        )
    paddings = optim[0].get("param_alignment_paddings")
    align = 2 * world  # ZeRO 1/2 pad each group's flat vector to a multiple of 2 x world size
    state = {}
    for g, group_shapes in enumerate(shapes):
        flat = torch.cat([groups[r][g].reshape(-1) for r in range(world)])
        offset = 0
        for k, (name, shape) in enumerate(group_shapes.items()):
            numel = math.prod(shape)
            state[name] = flat[offset : offset + numel].view(shape).clone()
            offset += numel + (paddings[g][k] if paddings else 0)
        if align * math.ceil(offset / align) != align * math.ceil(flat.numel() / align):
            raise CheckpointFormatError(
                f"{folder}: group {g} holds {flat.numel()} values, its parameters {offset}"
            )
    return state


def _trainable_stage3(optim: list[dict], shapes: list[dict], folder: Path) -> dict:
    world = len(optim)
    flats = [torch.cat([t.reshape(-1) for t in o["fp32_flat_groups"]]) for o in optim]
    if len({f.numel() for f in flats}) != 1:
        raise CheckpointFormatError(f"{folder}: ZeRO-3 partitions differ in size")
    state, offset = {}, 0
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            numel = math.prod(shape)
            piece = math.ceil(numel / world)
            parts = [flat[offset : offset + piece] for flat in flats]
            state[name] = torch.cat(parts)[:numel].view(shape).clone()
            offset += piece
    if offset != flats[0].numel():
        raise CheckpointFormatError(
            f"{folder}: ZeRO-3 partitions hold {flats[0].numel()} values each, the parameters "
            f"{offset}"
        )
    return state


def _frozen_stage3(models: list[dict], world: int) -> dict:
    shapes = models[0].get("frozen_param_shapes") or {}
    state = {}
    for name, shape in shapes.items():
        parts = [m["frozen_param_fragments"][name].reshape(-1) for m in models]
        state[name] = torch.cat(parts)[: math.prod(shape)].view(shape).clone()
    return state

"""Weights users hand us, read as data: local files in the layouts users have (a state dict,
safetensors, a detector's checkpoint with its prefix) and the files that ship with vastdet,
named `vastdet:<name>` and checked against their recorded sha256. Model code and the runtime's
loaders both read through here; nothing is ever fetched from a hub."""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from pathlib import Path

from torch import nn

from taxonomy.files import load_data

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "weights"
SHIPPED_SCHEME = "vastdet:"
# weights that ship with vastdet: name -> file in SHIPPED_DIR, its record beside it (.json)
SHIPPED = {"resnet18_synth": "resnet18_synth.safetensors"}


def shipped_record(name: str) -> dict:
    """The record of shipped weights `name`: sha256, recipe command, vocabulary, time."""
    if name not in SHIPPED:
        raise ValueError(
            f"no shipped weights {SHIPPED_SCHEME}{name}; vastdet ships "
            f"{', '.join(SHIPPED_SCHEME + n for n in SHIPPED)}"
        )
    return json.loads((SHIPPED_DIR / SHIPPED[name]).with_suffix(".json").read_text())


@cache
def resolve_weights(spec: str | os.PathLike) -> Path:
    """The local file behind a config's weights entry: a path as given, or `vastdet:<name>`
    for weights that ship with vastdet, whose sha256 must match their record."""
    from taxonomy.files import file_sha256

    text = str(spec)
    if not text.startswith(SHIPPED_SCHEME):
        return Path(text)
    name = text[len(SHIPPED_SCHEME) :]
    record = shipped_record(name)
    path = SHIPPED_DIR / SHIPPED[name]
    if not path.is_file():
        raise FileNotFoundError(f"{text}: {path} is missing from this installation")
    digest = file_sha256(path)
    if digest != record["sha256"]:
        raise ValueError(
            f"{text}: {path} has sha256 {digest[:16]}..., its record says "
            f"{record['sha256'][:16]}...: the file was changed or cut short"
        )
    return path


def read_state(path: str | os.PathLike) -> dict:
    """A state dict from a file someone handed us, as data: safetensors, or a PyTorch file
    read with the weights-only loader (a `state_dict` or `model` entry is unwrapped)."""
    path = resolve_weights(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    state = load_data(path)  # a checkpoint a user names is data, never code to run
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def detect_prefix(keys, own_keys) -> str:
    """The prefix a detector's checkpoint puts before the backbone's own key names
    (`backbone.`, `backbone.0.body.`, `module.backbone.`, ...): the one most keys reduce to a
    key of the module by, or "" when the keys are the module's already."""
    own = set(own_keys)
    direct = sum(1 for key in keys if key in own)
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        for cut in range(1, len(parts)):
            if ".".join(parts[cut:]) in own:
                prefix = ".".join(parts[:cut]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
                break
    best = max(counts, key=lambda p: (counts[p], -len(p)), default="")
    return best if counts.get(best, 0) > direct else ""


def load_weights(
    module: nn.Module,
    path: str | os.PathLike,
    what: str,
    ignore_prefixes: tuple[str, ...] = (),
    prefix: str | None = None,
    convert=None,
) -> None:
    """Load a local state dict (`read_state`) strictly; the error names missing and unexpected
    keys. A detector's checkpoint keeps the backbone under a prefix: `prefix` names it, or
    (None) it is detected (`detect_prefix`), and keys outside it are dropped. `convert(state)`
    then maps a known layout onto the module's (Swin: timm's own filter for Microsoft's
    releases). Keys starting with `ignore_prefixes` (a classifier head the detector does not
    have) are dropped; tensors are cast to the module's dtypes."""
    state = read_state(path)
    own = module.state_dict()
    if prefix is None:
        prefix = detect_prefix(state, own)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        log.info("%s: the weights under %r", path, prefix)
    if convert is not None:
        state = convert(state)
    # batch-norm step counters mean nothing to frozen batch norm (which drops them on load)
    state = {
        k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in own)
    }
    state = {k: v for k, v in state.items() if k in own or not k.startswith(ignore_prefixes)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not fit the {what}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(mismatched)} with other "
            f"shapes {mismatched[:5]}"
        )
    module.load_state_dict(state, strict=True)
    log.info("%s weights loaded from %s", what, path)

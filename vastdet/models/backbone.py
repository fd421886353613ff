"""Backbones giving multi-scale features, and the neck that maps them to the model width.

ResNet (torchvision) over pretrained weights: frozen batch norm and a frozen stem + first stage,
as DETR/DINO train it; without weights every layer trains, normalised by GroupNorm. Weights
come only from a local file named in the config (a PyTorch state dict or safetensors), or from
a file that ships with vastdet, named `vastdet:<name>` (`SHIPPED`); keys are checked strictly
and a mismatch names the missing and unexpected keys. Without a file the backbone is randomly
initialised and the log says so.
"""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from taxonomy.files import load_data

log = logging.getLogger(__name__)

RESNETS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


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


NORMS = ("frozen_bn", "group_norm")
GN_GROUPS = 32


def resnet_norm(norm: str, weights: str | None) -> str:
    """The ResNet's normalisation: `auto` is frozen batch norm over pretrained weights (their
    statistics, as DETR and DINO keep them) and trainable GroupNorm(32) without them (He et al.,
    "Rethinking ImageNet Pre-training": a ResNet trained from scratch needs normalisation that
    learns; frozen batch norm with no statistics is an identity, and under Adam the
    unnormalised activations grow by orders of magnitude within a few thousand steps)."""
    if norm == "auto":
        return "frozen_bn" if weights else "group_norm"
    if norm not in NORMS:
        raise ValueError(f"backbone_norm must be auto or one of {NORMS}, not {norm!r}")
    if norm == "group_norm" and weights:
        raise ValueError(
            "backbone_norm group_norm is for a ResNet trained from scratch; pretrained "
            "torchvision weights carry batch-norm statistics (use frozen_bn or auto)"
        )
    return norm


def resolve_norm(name: str, norm: str, weights: str | None) -> str:
    """`norm` resolved for backbone `name`: Swin's own LayerNorm (`auto` or `layer_norm`), or
    the ResNet's (`resnet_norm`)."""
    if name in SWINS:
        if norm not in ("auto", "layer_norm"):
            raise ValueError(f"Swin backbones normalise with LayerNorm, not backbone_norm {norm!r}")
        return "layer_norm"
    return resnet_norm(norm, weights)


class ResNetBackbone(nn.Module):
    """Features of stages 2-4 (strides 8, 16, 32) of a torchvision ResNet, normalised by `norm`
    (`resnet_norm`). Over pretrained `weights` the stem and the stages before
    `train_from_stage` are frozen; without weights every layer trains (there is nothing to
    keep)."""

    def __init__(
        self,
        name: str = "resnet50",
        weights: str | None = None,
        train_from_stage: int = 2,
        out_stages: tuple[int, ...] = (2, 3, 4),
        norm: str = "auto",
        weights_prefix: str | None = None,
    ):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet {name!r}; choose one of {sorted(RESNETS)}")
        self.norm = resnet_norm(norm, weights)
        norm_layer = (
            FrozenBatchNorm2d
            if self.norm == "frozen_bn"
            else lambda channels: nn.GroupNorm(GN_GROUPS, channels)
        )
        net = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        del net.fc  # the classifier: ImageNet files carry it, detection never uses it
        if weights:
            load_weights(
                net, weights, f"backbone {name}", ignore_prefixes=("fc.",), prefix=weights_prefix
            )
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.out_stages = out_stages
        self.channels = [RESNETS[name][s - 1] for s in out_stages]
        self.strides = [2 ** (s + 1) for s in out_stages]
        if weights:  # the pretrained stem and early stages stay as they are (DETR, DINO)
            for p in self.stem.parameters():
                p.requires_grad_(False)
            for stage, module in enumerate(self.stages, start=1):
                if stage < train_from_stage:
                    for p in module.parameters():
                        p.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)
        features = []
        for stage, module in enumerate(self.stages, start=1):
            x = module(x)
            if stage in self.out_stages:
                features.append(x)
        return features


SWINS = {
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_b": "swin_base_patch4_window12_384",  # the papers' Swin-B (1k or 22k weights)
    "swin_l": "swin_large_patch4_window12_384",
}


class SwinBackbone(nn.Module):
    """Features of Swin stages 2-4 (strides 8, 16, 32) from timm, for any input size.

    A local checkpoint in timm's layout or in Microsoft's (the `swin_base_patch4_window12_384
    _22k.pth` releases the papers start from, converted by timm's own checkpoint filter, which
    also resizes relative-position tables to this model's window) loads strictly except for the
    classification head (`head.*`), which detection does not use.
    """

    def __init__(
        self,
        name: str = "swin_t",
        weights: str | None = None,
        drop_path_rate: float = 0.2,
        weights_prefix: str | None = None,
    ):
        super().__init__()
        import timm

        if name not in SWINS:
            raise ValueError(f"unknown Swin {name!r}; choose one of {sorted(SWINS)}")
        self.net = timm.create_model(
            SWINS[name],
            pretrained=False,
            num_classes=0,
            strict_img_size=False,
            drop_path_rate=drop_path_rate,
        )
        if weights:
            from timm.models.swin_transformer import checkpoint_filter_fn

            load_weights(
                self.net, weights, f"backbone {name}", ignore_prefixes=("head.",),
                prefix=weights_prefix, convert=lambda state: checkpoint_filter_fn(state, self.net),
            )  # fmt: skip
        info = self.net.feature_info
        self.channels = [info[i]["num_chs"] for i in (1, 2, 3)]
        self.strides = [info[i]["reduction"] for i in (1, 2, 3)]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.net.forward_intermediates(
            images, indices=[1, 2, 3], intermediates_only=True, output_fmt="NCHW"
        )


def build_backbone(
    name: str,
    weights: str | None = None,
    train_from_stage: int = 2,
    drop_path: float | None = None,
    norm: str = "auto",
    weights_prefix: str | None = None,
) -> nn.Module:
    """A ResNet (`resnet18/34/50/101`) or Swin (`swin_t/b/l`, with stochastic depth
    `drop_path`, 0.2 when None as in DINO) backbone by name, normalised by `norm`
    (`resolve_norm`); `weights_prefix` names where a detector's checkpoint keeps the backbone
    (None: detected)."""
    norm = resolve_norm(name, norm, weights)
    if name in SWINS:
        rate = 0.2 if drop_path is None else drop_path
        return SwinBackbone(name, weights, drop_path_rate=rate, weights_prefix=weights_prefix)
    if drop_path:
        raise ValueError(f"backbone_drop_path applies to Swin backbones, not {name}")
    return ResNetBackbone(name, weights, train_from_stage, norm=norm, weights_prefix=weights_prefix)


class ChannelMapper(nn.Module):
    """DINO's neck: a 1x1 conv + GroupNorm per backbone level, plus extra levels from a 3x3
    stride-2 conv on the last backbone level (4 scales from 3 backbone levels)."""

    def __init__(
        self, in_channels: list[int], d_model: int = 256, num_levels: int = 4, groups: int = 32
    ):
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError("num_levels must cover every backbone level")
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(groups, d_model))
            for c in in_channels
        )
        extra, source = [], in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            extra.append(
                nn.Sequential(
                    nn.Conv2d(source, d_model, 3, stride=2, padding=1),
                    nn.GroupNorm(groups, d_model),
                )
            )
            source = d_model
        self.extra = nn.ModuleList(extra)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight, gain=1)
                nn.init.constant_(module.bias, 0)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [proj(f) for proj, f in zip(self.proj, features)]
        source = features[-1]
        for layer in self.extra:
            source = layer(source)
            out.append(source)
        return out


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The padding mask [B, H, W] at a feature map's size (nearest)."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]

"""Backbones giving multi-scale features, and the neck that maps them to the model width.

ResNet (torchvision) over pretrained weights: frozen batch norm and a frozen stem + first stage,
as DETR/DINO train it; without weights every layer trains, normalised by GroupNorm. Weights
come only from a local file named in the config (a PyTorch state dict or safetensors), or from
a file that ships with vastdet, named `vastdet:<name>` (read by `vastdet.runtime.weights`); keys are checked strictly
and a mismatch names the missing and unexpected keys. Without a file the backbone is randomly
initialised and the log says so.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from vastdet.runtime.weights import load_weights

log = logging.getLogger(__name__)

RESNETS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


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
    "swin_b": "swin_base_patch4_window12_384",  # the papers' Swin-B (22k weights)
    "swin_b_w7": "swin_base_patch4_window7_224",  # Swin-B 1k at window 7 (CQ-DINO's 1k model)
    "swin_l": "swin_large_patch4_window12_384",
}


class SwinBackbone(nn.Module):
    """Features of Swin stages 2-4 (strides 8, 16, 32) from timm, for any input size, each
    level through a LayerNorm of its own (`norms`), as DINO's and CQ-DINO's Swin do (their
    `norm1`..`norm3`): a classification checkpoint has none of them, so they start as fresh
    LayerNorms; the classifier's final `norm` is not used.

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
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        levels = self.net.forward_intermediates(
            images, indices=[1, 2, 3], intermediates_only=True, output_fmt="NCHW"
        )
        return [
            norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
            for norm, x in zip(self.norms, levels)
        ]


def build_backbone(
    name: str,
    weights: str | None = None,
    train_from_stage: int = 2,
    drop_path: float | None = None,
    norm: str = "auto",
    weights_prefix: str | None = None,
) -> nn.Module:
    """A ResNet (`resnet18/34/50/101`) or Swin (`swin_t/b/b_w7/l`, with stochastic depth
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

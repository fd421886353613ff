"""Position encoding, ResNet backbone (frozen parts, local weights) and the 4-scale neck."""

from __future__ import annotations

import pytest
import torch

from vastdet.models.backbone import ChannelMapper, ResNetBackbone, downsample_mask
from vastdet.models.position_encoding import SinePositionEncoding


def test_position_encoding_ignores_padding():
    enc = SinePositionEncoding(num_feats=8)
    small = torch.zeros(1, 5, 7, dtype=torch.bool)
    padded = torch.ones(1, 9, 12, dtype=torch.bool)
    padded[0, :5, :7] = False
    a, b = enc(small), enc(padded)
    assert a.shape == (1, 16, 5, 7) and b.shape == (1, 16, 9, 12)
    torch.testing.assert_close(b[..., :5, :7], a)
    # the first half encodes y: constant along a row, varying down the columns
    assert torch.allclose(a[0, :8, 2, 0], a[0, :8, 2, 6]) and not torch.allclose(
        a[0, :8, 0, 0], a[0, :8, 4, 0]
    )


def test_resnet_strides_channels_and_frozen_parts():
    net = ResNetBackbone("resnet18")
    feats = net(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 8, 12), (256, 4, 6), (512, 2, 3)]
    assert net.channels == [128, 256, 512] and net.strides == [8, 16, 32]
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert any(n.startswith("stem") for n in frozen) and any(
        n.startswith("stages.0") for n in frozen
    )
    assert not any(n.startswith("stages.1") for n in frozen)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_resnet_norm_is_frozen_over_weights_and_group_norm_from_scratch(tmp_path):
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    from vastdet.models.build import ModelConfig

    scratch = ResNetBackbone("resnet18")
    norms = [m for m in scratch.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert scratch.norm == "group_norm" and len(norms) == 20  # stem 1 + 8 blocks x 2 + 3 shortcuts
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in scratch.modules())
    # the norms learn where the convolutions do
    trainable = {n for n, p in scratch.named_parameters() if p.requires_grad}
    assert "stages.1.0.bn1.weight" in trainable and "stem.1.weight" not in trainable
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    pretrained = ResNetBackbone("resnet18", weights=str(path))
    assert pretrained.norm == "frozen_bn"
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in pretrained.modules())
    with pytest.raises(ValueError, match="group_norm is for a ResNet trained from scratch"):
        ResNetBackbone("resnet18", weights=str(path), norm="group_norm")
    # the config resolves `auto`, so a run's config.json records what it trained
    assert ModelConfig(backbone="resnet18").backbone_norm == "group_norm"
    assert ModelConfig(backbone="resnet18", backbone_weights=str(path)).backbone_norm == "frozen_bn"
    assert ModelConfig(backbone="swin_t").backbone_norm == "layer_norm"
    with pytest.raises(ValueError, match="backbone_norm must be auto or one of"):
        ModelConfig(backbone="resnet18", backbone_norm="batch_norm")


def test_resnet_from_scratch_keeps_its_scale_when_its_weights_grow():
    """Frozen batch norm without statistics is an identity, so a ResNet trained from scratch
    with it is unnormalised: its features scale with the product of its convolutions' weights
    (training the convergence benchmark's DINO took the last level from ~1 to ~4e6, and a
    selector reading that level directly learned nothing). GroupNorm undoes a weight's scale."""

    def growth(norm: str) -> float:
        torch.manual_seed(0)
        net = ResNetBackbone("resnet18", norm=norm)
        images = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            before = net(images)[-1].abs().mean()
            for module in net.modules():
                if isinstance(module, torch.nn.Conv2d):
                    module.weight.mul_(2.0)  # each convolution's weights twice as large
            return float(net(images)[-1].abs().mean() / before)

    assert growth("frozen_bn") > 1000
    assert 0.5 < growth("group_norm") < 2


def test_local_weights_load_and_mismatch_is_named(tmp_path):
    import torchvision

    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    net = ResNetBackbone("resnet18", weights=str(path))
    torch.testing.assert_close(net.stem[0].weight, source.conv1.weight)
    torch.testing.assert_close(net.stages[3][1].conv2.weight, source.layer4[1].conv2.weight)
    state = source.state_dict()
    del state["layer2.0.conv1.weight"]
    state["head.extra"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"1 missing keys \['layer2.0.conv1.weight'\], 1 unexpected keys \['head.extra'\]",
    ):
        ResNetBackbone("resnet18", weights=str(path))


def test_neck_gives_four_levels_of_model_width():
    neck = ChannelMapper([128, 256, 512], d_model=32, num_levels=4, groups=8)
    feats = [torch.randn(1, 128, 8, 12), torch.randn(1, 256, 4, 6), torch.randn(1, 512, 2, 3)]
    out = neck(feats)
    assert [tuple(o.shape) for o in out] == [
        (1, 32, 8, 12),
        (1, 32, 4, 6),
        (1, 32, 2, 3),
        (1, 32, 1, 2),
    ]


def test_mask_downsampling():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, :, 4:] = True
    assert downsample_mask(mask, (2, 2)).tolist() == [[[False, True], [False, True]]]


def test_swin_any_input_size_and_local_weights(tmp_path):
    import timm

    from vastdet.models.backbone import SwinBackbone, build_backbone

    net = build_backbone("swin_t")
    assert (
        isinstance(net, SwinBackbone)
        and net.channels == [192, 384, 768]
        and net.strides == [8, 16, 32]
    )
    feats = net(torch.randn(1, 3, 100, 140))
    assert [tuple(f.shape) for f in feats] == [(1, 192, 13, 18), (1, 384, 7, 9), (1, 768, 4, 5)]
    # a timm classification checkpoint (with its head) loads; its head is dropped
    torch.manual_seed(1)
    source = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10)
    path = tmp_path / "swin_t.pth"
    torch.save(source.state_dict(), path)
    loaded = SwinBackbone("swin_t", weights=str(path))
    torch.testing.assert_close(loaded.net.patch_embed.proj.weight, source.patch_embed.proj.weight)
    state = source.state_dict()
    del state["layers.1.blocks.0.attn.qkv.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 missing keys \['layers.1.blocks.0.attn.qkv.weight'\]"):
        SwinBackbone("swin_t", weights=str(path))


def test_runs_written_before_backbone_norm_restore_with_frozen_batch_norm():
    from dataclasses import asdict

    from vastdet.config import from_dict
    from vastdet.engine.loading import _model_from_state
    from vastdet.models.build import ModelConfig, build_model

    cfg = from_dict(ModelConfig, {"preset": "dino_tiny", "backbone_norm": "frozen_bn"})
    model, _, _ = build_model(cfg, [1, 2, 3], weights_follow=True)
    settings = asdict(cfg)
    del settings["backbone_norm"]  # what such a run's config.json holds
    restored, _, _ = _model_from_state(model.state_dict(), {"model": settings}, "old run")
    assert restored.backbone.norm == "frozen_bn"
    torch.testing.assert_close(restored.state_dict(), model.state_dict())

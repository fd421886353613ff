"""Position encoding, ResNet backbone (frozen parts, local weights) and the 4-scale neck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


def test_resnet_strides_channels_and_frozen_parts_over_weights(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)  # with its fc
    net = ResNetBackbone("resnet18", weights=str(path))
    feats = net(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 8, 12), (256, 4, 6), (512, 2, 3)]
    assert net.channels == [128, 256, 512] and net.strides == [8, 16, 32]
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert any(n.startswith("stem") for n in frozen) and any(
        n.startswith("stages.0") for n in frozen
    )
    assert not any(n.startswith("stages.1") for n in frozen)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_resnet_without_weights_trains_every_layer():
    """Nothing pretrained to keep: the stem and first stage train like the rest (they used to
    stay at their random initial values)."""
    net = ResNetBackbone("resnet18", train_from_stage=2)
    assert all(p.requires_grad for p in net.parameters())
    frozen_buffers = [n for n, _ in net.named_buffers()]
    assert frozen_buffers == []  # GroupNorm: no running statistics either


def test_resnet_norm_is_frozen_over_weights_and_group_norm_from_scratch(tmp_path):
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    from vastdet.models.build import ModelConfig

    scratch = ResNetBackbone("resnet18")
    norms = [m for m in scratch.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert scratch.norm == "group_norm" and len(norms) == 20  # stem 1 + 8 blocks x 2 + 3 shortcuts
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in scratch.modules())
    # the norms learn where the convolutions do: everywhere, from scratch
    trainable = {n for n, p in scratch.named_parameters() if p.requires_grad}
    assert "stages.1.0.bn1.weight" in trainable and "stem.1.weight" in trainable
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
    from vastdet.models.build import ModelConfig, build_model
    from vastdet.runtime.loading import _model_from_state

    cfg = from_dict(ModelConfig, {"preset": "dino_tiny", "backbone_norm": "frozen_bn"})
    model, _, _ = build_model(cfg, [1, 2, 3], weights_follow=True)
    settings = asdict(cfg)
    del settings["backbone_norm"]  # what such a run's config.json holds
    restored, _, _ = _model_from_state(model.state_dict(), {"model": settings}, "old run")
    assert restored.backbone.norm == "frozen_bn"
    torch.testing.assert_close(restored.state_dict(), model.state_dict())


def test_the_shipped_backbone_loads_as_data_and_matches_its_record():
    from safetensors import safe_open

    from taxonomy.files import file_sha256
    from vastdet.runtime.weights import read_state, resolve_weights, shipped_record

    record = shipped_record("resnet18_synth")
    path = resolve_weights("vastdet:resnet18_synth")
    assert path.suffix == ".safetensors" and path.stat().st_size < 40e6
    assert file_sha256(path) == record["sha256"]
    with safe_open(str(path), "pt") as handle:  # tensors only: nothing in it can run code
        assert handle.metadata()["layout"] == "torchvision"
        keys = set(handle.keys())
    assert not any(k.startswith("fc.") for k in keys) and "layer4.1.bn2.running_var" in keys
    assert record["command"].startswith("vastdet pretrain-backbone")
    assert record["vocabulary"]["id_prefix"] == "pt" and record["seconds"]["total"] > 0
    net = ResNetBackbone("resnet18", weights="vastdet:resnet18_synth")
    state = read_state(path)
    assert net.norm == "frozen_bn"  # the statistics it was trained with, as ImageNet weights
    assert torch.equal(net.stages[3][1].conv2.weight, state["layer4.1.conv2.weight"].float())


def test_a_changed_shipped_file_is_refused(tmp_path, monkeypatch):
    import shutil

    from vastdet.runtime import weights as backbone

    shipped = backbone.SHIPPED_DIR / backbone.SHIPPED["resnet18_synth"]
    copy = tmp_path / shipped.name
    shutil.copy(shipped, copy)
    shutil.copy(shipped.with_suffix(".json"), copy.with_suffix(".json"))
    with copy.open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\1")
    monkeypatch.setattr(backbone, "SHIPPED_DIR", tmp_path)
    backbone.resolve_weights.cache_clear()
    try:
        with pytest.raises(ValueError, match="the file was changed or cut short"):
            backbone.resolve_weights("vastdet:resnet18_synth")
        with pytest.raises(ValueError, match="no shipped weights vastdet:resnet99"):
            backbone.resolve_weights("vastdet:resnet99")
    finally:
        backbone.resolve_weights.cache_clear()


def test_the_pretraining_recipe_writes_weights_a_detector_loads(tmp_path):
    """A tiny run of the recipe: its vocabulary is a made-up tree (no WordNet, V3Det or
    benchmark node id), its file holds the trunk in torchvision's layout and loads strictly,
    its record carries the sha256 and the command."""
    import json

    from taxonomy.files import file_sha256
    from vastdet.engine.pretrain import PretrainConfig, pretrain, pretraining_taxonomy

    tax = pretraining_taxonomy(50, seed=3)
    assert tax.num_categories == 50 and len(tax.roots()) == 1
    assert all(node_id.startswith("pt") for node_id in tax.ids)
    assert all(tax.depth(tax.node_of_category(c)) >= 4 for c in tax.category_ids().tolist())
    cfg = PretrainConfig(
        categories=50, train_images=64, val_images=16, image_size=64, batch_size=8, steps=6,
        warmup_steps=2,
    )  # fmt: skip
    out = tmp_path / "r18.safetensors"
    record = pretrain(cfg, out, workers=1)
    assert json.loads(out.with_suffix(".json").read_text()) == record
    assert record["sha256"] == file_sha256(out)
    assert record["command"] == (
        "vastdet pretrain-backbone --categories 50 --train-images 64 --val-images 16 "
        "--image-size 64 --batch-size 8 --steps 6 --warmup-steps 2 -o r18.safetensors"
    )
    assert 0 <= record["held_out"]["box_top1"] <= 1 and 0 <= record["held_out"]["image_auc"] <= 1
    net = ResNetBackbone("resnet18", weights=str(out))  # strict: every key, no fc
    assert [f.shape[1] for f in net(torch.randn(1, 3, 64, 64))] == [128, 256, 512]


def test_pretraining_targets_follow_each_categorys_path_coarse_to_fine():
    from taxonomy import Node, Taxonomy
    from vastdet.engine.pretrain import PathTargets

    tax = Taxonomy(
        [
            Node("r", "root"),
            Node("a", "a", ("r",), 1),
            Node("b", "b", ("a",), 2),
            Node("c", "c", ("r",), 3),
        ]
    )
    paths = PathTargets(tax)
    assert paths.sizes == [2, 1]  # depth 1: a, c; depth 2: b
    assert paths.column[[1, 2, 3]].tolist() == [[0, -1], [0, 0], [1, -1]]
    # a box of category 3 counts at depth 1 only; perfect logits give (almost) no loss
    logits = [torch.tensor([[-9.0, 9.0]]), torch.tensor([[0.0]])]
    assert paths.loss(logits, torch.tensor([3]), 0.0).item() < 1e-6


def test_resnet_weights_load_from_a_detectors_checkpoint_under_its_prefix(tmp_path):
    """mmdetection keeps the backbone under `backbone.`, DETR/DINO under `backbone.0.body.`,
    DDP under `module.`: detected, or named in the config; the rest of the detector is left."""
    import torchvision

    from vastdet.config import from_dict
    from vastdet.models.backbone import build_backbone
    from vastdet.models.build import ModelConfig
    from vastdet.runtime.weights import detect_prefix

    reference = torchvision.models.resnet18(weights=None).state_dict()
    own = [k for k in reference if not k.startswith("fc.")]
    for prefix in ("backbone.", "backbone.0.body.", "module.backbone."):
        detector = {prefix + k: v for k, v in reference.items() if not k.startswith("fc.")}
        detector.update(
            {"neck.0.conv.weight": torch.zeros(3), "transformer.layers.0.w": torch.ones(2)}
        )
        assert detect_prefix(detector, own) == prefix
        path = tmp_path / "detector.pth"
        torch.save({"state_dict": detector, "meta": {"epoch": 12}}, path)
        net = ResNetBackbone("resnet18", weights=str(path))
        assert torch.equal(net.stages[1][0].conv1.weight, reference["layer2.0.conv1.weight"])
    assert detect_prefix(reference, own) == ""  # torchvision's own file: nothing to strip
    cfg = from_dict(
        ModelConfig,
        {
            "backbone": "resnet18",
            "backbone_weights": str(path),
            "backbone_weights_prefix": "module.backbone.",
        },
    )
    net = build_backbone(
        cfg.backbone, cfg.backbone_weights, weights_prefix=cfg.backbone_weights_prefix
    )
    assert torch.equal(net.stem[0].weight, reference["conv1.weight"])
    with pytest.raises(ValueError, match=r"does not fit the backbone resnet18: \d+ missing keys"):
        build_backbone("resnet18", str(path), weights_prefix="neck.")


def swin_in_microsofts_layout(state: dict) -> dict:
    """A timm Swin state dict in the layout of Microsoft's releases: each stage's patch merging
    at its end (timm keeps it at the next stage's start), the classifier as `head`, and the
    relative-position index buffers the original code saves."""
    import re

    out = {}
    for key, value in state.items():
        key = re.sub(
            r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key
        )
        out[key.replace("head.fc.", "head.")] = value
        if key.endswith("relative_position_bias_table"):
            out[key.replace("bias_table", "index")] = torch.zeros(49, 49, dtype=torch.long)
    return out


def test_swin_loads_timm_and_microsoft_layouts(tmp_path):
    import timm

    from vastdet.models.backbone import SwinBackbone

    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5)
    state = reference.state_dict()
    microsoft = swin_in_microsofts_layout(state)
    assert "layers.0.downsample.reduction.weight" in microsoft and "head.weight" in microsoft
    for name, layout in (("timm", state), ("microsoft", {"model": microsoft})):
        path = tmp_path / f"{name}.pth"
        torch.save(layout, path)
        net = SwinBackbone("swin_t", weights=str(path), drop_path_rate=0.0)
        got = net.net.state_dict()
        for key in ("layers.1.downsample.reduction.weight", "layers.3.blocks.1.mlp.fc2.weight"):
            assert torch.equal(got[key], state[key]), (name, key)
        reference.eval(), net.eval()
        images = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            ours = net(images)[-1]
            theirs = reference.forward_intermediates(images, indices=[3], intermediates_only=True)
            # each level then goes through its own LayerNorm (DINO's norm1..norm3)
            theirs = F.layer_norm(theirs[0].permute(0, 2, 3, 1), (768,)).permute(0, 3, 1, 2)
        torch.testing.assert_close(ours, theirs)

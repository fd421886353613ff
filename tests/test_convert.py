"""`vastdet convert`: a released CQ-DINO checkpoint (RedAIGC/CQ-DINO, mmdetection 3) as a vastdet
model file. The released layout is written here from the released code's module names and
shapes (mmdetection's Swin, ChannelMapper, deformable layers, Grounding DINO's fusion, decoder
and head, the Tag2Text selector), for a small model; where a released module comes from a
library we can install, the converted weights must give that module's outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# a small released model: Swin-T, 2 + 2 layers, width 32, a 1-layer selector
D, FFN, FUSION, QUERIES, LEVELS, LAYERS = 32, 48, 64, 20, 4, 2
WIDTH, IMAGE_WIDTH, SELECTOR_FFN = 16, 24, 40  # label_embed width = wordvec_proj width (released)
SWIN_DIMS, SWIN_DEPTHS, SWIN_HEADS, WINDOW = [96, 192, 384, 768], [2, 2, 6, 2], [3, 6, 12, 24], 7
HEADS, POINTS = 8, 4


def released_layout(num_categories: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the released detector's key names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def put(key, *shape):
        state[key] = torch.randn(*shape, generator=g) * 0.05

    def linear(key, out, inp, bias=True):
        put(f"{key}.weight", out, inp)
        if bias:
            put(f"{key}.bias", out)

    def norm(key, width):
        state[f"{key}.weight"] = 1 + torch.randn(width, generator=g) * 0.1
        put(f"{key}.bias", width)

    put("backbone.patch_embed.projection.weight", SWIN_DIMS[0], 3, 4, 4)
    put("backbone.patch_embed.projection.bias", SWIN_DIMS[0])
    norm("backbone.patch_embed.norm", SWIN_DIMS[0])
    for i, (c, depth, heads) in enumerate(zip(SWIN_DIMS, SWIN_DEPTHS, SWIN_HEADS)):
        for j in range(depth):
            block = f"backbone.stages.{i}.blocks.{j}"
            norm(f"{block}.norm1", c)
            put(f"{block}.attn.w_msa.relative_position_bias_table", (2 * WINDOW - 1) ** 2, heads)
            state[f"{block}.attn.w_msa.relative_position_index"] = torch.zeros(
                WINDOW**2, WINDOW**2, dtype=torch.long
            )
            linear(f"{block}.attn.w_msa.qkv", 3 * c, c)
            linear(f"{block}.attn.w_msa.proj", c, c)
            norm(f"{block}.norm2", c)
            linear(f"{block}.ffn.layers.0.0", 4 * c, c)
            linear(f"{block}.ffn.layers.1", c, 4 * c)
        if i < 3:
            norm(f"backbone.stages.{i}.downsample.norm", 4 * c)
            linear(f"backbone.stages.{i}.downsample.reduction", 2 * c, 4 * c, bias=False)
    for i in (1, 2, 3):  # out_indices (1, 2, 3)
        norm(f"backbone.norm{i}", SWIN_DIMS[i])
    for k, c in enumerate(SWIN_DIMS[1:]):
        put(f"neck.convs.{k}.conv.weight", D, c, 1, 1)
        put(f"neck.convs.{k}.conv.bias", D)
        norm(f"neck.convs.{k}.gn", D)
    put("neck.extra_convs.0.conv.weight", D, SWIN_DIMS[-1], 3, 3)
    put("neck.extra_convs.0.conv.bias", D)
    norm("neck.extra_convs.0.gn", D)

    def deformable(key):
        linear(f"{key}.sampling_offsets", HEADS * LEVELS * POINTS * 2, D)
        linear(f"{key}.attention_weights", HEADS * LEVELS * POINTS, D)
        linear(f"{key}.value_proj", D, D)
        linear(f"{key}.output_proj", D, D)

    def ffn(key):
        linear(f"{key}.ffn.layers.0.0", FFN, D)
        linear(f"{key}.ffn.layers.1", D, FFN)

    def mha(key):
        put(f"{key}.attn.in_proj_weight", 3 * D, D)
        put(f"{key}.attn.in_proj_bias", 3 * D)
        linear(f"{key}.attn.out_proj", D, D)

    for layer in range(LAYERS):
        enc = f"encoder.layers.{layer}"
        deformable(f"{enc}.self_attn")
        ffn(enc)
        norm(f"{enc}.norms.0", D)
        norm(f"{enc}.norms.1", D)
        fusion = f"encoder.fusion_layers.{layer}"
        norm(f"{fusion}.layer_norm_v", D)
        norm(f"{fusion}.layer_norm_l", D)
        for name in ("v_proj", "l_proj", "values_v_proj", "values_l_proj"):
            linear(f"{fusion}.attn.{name}", FUSION, D)
        linear(f"{fusion}.attn.out_v_proj", D, FUSION)
        linear(f"{fusion}.attn.out_l_proj", D, FUSION)
        put(f"{fusion}.gamma_v", D)
        put(f"{fusion}.gamma_l", D)
        dec = f"decoder.layers.{layer}"
        mha(f"{dec}.self_attn")
        mha(f"{dec}.cross_attn_text")
        deformable(f"{dec}.cross_attn")
        ffn(dec)
        for n in range(4):
            norm(f"{dec}.norms.{n}", D)
    linear("decoder.ref_point_head.layers.0", D, 2 * D)
    linear("decoder.ref_point_head.layers.1", D, D)
    norm("decoder.norm", D)
    put("query_embedding.weight", QUERIES, D)
    put("level_embed", LEVELS, D)
    linear("memory_trans_fc", D, D)
    norm("memory_trans_norm", D)
    put("dn_query_generator.label_embedding.weight", 256, D)  # GroundingDINOHead num_classes
    linear("text_feat_map", D, WIDTH)
    for k in range(LAYERS + 1):  # per decoder layer, then the encoder's proposals
        put(f"bbox_head.cls_branches.{k}.bias", 1)
        linear(f"bbox_head.reg_branches.{k}.0", D, D)
        linear(f"bbox_head.reg_branches.{k}.2", D, D)
        linear(f"bbox_head.reg_branches.{k}.4", 4, D)
    put("language_model.label_embed", num_categories, WIDTH)
    norm("language_model.label_norm", WIDTH)
    linear("language_model.wordvec_proj", WIDTH, WIDTH)
    linear("language_model.fc", 1, WIDTH)
    linear("language_model.image_proj", IMAGE_WIDTH, SWIN_DIMS[-1])
    layer = "language_model.tagging_head.encoder.layer.0"
    linear(f"{layer}.crossattention.self.query", WIDTH, WIDTH)
    linear(f"{layer}.crossattention.self.key", WIDTH, IMAGE_WIDTH)
    linear(f"{layer}.crossattention.self.value", WIDTH, IMAGE_WIDTH)
    linear(f"{layer}.crossattention.output.dense", WIDTH, WIDTH)
    norm(f"{layer}.crossattention.output.LayerNorm", WIDTH)
    linear(f"{layer}.intermediate.dense", SELECTOR_FFN, WIDTH)
    linear(f"{layer}.output.dense", WIDTH, SELECTOR_FFN)
    norm(f"{layer}.output.LayerNorm", WIDTH)
    return state


def released_taxonomy(tmp_path: Path) -> Path:
    """A 12-category tree whose file lists categories out of id order (the release's rows
    follow the file)."""
    nodes = [
        {"id": "animal", "name": "animal", "parents": [], "category_id": 30},
        {"id": "dog", "name": "dog", "parents": ["animal"], "category_id": 4},
        {"id": "cat", "name": "cat", "parents": ["animal"], "category_id": 17},
        {"id": "puppy", "name": "puppy", "parents": ["dog"], "category_id": 2},
        {"id": "vehicle", "name": "vehicle", "parents": [], "category_id": 11},
        {"id": "car", "name": "car", "parents": ["vehicle"], "category_id": 5},
        {"id": "bus", "name": "bus", "parents": ["vehicle"], "category_id": 40},
        {"id": "taxi", "name": "taxi", "parents": ["car"], "category_id": 8},
        {"id": "plant", "name": "plant", "parents": [], "category_id": 21},
        {"id": "tree", "name": "tree", "parents": ["plant"], "category_id": 1},
        {"id": "oak", "name": "oak", "parents": ["tree"], "category_id": 9},
        {"id": "rose", "name": "rose", "parents": ["plant"], "category_id": 33},
    ]
    path = tmp_path / "tree.json"
    path.write_text(json.dumps({"format": "vastdet.taxonomy", "version": 1, "nodes": nodes}))
    return path


def small_base():
    from vastdet.config import load_config, preset_path
    from vastdet.models.build import ModelConfig

    base = load_config(preset_path("cq_dino_swin_b"), ModelConfig)
    return replace(base, num_selected=5, selector_dropout=0.0, fusion_dropout=0.0, dn_number=4)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from taxonomy import load_taxonomy
    from vastdet.runtime.convert import convert_released

    tmp = tmp_path_factory.mktemp("convert")
    tree = released_taxonomy(tmp)
    state = released_layout(12)
    path = tmp / "released.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": state}, path)
    done = convert_released(path, load_taxonomy(tree), small_base())
    return state, done, path, tree


def test_every_released_tensor_is_mapped_or_dropped_with_a_reason(converted):
    state, done, _, _ = converted
    assert set(done.mapped) | {k for k in state if k in done.dropped} == set(state)
    dropped = {re.sub(r"\.\d+\.", ".N.", k) for k in done.dropped}
    assert dropped == {
        "backbone.stages.N.blocks.N.attn.w_msa.relative_position_index",
        "dn_query_generator.label_embedding.weight[5:]",
    }
    assert all(done.dropped.values())
    # our tensors without a released counterpart are the taxonomy's and timm's unused norm
    kept = {re.sub(r"\.(weight|bias)$", "", k) for k in done.kept}
    assert kept == {
        "category_ids",
        "category_queries.tree_parent",
        "category_queries.tree_child",
        "category_queries.tree_level_sizes",
        "category_queries.tree_alpha",
        "backbone.net.norm",
    }
    cfg = done.model
    assert (cfg.backbone, cfg.enc_layers, cfg.dec_layers, cfg.num_queries) == ("swin_t", 2, 2, 20)
    assert (cfg.d_model, cfg.d_ffn, cfg.fusion_dim, cfg.selector_layers) == (D, FFN, FUSION, 1)
    assert (cfg.tree_alpha, cfg.share_heads, cfg.selector_masks_padding) == (
        "official",
        False,
        False,
    )


@pytest.mark.parametrize(
    "released, ours",
    [
        ("decoder.layers.1.norms.1.weight", "transformer.decoder.1.norm_cat.weight"),
        ("decoder.layers.0.norms.2.bias", "transformer.decoder.0.norm2.bias"),
        (
            "decoder.layers.1.cross_attn_text.attn.in_proj_weight",
            "transformer.decoder.1.category_attn.in_proj_weight",
        ),
        ("encoder.layers.1.ffn.layers.1.weight", "transformer.encoder.1.ffn.3.weight"),
        (
            "encoder.fusion_layers.0.attn.values_l_proj.weight",
            "transformer.enhancer.0.bi_attn.cat_v.weight",
        ),
        ("encoder.fusion_layers.1.gamma_v", "transformer.enhancer.1.img_scale"),
        ("bbox_head.cls_branches.1.bias", "alignment.1.bias"),
        ("bbox_head.cls_branches.2.bias", "enc_alignment.bias"),
        ("bbox_head.reg_branches.2.4.weight", "enc_bbox_head.layers.2.weight"),
        ("bbox_head.reg_branches.0.2.bias", "bbox_head.0.layers.1.bias"),
        ("backbone.norm1.weight", "backbone.norms.0.weight"),
        (
            "backbone.stages.2.blocks.5.ffn.layers.0.0.weight",
            "backbone.net.layers.2.blocks.5.mlp.fc1.weight",
        ),
        ("neck.extra_convs.0.gn.bias", "neck.extra.0.1.bias"),
        ("query_embedding.weight", "transformer.content_queries.weight"),
        ("memory_trans_fc.weight", "transformer.enc_output.weight"),
        ("text_feat_map.weight", "category_proj.weight"),
        (
            "language_model.tagging_head.encoder.layer.0.output.dense.weight",
            "selector.layers.0.ffn.2.weight",
        ),
        ("language_model.fc.bias", "selector.scorer.bias"),
    ],
)
def test_a_released_tensor_lands_where_its_module_is(converted, released, ours):
    state, done, _, _ = converted
    assert done.mapped[released] == ours
    assert torch.equal(done.state[ours], state[released])


def test_category_rows_move_from_file_order_to_ascending_ids(converted):
    state, done, _, _ = converted
    file_ids = [30, 4, 17, 2, 11, 5, 40, 8, 21, 1, 9, 33]
    ascending = sorted(file_ids)
    assert done.state["category_ids"].tolist() == ascending
    rows = done.state["category_queries.embedding.weight"]
    for row, cid in enumerate(ascending):
        assert torch.equal(rows[row], state["language_model.label_embed"][file_ids.index(cid)])
    assert torch.equal(
        done.state["dn_label_embedding.weight"],
        state["dn_query_generator.label_embedding.weight"][:5],
    )


def unfold_merging(x: torch.Tensor, norm_w, norm_b, reduction) -> torch.Tensor:
    """mmdetection's PatchMerging: [B, H, W, C] -> nn.Unfold(2, stride 2) -> norm -> reduction."""
    cols = nn.Unfold(kernel_size=2, stride=2)(x.permute(0, 3, 1, 2))  # [B, 4C, L]
    cols = cols.transpose(1, 2)
    return F.linear(F.layer_norm(cols, (cols.shape[-1],), norm_w, norm_b), reduction)


def test_patch_merging_gives_the_unfold_merging_s_outputs(converted):
    """The permuted reduction and norm make timm's merging equal mmdetection's Unfold one."""
    import timm

    state, done, _, _ = converted
    net = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0)
    merging = net.layers[1].downsample
    merging.load_state_dict(
        {k.split("downsample.")[1]: v for k, v in done.state.items() if "layers.1.downsample" in k}
    )
    x = torch.randn(2, 6, 10, 96)
    theirs = unfold_merging(
        x,
        state["backbone.stages.0.downsample.norm.weight"],
        state["backbone.stages.0.downsample.norm.bias"],
        state["backbone.stages.0.downsample.reduction.weight"],
    )
    with torch.no_grad():
        ours = merging(x)  # [B, H/2, W/2, 2C]
    torch.testing.assert_close(ours.flatten(1, 2), theirs)


def test_the_selector_gives_the_bert_cross_attention_layers_outputs(converted):
    """The released selector is BLIP/Tag2Text's BERT layer with its self-attention deleted:
    cross-attention to the image tokens, then the feed-forward block; transformers builds
    that layer (`BlipTextLayer`), and the converted selector must score as it does."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.blip.modeling_blip_text import BlipTextLayer

    from vastdet.models.build import build_model

    state, done, _, _ = converted
    config = transformers.BlipTextConfig(
        hidden_size=WIDTH,
        encoder_hidden_size=IMAGE_WIDTH,
        intermediate_size=SELECTOR_FFN,
        num_attention_heads=4,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        is_decoder=True,
    )
    layer = BlipTextLayer(config, 0).eval()
    prefix = "language_model.tagging_head.encoder.layer.0."
    theirs = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = layer.load_state_dict(theirs, strict=False)
    assert not unexpected and all(k.startswith("attention.") for k in missing)

    model, _, _ = build_model(done.model, done.state["category_ids"].tolist(), restoring=True)
    model.load_state_dict(done.state)
    selector = model.selector.eval()
    torch.manual_seed(0)
    feature = torch.randn(2, SWIN_DIMS[-1], 3, 4)
    cats = torch.randn(7, WIDTH)
    with torch.no_grad():
        ours = selector(cats, feature, torch.zeros(2, 3, 4, dtype=torch.bool))
        flat = feature.flatten(2).transpose(1, 2)
        tokens = F.linear(
            torch.cat([flat.mean(1, keepdim=True), flat], 1),
            state["language_model.image_proj.weight"],
            state["language_model.image_proj.bias"],
        )
        hidden, _ = layer.crossattention(cats[None].expand(2, -1, -1), encoder_hidden_states=tokens)
        hidden = layer.feed_forward_chunk(hidden)
        logits = F.linear(
            hidden, state["language_model.fc.weight"], state["language_model.fc.bias"]
        )
    torch.testing.assert_close(ours, logits.squeeze(-1), rtol=1e-4, atol=1e-5)


def test_the_converted_file_loads_and_detects(converted, tmp_path):
    """`vastdet convert` writes a model file that `vastdet predict` runs, with a report that
    accounts for every tensor; safetensors too."""
    from vastdet.runtime.loading import load_model

    _, _, path, tree = converted
    out = tmp_path / "cq_dino.pth"
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "vastdet.cli", "convert", str(path), "--taxonomy", str(tree),
         "-o", str(out), "--report", str(report)],
        capture_output=True, text=True, cwd=REPO, env=ENV,
    )  # fmt: skip
    # the command converts with the released configs' C' (100) over 12 categories: C' = 12
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dropped: backbone.stages.N.blocks.N.attn.w_msa.relative_position_index" in run.stdout
    account = json.loads(report.read_text())
    blocks = sum(SWIN_DEPTHS)  # one relative-position index buffer each, dropped
    assert len(account["mapped"]) + blocks == len(torch.load(path)["state_dict"])
    model, _, config = load_model(out)
    assert config["model"]["backbone"] == "swin_t" and config["eval"]["protocol"] == "v3det"
    assert config["data"]["transforms"]["eval_size"] == 800
    image = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8)).save(image)
    results = tmp_path / "detections.json"
    run = subprocess.run(
        [sys.executable, "-m", "vastdet.cli", "predict", str(image), "--checkpoint", str(out),
         "-o", str(results)], capture_output=True, text=True, cwd=REPO, env=ENV,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    detections = json.loads(results.read_text())
    assert detections and {d["category_id"] for d in detections} <= set(config_ids(out))
    safe = tmp_path / "cq_dino.safetensors"
    subprocess.run(
        [sys.executable, "-m", "vastdet.cli", "convert", str(path), "--taxonomy", str(tree),
         "-o", str(safe)], check=True, capture_output=True, cwd=REPO, env=ENV,
    )  # fmt: skip
    again, _, _ = load_model(safe)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def config_ids(path: Path) -> list[int]:
    return torch.load(path, weights_only=True)["category_ids"].tolist()


def test_a_checkpoint_the_rules_do_not_cover_is_refused_naming_the_keys(tmp_path):
    from taxonomy import load_taxonomy
    from vastdet.runtime.convert import ConversionError, convert_released

    tree = load_taxonomy(released_taxonomy(tmp_path))
    state = released_layout(12)
    state["encoder.text_layers.0.self_attn.attn.in_proj_weight"] = torch.zeros(3 * D, D)
    del state["decoder.layers.1.norms.3.bias"]
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(ConversionError) as err:
        convert_released(path, tree, small_base())
    assert "encoder.text_layers.0.self_attn.attn.in_proj_weight" in str(err.value)
    assert "transformer.decoder.1.norm3.bias" in str(err.value)
    state = released_layout(11)
    torch.save(state, path)
    with pytest.raises(ConversionError, match="11 category rows; the taxonomy has 12"):
        convert_released(path, tree, small_base())


def test_a_stage_one_file_gives_the_selector_that_stage_two_starts_from(tmp_path, converted):
    """The release's stage-1 file (backbone and language model alone) converts to the selector
    model; stage 2 (`init_from`) takes every one of its tensors."""
    from taxonomy import load_taxonomy
    from vastdet.models.build import build_model
    from vastdet.runtime.convert import convert_released
    from vastdet.runtime.loading import load_weights_from, write_model_file

    _, full, _, tree_path = converted
    stage1 = {
        k: v
        for k, v in released_layout(12).items()
        if k.startswith(("backbone.", "language_model."))
    }
    path = tmp_path / "stage1.pth"
    torch.save({"state_dict": stage1}, path)
    tree = load_taxonomy(tree_path)
    done = convert_released(path, tree, small_base())
    assert done.model.architecture == "cq_selector"
    assert set(done.mapped) | set(done.dropped) == set(stage1)
    model_file = tmp_path / "stage1_vastdet.pth"
    write_model_file(done.state, {"model": {}, "data": {}}, "stage 1", model_file)
    stage2, _, _ = build_model(full.model, done.state["category_ids"].tolist(), tree)
    assert load_weights_from(stage2, model_file) == len(done.state)
    ours = stage2.state_dict()
    assert torch.equal(ours["selector.layers.0.q.weight"], stage1[
        "language_model.tagging_head.encoder.layer.0.crossattention.self.query.weight"
    ])  # fmt: skip

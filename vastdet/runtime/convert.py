"""A released CQ-DINO checkpoint (RedAIGC/CQ-DINO, mmdetection 3) as vastdet weights.

The released detector is mmdetection's Grounding DINO with CQ-DINO's encoder (fusion layers, no
text layers), a Swin backbone (mmdetection's `SwinTransformer` layout with a LayerNorm per
output level) and the Tag2Text-style selector (`language_model`: the category table, its
projection and norm, BERT cross-attention layers without self-attention, a scorer). Every one
of its parameters maps to one of ours by the module names below, or is dropped with a reason;
the mapping refuses a checkpoint with keys it does not know, or that leaves one of our
parameters unfilled, naming them.

Two tensors change layout on the way: mmdetection's patch merging gathers each 2x2 patch with
`nn.Unfold` (channel-major: c * 4 + kh * 2 + kw) where timm's concatenates the four patches
(patch-major, patches in the order (0,0), (1,0), (0,1), (1,1)), so the merging's reduction
columns and norm are permuted; and the category table's rows follow the taxonomy file's
category order in the release and ascending category ids here.

What cannot be read from the weights (attention heads, sampling points, C') is the released
configs' (`cq_dino_swin_b`'s values).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch

log = logging.getLogger(__name__)

# the Swin variants the release uses, by (embedding width, window): our backbone names
SWIN_BY_SHAPE = {(96, 7): "swin_t", (128, 12): "swin_b", (128, 7): "swin_b_w7", (192, 12): "swin_l"}
# wrappers that prefix keys without changing them (DDP, fairscale/torch activation checkpointing)
WRAPPERS = ("module.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
_LINEARS = {"layers.0.0": "0", "layers.1": "3"}  # mmcv FFN -> our Linear-ReLU-Dropout-Linear
_FUSION = {
    "layer_norm_v": "img_norm",
    "layer_norm_l": "cat_norm",
    "gamma_v": "img_scale",
    "gamma_l": "cat_scale",
    "attn.v_proj": "bi_attn.img_q",
    "attn.l_proj": "bi_attn.cat_k",
    "attn.values_v_proj": "bi_attn.img_v",
    "attn.values_l_proj": "bi_attn.cat_v",
    "attn.out_v_proj": "bi_attn.img_out",
    "attn.out_l_proj": "bi_attn.cat_out",
}
_DECODER_NORMS = {"0": "norm1", "1": "norm_cat", "2": "norm2", "3": "norm3"}
_SELECTOR = {
    "crossattention.self.query": "q",
    "crossattention.self.key": "k",
    "crossattention.self.value": "v",
    "crossattention.output.dense": "out",
    "crossattention.output.LayerNorm": "norm1",
    "intermediate.dense": "ffn.0",
    "output.dense": "ffn.2",
    "output.LayerNorm": "norm2",
}
_TAIL = r"\.(weight|bias)$"

# (released key pattern, our key or a function of the match) in order; first match wins
RULES: list[tuple[str, object]] = [
    (r"backbone\.patch_embed\.projection" + _TAIL, r"backbone.net.patch_embed.proj.\1"),
    (r"backbone\.patch_embed\.norm" + _TAIL, r"backbone.net.patch_embed.norm.\1"),
    (
        r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.(relative_position_bias_table|"
        r"qkv\.weight|qkv\.bias|proj\.weight|proj\.bias)$",
        r"backbone.net.layers.\1.blocks.\2.attn.\3",
    ),
    (
        r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.(norm[12])" + _TAIL,
        r"backbone.net.layers.\1.blocks.\2.\3.\4",
    ),
    (
        r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0" + _TAIL,
        r"backbone.net.layers.\1.blocks.\2.mlp.fc1.\3",
    ),
    (
        r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1" + _TAIL,
        r"backbone.net.layers.\1.blocks.\2.mlp.fc2.\3",
    ),
    # mmdetection merges patches at the end of a stage, timm at the start of the next one
    (
        r"backbone\.stages\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$",
        lambda m: f"backbone.net.layers.{int(m[1]) + 1}.downsample.{m[2]}",
    ),
    (r"backbone\.norm(\d)" + _TAIL, lambda m: f"backbone.norms.{int(m[1]) - 1}.{m[2]}"),
    (r"neck\.convs\.(\d+)\.conv" + _TAIL, r"neck.proj.\1.0.\2"),
    (r"neck\.convs\.(\d+)\.gn" + _TAIL, r"neck.proj.\1.1.\2"),
    (r"neck\.extra_convs\.(\d+)\.conv" + _TAIL, r"neck.extra.\1.0.\2"),
    (r"neck\.extra_convs\.(\d+)\.gn" + _TAIL, r"neck.extra.\1.1.\2"),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|"
        r"output_proj)" + _TAIL,
        r"transformer.encoder.\1.attn.\2.\3",
    ),
    (
        r"(encoder|decoder)\.layers\.(\d+)\.ffn\.(layers\.0\.0|layers\.1)" + _TAIL,
        lambda m: f"transformer.{m[1]}.{m[2]}.ffn.{_LINEARS[m[3]]}.{m[4]}",
    ),
    (
        r"encoder\.layers\.(\d+)\.norms\.([01])" + _TAIL,
        lambda m: f"transformer.encoder.{m[1]}.norm{int(m[2]) + 1}.{m[3]}",
    ),
    (
        r"encoder\.fusion_layers\.(\d+)\.("
        + "|".join(re.escape(k) for k in _FUSION)
        + r")(\.weight|\.bias|)$",
        lambda m: f"transformer.enhancer.{m[1]}.{_FUSION[m[2]]}{m[3]}",
    ),
    (
        r"decoder\.layers\.(\d+)\.self_attn\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$",
        r"transformer.decoder.\1.self_attn.\2",
    ),
    (
        r"decoder\.layers\.(\d+)\.cross_attn_text\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$",
        r"transformer.decoder.\1.category_attn.\2",
    ),
    (
        r"decoder\.layers\.(\d+)\.cross_attn\.(sampling_offsets|attention_weights|value_proj|"
        r"output_proj)" + _TAIL,
        r"transformer.decoder.\1.cross_attn.\2.\3",
    ),
    (
        r"decoder\.layers\.(\d+)\.norms\.([0-3])" + _TAIL,
        lambda m: f"transformer.decoder.{m[1]}.{_DECODER_NORMS[m[2]]}.{m[3]}",
    ),
    (
        r"decoder\.ref_point_head\.layers\.(\d+)" + _TAIL,
        r"transformer.ref_point_head.layers.\1.\2",
    ),
    (r"decoder\.norm" + _TAIL, r"transformer.decoder_norm.\1"),
    (r"query_embedding\.weight$", "transformer.content_queries.weight"),
    (r"level_embed$", "transformer.level_embed"),
    (r"memory_trans_fc" + _TAIL, r"transformer.enc_output.\1"),
    (r"memory_trans_norm" + _TAIL, r"transformer.enc_output_norm.\1"),
    (r"dn_query_generator\.label_embedding\.weight$", "dn_label_embedding.weight"),
    (r"text_feat_map" + _TAIL, r"category_proj.\1"),
    (r"language_model\.label_embed$", "category_queries.embedding.weight"),
    (r"language_model\.wordvec_proj" + _TAIL, r"category_queries.proj.\1"),
    (r"language_model\.label_norm" + _TAIL, r"category_queries.norm.\1"),
    (r"language_model\.image_proj" + _TAIL, r"selector.image_proj.\1"),
    (r"language_model\.fc" + _TAIL, r"selector.scorer.\1"),
    (
        r"language_model\.tagging_head\.encoder\.layer\.(\d+)\.("
        + "|".join(re.escape(k) for k in _SELECTOR)
        + r")"
        + _TAIL,
        lambda m: f"selector.layers.{m[1]}.{_SELECTOR[m[2]]}.{m[3]}",
    ),
]

# released keys with no counterpart, and why
DROPPED: list[tuple[str, str]] = [
    (r"backbone\.stages\.\d+\.blocks\.\d+\.attn\.w_msa\.relative_position_index$",
     "a buffer recomputed from the window size"),
    (r"data_preprocessor\.", "image mean and std (the same ImageNet constants here)"),
    (r"language_model\.tagging_head\.embeddings\.", "the BERT token embeddings the selector "
     "does not use (the released selector deletes them)"),
]  # fmt: skip
# our keys the release has no tensor for, and why they may stay as built
KEPT: list[tuple[str, str]] = [
    (r"category_ids$", "the taxonomy's category ids"),
    (r"category_queries\.tree_", "the tree's edges and weights, from the taxonomy"),
    (r"backbone\.net\.norm\.", "timm's classifier norm, which the detector does not use"),
    (r"beam\.", "taxonomy-guided selection's tree, from the taxonomy"),
]


@dataclass
class Conversion:
    """What a conversion did: the state dict for our model, the model settings, and an account
    of every released tensor (`mapped` released -> ours, `dropped` with reasons) and of our
    tensors that kept their built values (`kept`, with reasons)."""

    state: dict[str, torch.Tensor]
    model: object  # ModelConfig
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[str]:
        """A few lines: counts, and the dropped and kept keys grouped by their pattern."""
        lines = [
            f"{len(self.mapped)} released tensors mapped, {len(self.dropped)} dropped, "
            f"{len(self.kept)} of ours kept as built"
        ]
        for what, table in (("dropped", self.dropped), ("kept", self.kept)):
            groups = Counter((re.sub(r"\.\d+\.", ".N.", k), why) for k, why in table.items())
            lines += [f"  {what}: {key} x{n} ({why})" for (key, why), n in sorted(groups.items())]
        return lines


class ConversionError(ValueError):
    """A checkpoint that is not in the released layout, or does not fit the model it implies."""


def unwrap(state: dict) -> dict:
    """Keys without DDP's and activation checkpointing's prefixes."""
    out = {}
    for key, value in state.items():
        for wrapper in WRAPPERS:
            key = key.replace(wrapper, "")
        out[key] = value
    return out


# Grounding DINO's head: a branch per decoder layer, then the encoder's (index = layers)
HEAD = r"bbox_head\.(cls_branches\.(\d+)\.bias|reg_branches\.(\d+)\.([024])\.(weight|bias))$"


def _head_key(match: re.Match, layers: int) -> str | None:
    if match[2] is not None:  # a contrastive embedding: only its bias is a parameter
        index = int(match[2])
        return "enc_alignment.bias" if index == layers else f"alignment.{index}.bias"
    index, linear = int(match[3]), int(match[4]) // 2  # Linear-ReLU-Linear-ReLU-Linear
    where = "enc_bbox_head" if index == layers else f"bbox_head.{index}"
    return f"{where}.layers.{linear}.{match[5]}"


def target_key(key: str, layers: int) -> str | None:
    """Our key for a released key of a model with `layers` decoder layers, or None when no
    rule maps it."""
    head = re.match(HEAD, key)
    if head:
        return _head_key(head, layers)
    for pattern, replacement in RULES:
        match = re.match(pattern, key)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    return None


def unfold_to_patches(weight: torch.Tensor) -> torch.Tensor:
    """A patch-merging tensor ([out, 4C] reduction or [4C] norm) from mmdetection's `nn.Unfold`
    channel order (c * 4 + kh * 2 + kw) to timm's and the original Swin's (patches (0,0),
    (1,0), (0,1), (1,1) one after another, each C channels)."""
    lead = weight.shape[:-1]
    c = weight.shape[-1] // 4
    grid = weight.reshape(*lead, c, 2, 2)  # [.., C, kh, kw]
    return grid.transpose(-1, -2).reshape(*lead, c, 4).movedim(-1, -2).reshape(*lead, 4 * c)


def _count(state: dict, pattern: str) -> int:
    return len({m[1] for k in state if (m := re.match(pattern, k))})


def released_settings(state: dict, base):
    """Our model settings (a `ModelConfig`) for a released state dict: `base` (the released
    configs' values, `cq_dino_swin_b`) with what the tensors say: the Swin variant, layer
    counts, queries, widths, and the released rules where ours differ by default (the tree's
    `official` weights, pooling over padding). A stage-1 file (the backbone and the language
    model alone) gives the selector model (`cq_selector`), which stage 2's `init_from` takes."""
    try:
        embed = state["backbone.patch_embed.projection.weight"].shape[0]
        table = state["backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table"]
        labels = state["language_model.label_embed"]
    except KeyError as err:
        raise ConversionError(f"not a released CQ-DINO checkpoint: it has no {err}") from None
    window = (int(round(table.shape[0] ** 0.5)) + 1) // 2
    if (embed, window) not in SWIN_BY_SHAPE:
        raise ConversionError(
            f"a Swin of width {embed} with window {window} is not one vastdet builds "
            f"({', '.join(f'{v}: {k}' for k, v in SWIN_BY_SHAPE.items())})"
        )
    common = dict(
        backbone=SWIN_BY_SHAPE[(embed, window)],
        backbone_weights=None,
        category_embeddings=None,
        init_from=None,
        text_dim=labels.shape[1],
        category_width=state["language_model.wordvec_proj.weight"].shape[0],
        selector_layers=_count(state, r"language_model\.tagging_head\.encoder\.layer\.(\d+)\."),
        selector_ffn=state[
            "language_model.tagging_head.encoder.layer.0.intermediate.dense.weight"
        ].shape[0],
        selector_image_width=state["language_model.image_proj.weight"].shape[0],
        correlation="tree",
        tree_alpha="official",
        selector_masks_padding=False,
        selection="flat",
    )
    if "query_embedding.weight" not in state:  # stage 1: the backbone and the selector alone
        return replace(base, architecture="cq_selector", **common)
    fusion = state.get("encoder.fusion_layers.0.attn.v_proj.weight")
    return replace(
        base,
        architecture="cq_dino",
        d_model=state["query_embedding.weight"].shape[1],
        num_queries=state["query_embedding.weight"].shape[0],
        num_levels=state["level_embed"].shape[0],
        enc_layers=_count(state, r"encoder\.layers\.(\d+)\."),
        dec_layers=_count(state, r"decoder\.layers\.(\d+)\."),
        d_ffn=state["encoder.layers.0.ffn.layers.0.0.weight"].shape[0],
        fusion_dim=fusion.shape[0] if fusion is not None else base.fusion_dim,
        share_heads=False,
        dn_labels="learned",
        **common,
    )


def convert_released(checkpoint: str | os.PathLike, taxonomy, base) -> Conversion:
    """A released CQ-DINO checkpoint as our state dict for the model `released_settings` gives
    (on `base`), over `taxonomy` (the categories in the release's row order, and the tree
    for eq. 7)."""
    from vastdet.models.build import build_model
    from vastdet.runtime.weights import read_state

    state = unwrap(read_state(checkpoint))
    settings = released_settings(state, base)
    column = taxonomy.category_column()
    file_order = column[column >= 0].astype(np.int64)
    rows = state["language_model.label_embed"].shape[0]
    if rows != len(file_order):
        raise ConversionError(
            f"{checkpoint} has {rows} category rows; the taxonomy has {len(file_order)} "
            "categories (give the taxonomy the model was trained over)"
        )
    model, _, _ = build_model(settings, file_order.tolist(), taxonomy, weights_follow=True)
    own = model.state_dict()
    ascending = torch.as_tensor(np.argsort(file_order, kind="stable"))
    out = Conversion(state={}, model=settings)
    unknown, misfits = [], []
    for key, value in state.items():
        why = next((why for pattern, why in DROPPED if re.match(pattern, key)), None)
        if why is not None:
            out.dropped[key] = why
            continue
        ours = target_key(key, settings.dec_layers)
        if ours is None or ours not in own:
            unknown.append(key if ours is None else f"{key} -> {ours}")
            continue
        value = value.detach().to(own[ours].dtype)
        if ".downsample." in ours and "backbone." in ours:
            value = unfold_to_patches(value)
        elif ours == "category_queries.embedding.weight":
            value = value[ascending]
        elif ours == "dn_label_embedding.weight" and value.shape[0] > own[ours].shape[0]:
            out.dropped[f"{key}[{own[ours].shape[0]}:]"] = (
                "denoising label rows past C' (training only; queries here are labelled by slot)"
            )
            value = value[: own[ours].shape[0]]
        if value.shape != own[ours].shape:
            misfits.append(f"{key} {tuple(value.shape)} -> {ours} {tuple(own[ours].shape)}")
            continue
        out.state[ours] = value
        out.mapped[key] = ours
    unfilled = []
    for key in own:
        if key in out.state:
            continue
        why = next((why for pattern, why in KEPT if re.match(pattern, key)), None)
        if why is None:
            unfilled.append(key)
        else:
            out.kept[key] = why
            out.state[key] = own[key]
    if unknown or misfits or unfilled:
        raise ConversionError(
            f"{checkpoint} does not convert: {len(unknown)} keys no rule knows {unknown[:5]}, "
            f"{len(misfits)} with other shapes {misfits[:5]}, {len(unfilled)} of our "
            f"parameters left without a released tensor {unfilled[:5]}"
        )
    model.load_state_dict(out.state, strict=True)
    return out

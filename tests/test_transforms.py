"""Box-aware transforms keep boxes and pixels consistent."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tv_functional

from pipelines.boxes import cxcywh_to_xyxy, xywh_to_xyxy, xyxy_to_cxcywh, xyxy_to_xywh
from pipelines.transforms import (
    HorizontalFlip,
    NormalizeBoxes,
    RandomResize,
    TransformConfig,
    build_transforms,
    crop,
    decode_image_bytes,
    hwc,
    normalize_images,
    resized_shape,
)


def make(w=64, h=48, boxes=((4, 6, 20, 30), (40, 10, 60, 40))):
    image = torch.from_numpy(
        np.random.default_rng(0).integers(0, 255, size=(3, h, w), dtype=np.uint8)
    )
    b = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    target = {  # the loader's form: numpy arrays (`target_from_meta`)
        "boxes": b,
        "labels": np.arange(len(b), dtype=np.int64) + 7,
        "iscrowd": np.zeros(len(b), dtype=np.int64),
        "area": (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]),
        "image_id": 1,
    }
    return image, target


def test_box_conversions_round_trip():
    b = torch.tensor([[1.0, 2.0, 5.0, 9.0]])
    torch.testing.assert_close(xywh_to_xyxy(xyxy_to_xywh(b)), b)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(b)), b)
    torch.testing.assert_close(xyxy_to_cxcywh(b), torch.tensor([[3.0, 5.5, 4.0, 7.0]]))


def test_box_conversions_agree_bitwise_on_tensors_and_numpy():
    b = torch.rand(50, 4, generator=torch.Generator().manual_seed(0)) * 640
    for convert in (xywh_to_xyxy, xyxy_to_xywh, xyxy_to_cxcywh, cxcywh_to_xyxy):
        in_numpy = convert(b.numpy())
        assert in_numpy.dtype == np.float32
        assert torch.equal(torch.from_numpy(in_numpy), convert(b))


def test_flip_twice_is_the_identity():
    image, target = make()
    flip = HorizontalFlip(p=1.0)
    once_img, once = flip(image, target, random.Random(0))
    assert once["boxes"][0].tolist() == [64 - 20, 6, 64 - 4, 30]
    assert torch.equal(once_img[:, :, 0], image[:, :, -1])
    twice_img, twice = flip(once_img, once, random.Random(0))
    assert torch.equal(twice_img, image)
    assert np.array_equal(twice["boxes"], target["boxes"]) and twice["boxes"].dtype == np.float32


def test_crop_clips_partial_boxes_and_drops_boxes_fully_outside():
    image, target = make()
    out_img, out = crop(image, target, x0=30, y0=0, w=34, h=48)
    assert tuple(out_img.shape) == (3, 48, 34) and torch.equal(out_img, image[:, :, 30:])
    # box 0 (x 4..20) lies left of the crop: dropped; box 1 (x 40..60) shifted by 30
    assert out["labels"].tolist() == [8]
    assert out["boxes"].tolist() == [[10, 10, 30, 40]]
    # a box straddling the edge is clipped to it
    _, part = crop(image, target, x0=10, y0=0, w=20, h=48)
    assert part["boxes"][0].tolist() == [0, 6, 10, 30] and part["labels"].tolist() == [7]
    assert part["area"][0].item() == 10 * 24


def test_resize_scales_boxes_and_respects_max_size():
    assert resized_shape(640, 480, 800, 1333) == (1067, 800)
    assert resized_shape(2000, 500, 800, 1333) == (
        1332,
        333,
    )  # short side round(333.25), long <= cap
    image, target = make()
    out_img, out = RandomResize([96])(image, target, random.Random(0))
    assert tuple(out_img.shape) == (3, 96, 128)
    np.testing.assert_allclose(out["boxes"], target["boxes"] * 2)
    np.testing.assert_allclose(out["area"], target["area"] * 4)
    assert out["boxes"].dtype == out["area"].dtype == np.float32


def test_normalize_boxes_gives_normalised_cxcywh_and_size():
    image, target = make()
    same, out = NormalizeBoxes()(image, target)
    assert same is image and out["size"].tolist() == [48, 64]
    np.testing.assert_allclose(out["boxes"][0], [12 / 64, 18 / 48, 16 / 64, 24 / 48], rtol=1e-6)
    scale = torch.tensor([64, 48, 64, 48], dtype=torch.float32)
    assert out["boxes"].dtype == np.float32
    assert torch.equal(  # as torch would compute it
        torch.from_numpy(out["boxes"]), xyxy_to_cxcywh(torch.from_numpy(target["boxes"])) / scale
    )


def test_decoder_reads_jpeg_and_png_like_pil(tmp_path):
    import io

    pixels = np.random.default_rng(1).integers(0, 255, size=(20, 30, 3), dtype=np.uint8)
    png, jpg = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    Image.fromarray(pixels).convert("L").save(jpg, format="JPEG")  # greyscale becomes RGB
    assert torch.equal(
        decode_image_bytes(png.getvalue()), torch.from_numpy(pixels).permute(2, 0, 1)
    )
    grey = decode_image_bytes(jpg.getvalue())
    assert grey.shape == (3, 20, 30) and torch.equal(grey[0], grey[2])
    with pytest.raises(RuntimeError):
        decode_image_bytes(jpg.getvalue()[:30])


def test_normalize_images_matches_the_per_channel_formula():
    images = torch.tensor(
        [[[[0, 255]], [[51, 102]], [[255, 0]]]], dtype=torch.uint8
    )  # [1, 3, 1, 2]
    out = normalize_images(images, mean=(0.5, 0.2, 0.0), std=(0.5, 0.1, 1.0))
    expected = torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]], [[1.0, 0.0]]]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("seed", range(5))
def test_training_recipe_keeps_boxes_inside_and_labels_aligned(seed):
    cfg = TransformConfig(scales=(64, 80), max_size=128, crop_resize=(56,), crop_size=(24, 40))
    image, target = make()
    tensor, out = build_transforms(cfg, train=True)(image, target, random.Random(seed))
    assert tensor.shape[0] == 3 and max(tensor.shape[1:]) <= 128
    boxes = cxcywh_to_xyxy(out["boxes"])
    assert ((boxes >= -1e-6) & (boxes <= 1 + 1e-6)).all()
    assert set(out["labels"].tolist()) <= {7, 8} and len(out["labels"]) == len(out["boxes"])
    # every branch ends in a resize, which leaves the pixels in HWC memory (`hwc`)
    assert tensor.permute(1, 2, 0).is_contiguous()


def test_resize_of_a_crop_lays_it_out_hwc_with_the_same_pixels():
    pixels = np.random.default_rng(1).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    image = torch.from_numpy(pixels).permute(2, 0, 1)  # decoded images' layout
    _, target = make()
    cropped, target = crop(image, target, 5, 4, 40, 30)
    assert not cropped.permute(1, 2, 0).is_contiguous()  # a view with the full row pitch
    assert (
        hwc(cropped).data_ptr() != cropped.data_ptr() and hwc(image).data_ptr() == image.data_ptr()
    )
    resized, _ = RandomResize([45])(cropped, target, random.Random(0))
    assert resized.shape == (3, 45, 60) and resized.permute(1, 2, 0).is_contiguous()
    # the generic kernel, on a [3, H, W]-contiguous copy, gives the same pixels
    assert torch.equal(
        resized, tv_functional.resize(cropped.contiguous(), [45, 60], antialias=True)
    )


def test_empty_target_passes_through_every_step():
    image, target = make(boxes=())
    cfg = TransformConfig(scales=(64,), max_size=128, crop_resize=(56,), crop_size=(24, 40))
    for seed in range(4):
        tensor, out = build_transforms(cfg, train=True)(image, target, random.Random(seed))
        assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)

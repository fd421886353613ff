"""Box-aware image transforms on uint8 tensors: the DETR/DINO recipe, sized by configuration.

A transform is called as `t(image, target, rng)`: `image` a uint8 tensor [3, H, W] (from
`decode_image_bytes`), `target` a dict of numpy arrays (`target_from_meta`'s): `boxes` (float32
[N, 4], xyxy in pixels), `labels` ([N] int64 category ids), `iscrowd`, `area`, and `rng` a
`random.Random` (each loader worker owns one, seeded from the run seed, the rank and the worker
id, so augmentation is reproducible). Box arithmetic stays in numpy: an image has a handful of
boxes, and for arrays that small a torch op's fixed cost is several times numpy's; the loader
makes the target tensors once per batch, on the trainer's side. Crops of the image are views, a
flip is a copy; resizing is torchvision's antialiased bilinear on uint8 with the pixels in HWC
memory (`hwc`), about four times PIL's speed here (523 x 514 to 800 x 1066: 2.1 ms, PIL's
bilinear 7.8 ms). The last step, `NormalizeBoxes`, turns boxes into normalised `cxcywh`; pixels
stay uint8 through the loader and `normalize_images` makes model input on the device.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from pipelines.boxes import box_area_xyxy, xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PER_BOX_KEYS = ("boxes", "labels", "iscrowd", "area")
_MIRROR = np.array([-1, 1, -1, 1], dtype=np.float32)

try:  # torchvision's decoding op, called directly: its Python wrapper warns (deprecated in
    # 0.29) and logs on every call, which cost 0.14 ms an image here
    import torchvision.io  # noqa: F401 - registers torch.ops.image
    from torchvision.io import ImageReadMode

    _tv_decode = torch.ops.image.decode_image
    _RGB = ImageReadMode.RGB.value
except (ImportError, AttributeError, RuntimeError):  # a torchvision without image decoding
    _tv_decode = None


def decode_image_bytes(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 RGB tensor [3, H, W]; raises on corrupt data.

    torchvision's decoder (libjpeg-turbo) is faster than PIL here and writes the tensor
    directly; its [3, H, W] result is HWC in memory. torchvision 0.29 deprecates it in favour
    of TorchCodec; where it is gone, PIL decodes instead (same pixels on the files tested here).
    """
    if _tv_decode is None:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
            return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    # a writable copy of the (small, compressed) bytes: torch warns on read-only buffers
    return _tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), _RGB, False)


def normalize_images(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 images [..., 3, H, W] -> float, scaled to [0, 1] and normalised per channel, on
    the images' own device."""
    m = torch.tensor(mean, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - m) / s


def _keep(target: dict, keep: np.ndarray) -> dict:
    return {k: (v[keep] if k in PER_BOX_KEYS else v) for k, v in target.items()}


def hwc(image: torch.Tensor) -> torch.Tensor:
    """The [3, H, W] image with its pixels in HWC memory, the layout decoded images have.

    torch's uint8 resize has a vectorised kernel only for this layout, and `fill_batch` copies
    HWC rows into the batch; a crop is a view with the full image's row pitch, on which the
    resize falls back to a generic kernel (2.3 times slower on a 490 x 580 crop) and returns
    [3, H, W]-contiguous pixels, which the batch copy must then transpose. Same pixels
    either way."""
    pixels = image.permute(1, 2, 0)
    return image if pixels.is_contiguous() else pixels.contiguous().permute(2, 0, 1)


class Compose:
    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng: random.Random):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target


class HorizontalFlip:
    """Flip with probability `p`; box x-coordinates mirror around the image width."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict, rng: random.Random):
        if rng.random() >= self.p:
            return image, target
        w = image.shape[-1]
        # (w - x1, y0, w - x0, y1): mirrored, and the corners swapped to keep x0 <= x1
        flipped = target["boxes"][:, [2, 1, 0, 3]] * _MIRROR + np.array([w, 0, w, 0], np.float32)
        return image.flip(-1), {**target, "boxes": flipped}


def resized_shape(width: int, height: int, short: int, max_size: int | None) -> tuple[int, int]:
    """(w, h) with the short side `short`, the long side capped at `max_size` (DETR's rule)."""
    lo, hi = min(width, height), max(width, height)
    if max_size is not None and hi / lo * short > max_size:
        short = int(round(max_size * lo / hi))
    if width <= height:
        return short, int(round(short * height / width))
    return int(round(short * width / height)), short


class RandomResize:
    """Resize so the short side is one of `sizes` (chosen at random), long side <= `max_size`."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: torch.Tensor, target: dict, rng: random.Random):
        height, width = image.shape[-2:]
        w, h = resized_shape(width, height, rng.choice(self.sizes), self.max_size)
        sx, sy = w / width, h / height
        scale = np.array([sx, sy, sx, sy], dtype=np.float32)
        target = {**target, "boxes": target["boxes"] * scale, "area": target["area"] * sx * sy}
        return F.resize(hwc(image), [h, w], antialias=True), target


class RandomSizeCrop:
    """Crop a random region with sides in [min_size, max_size]; boxes are clipped to it and
    boxes left with no area (entirely outside) are dropped."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: torch.Tensor, target: dict, rng: random.Random):
        height, width = image.shape[-2:]
        cw = rng.randint(min(self.min_size, width), min(width, self.max_size))
        ch = rng.randint(min(self.min_size, height), min(height, self.max_size))
        x0, y0 = rng.randint(0, width - cw), rng.randint(0, height - ch)
        return crop(image, target, x0, y0, cw, ch)


def crop(image: torch.Tensor, target: dict, x0: int, y0: int, w: int, h: int):
    """Crop to the region (x0, y0, w, h); clip boxes, drop those with no area left."""
    boxes = target["boxes"] - np.array([x0, y0, x0, y0], dtype=np.float32)
    boxes = np.minimum(boxes.clip(min=0), np.array([w, h, w, h], dtype=np.float32))
    keep = box_area_xyxy(boxes) > 0
    target = _keep({**target, "boxes": boxes, "area": box_area_xyxy(boxes)}, keep)
    return image[:, y0 : y0 + h, x0 : x0 + w], target


class RandomChoice:
    """Apply one of the transforms, chosen uniformly (DETR's RandomSelect generalised)."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng: random.Random):
        return rng.choice(self.transforms)(image, target, rng)


class NormalizeBoxes:
    """Boxes -> normalised cxcywh in [0, 1]; records the image `size` (h, w)."""

    def __call__(self, image: torch.Tensor, target: dict, rng: random.Random | None = None):
        h, w = image.shape[-2:]
        scale = np.array([w, h, w, h], dtype=np.float32)
        boxes = xyxy_to_cxcywh(target["boxes"]) / scale
        return image, {**target, "boxes": boxes, "size": np.array([h, w], dtype=np.int64)}


POSITIVE = {"min": 1}  # the config loader's lower bound (vastdet.config.at_least)


@dataclass(frozen=True)
class TransformConfig:
    """Augmentation settings; the defaults are DINO's COCO recipe."""

    scales: tuple[int, ...] = field(default=tuple(range(480, 801, 32)), metadata=POSITIVE)
    max_size: int = field(default=1333, metadata=POSITIVE)
    crop_resize: tuple[int, ...] = field(default=(400, 500, 600), metadata=POSITIVE)  # () no crop
    crop_size: tuple[int, int] = field(default=(384, 600), metadata=POSITIVE)
    flip_prob: float = field(default=0.5, metadata={"min": 0.0})
    eval_size: int = field(default=800, metadata=POSITIVE)


def build_transforms(cfg: TransformConfig, train: bool) -> Compose:
    """Training: flip, then either a multi-scale resize or resize -> random crop -> resize.
    Evaluation: a single resize to `eval_size` (long side <= max_size)."""
    if not train:
        return Compose([RandomResize([cfg.eval_size], cfg.max_size), NormalizeBoxes()])
    resize = RandomResize(cfg.scales, cfg.max_size)
    steps = [HorizontalFlip(cfg.flip_prob)]
    if cfg.crop_resize:
        cropped = Compose([RandomResize(cfg.crop_resize), RandomSizeCrop(*cfg.crop_size), resize])
        steps.append(RandomChoice([resize, cropped]))
    else:
        steps.append(resize)
    return Compose([*steps, NormalizeBoxes()])


def no_augmentation() -> Compose:
    """Only `NormalizeBoxes`: the image keeps its size, boxes are exactly the annotations'."""
    return Compose([NormalizeBoxes()])

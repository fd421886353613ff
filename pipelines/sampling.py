"""Repeat-factor sampling for the long tail (LVIS, Gupta et al. 2019), applied in the stream.

Category c appears in a fraction f_c of the training images; its repeat factor is
`r_c = max(1, sqrt(t / f_c))` with threshold t (V3Det's baseline uses t = 1e-3). An image's
factor is the largest over the categories it contains (1 for an image without annotations).
In the stream, an image is emitted floor(r) times plus once more with probability r - floor(r),
so its expected count is exactly r.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping

DEFAULT_THRESHOLD = 1e-3


def category_repeat_factors(
    category_images: Mapping[int, int], num_images: int, threshold: float
) -> dict[int, float]:
    """r_c = max(1, sqrt(t / f_c)), f_c = images containing c / all images."""
    if num_images <= 0:
        raise ValueError("repeat factors need at least one training image")
    return {
        c: max(1.0, math.sqrt(threshold / (n / num_images)))
        for c, n in category_images.items()
        if n > 0
    }


def image_repeat_factor(category_ids: Iterable[int], factors: Mapping[int, float]) -> float:
    return max((factors.get(c, 1.0) for c in category_ids), default=1.0)


def stochastic_repeats(factor: float, rng: random.Random) -> int:
    whole = math.floor(factor)
    return whole + (1 if rng.random() < factor - whole else 0)


def repeat_stream(
    samples: Iterable[dict], factors: Mapping[int, float], rng: random.Random
) -> Iterator[dict]:
    """Emit each parsed sample as many times as its stochastic repeat count."""
    for sample in samples:
        cats = [a["category_id"] for a in sample["meta"]["annotations"]]
        for _ in range(stochastic_repeats(image_repeat_factor(cats, factors), rng)):
            yield sample

"""The synthetic vast-vocabulary dataset: determinism, inherited looks, exact boxes, long tail."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.annotations import ImageRecord
from pipelines.synthetic import (
    SynthConfig,
    SyntheticRenderer,
    appearances,
    category_weights,
    make_records,
    write_coco,
)
from taxonomy import Node, Taxonomy


@pytest.fixture(scope="module")
def tree() -> Taxonomy:
    """root > {animal > {cat, dog, fox}, vehicle > {car, bus}}, every node a category."""
    nodes = [
        Node("root", "root", category_id=1),
        Node("animal", "animal", ("root",), 2),
        Node("vehicle", "vehicle", ("root",), 3),
    ]
    nodes += [Node(n, n, ("animal",), 4 + k) for k, n in enumerate(["cat", "dog", "fox"])]
    nodes += [Node(n, n, ("vehicle",), 7 + k) for k, n in enumerate(["car", "bus"])]
    return Taxonomy(nodes)


def test_layout_and_pixels_are_deterministic_by_seed(tree):
    cfg = SynthConfig(num_train=6, num_val=2, min_side=32, max_side=48, seed=9)
    a, b = make_records(tree, cfg), make_records(tree, cfg)
    assert [r.sample_json() for r in a["train"]] == [r.sample_json() for r in b["train"]]
    assert {r.image_id for r in a["train"]}.isdisjoint(r.image_id for r in a["val"])
    renderer = SyntheticRenderer(tree, cfg)
    assert renderer(a["val"][0]) == SyntheticRenderer(tree, cfg)(b["val"][0])
    other = make_records(
        tree, SynthConfig(num_train=6, num_val=2, min_side=32, max_side=48, seed=10)
    )
    assert [r.sample_json() for r in other["train"]] != [r.sample_json() for r in a["train"]]


def test_coco_files_are_the_same_rendered_in_one_or_two_processes(tree, tmp_path, monkeypatch):
    import pipelines.synthetic

    monkeypatch.setattr(pipelines.synthetic, "RENDER_CHUNK", 3)  # several jobs per split
    cfg = SynthConfig(num_train=8, num_val=3, min_side=32, max_side=48, seed=4)
    one = write_coco(tree, cfg, tmp_path / "one", workers=1)
    two = write_coco(tree, cfg, tmp_path / "two", workers=2)
    for split in ("train", "val"):
        assert one[split].read_text() == two[split].read_text()
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.jpg"))
    assert len(files) == 11
    renderer = SyntheticRenderer(tree, cfg)
    by_name = {r.file_name: r for rs in make_records(tree, cfg).values() for r in rs}
    for rel in files:
        data = (tmp_path / "two" / rel).read_bytes()
        assert data == (tmp_path / "one" / rel).read_bytes()
        assert data == renderer(by_name[rel.relative_to("images").as_posix()])


def test_siblings_share_inherited_features_and_differ_in_their_own(tree):
    look = appearances(tree)
    cat, dog, fox = look[4], look[5], look[6]
    assert cat.shape == dog.shape == fox.shape and cat.hue == dog.hue == fox.hue
    own = lambda a: (a.pattern, a.orientation, round(a.aspect, 6))  # noqa: E731
    assert len({own(cat), own(dog), own(fox)}) == 3
    assert look[7].hue == look[8].hue  # car and bus share the vehicle family colour


def test_boxes_are_exact(tree):
    cfg = SynthConfig(min_side=64, max_side=64, seed=1)
    renderer = SyntheticRenderer(tree, cfg)
    for cat in range(1, 9):
        box = [7, 11, 30, 21]
        with_obj = ImageRecord(5, "x.jpg", 64, 64, [{"bbox": box, "category_id": cat}])
        without = ImageRecord(5, "x.jpg", 64, 64, [])
        diff = np.abs(
            np.asarray(renderer.image(with_obj), np.int32)
            - np.asarray(renderer.image(without), np.int32)
        )
        ys, xs = np.nonzero(diff.sum(axis=2))
        assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == box, cat


def test_long_tail_follows_zipf_or_a_given_histogram(tree):
    cfg = SynthConfig(num_train=400, num_val=0, max_objects=3, min_side=32, max_side=32, seed=0)
    weights = category_weights(list(range(1, 9)), cfg)
    assert weights.max() / weights.min() == pytest.approx(8**1.1)
    hist = {4: 90, 5: 10, 6: 0}
    records = make_records(tree, cfg, histogram=hist)["train"]
    counts = {}
    for r in records:
        for a in r.annotations:
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    assert set(counts) == {4, 5}  # categories with no frequency never appear
    assert counts[4] / (counts[4] + counts[5]) == pytest.approx(0.9, abs=0.05)


def test_boxes_lie_inside_their_images(tree):
    cfg = SynthConfig(num_train=50, num_val=0, min_side=40, max_side=90, seed=4)
    for r in make_records(tree, cfg)["train"]:
        assert 1 <= len(r.annotations) <= cfg.max_objects
        for a in r.annotations:
            x, y, w, h = a["bbox"]
            assert (
                x >= 0 and y >= 0 and w >= 4 and h >= 4 and x + w <= r.width and y + h <= r.height
            )


def test_full_colour_jpegs_keep_a_small_objects_texture(tree):
    """4:4:4 chroma keeps the accent colour of a fine texture that 4:2:0 (the default) blurs:
    the decoded pixels of every object stay closer to the rendered ones, and the file says
    4:4:4 (Pillow's sampling code 0; 4:2:0 is 2)."""
    import io

    from PIL import Image, JpegImagePlugin

    base = dict(num_train=12, num_val=0, min_side=128, max_side=160, max_objects=3, seed=1)
    layout = make_records(tree, SynthConfig(**base))["train"]
    errors, sampling = {}, {}
    for mode in ("4:2:0", "4:4:4"):
        renderer = SyntheticRenderer(tree, SynthConfig(**base, jpeg_subsampling=mode))
        total = 0.0
        for record in layout:
            raw = np.asarray(renderer.image(record), np.float64)
            decoded = Image.open(io.BytesIO(renderer(record)))
            sampling[mode] = JpegImagePlugin.get_sampling(decoded)
            pixels = np.asarray(decoded.convert("RGB"), np.float64)
            for ann in record.annotations:
                x, y, w, h = ann["bbox"]
                total += np.abs(pixels[y : y + h, x : x + w] - raw[y : y + h, x : x + w]).mean()
        errors[mode] = total
    assert sampling == {"4:2:0": 2, "4:4:4": 0}
    assert errors["4:4:4"] < 0.8 * errors["4:2:0"]
    assert SynthConfig().jpeg_subsampling == "4:2:0"  # the default keeps older data as it was
    with pytest.raises(ValueError, match="jpeg_subsampling"):
        SynthConfig(jpeg_subsampling="4:1:1")

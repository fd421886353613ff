"""COCO annotations -> checked records -> shards + manifest, and every bad-annotation case."""

from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipelines.annotations import AnnotationError, load_coco
from pipelines.shards import FileImageReader, ShardSet, plan_shards, write_shards


def write_dataset(root, anns, images=None, cats=(1, 2, 3)):
    (root / "img").mkdir(parents=True, exist_ok=True)
    images = images or [
        {"id": i, "file_name": f"img/{i}.jpg", "width": 40, "height": 30} for i in (1, 2)
    ]
    rng = np.random.default_rng(0)
    for im in images:
        if im.get("file_name", "").endswith(".jpg") and im.get("width"):
            arr = rng.integers(0, 255, size=(im["height"], im["width"], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / im["file_name"], quality=90)
    path = root / "ann.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": anns,
                "categories": [{"id": c, "name": f"c{c}"} for c in cats],
            }
        )
    )
    return path


def ann(i, image_id, bbox, cat=1):
    return {"id": i, "image_id": image_id, "bbox": bbox, "category_id": cat, "iscrowd": 0}


@pytest.mark.parametrize(
    "bad, kind",
    [
        (ann(9, 2, [1, 1, float("nan"), 3]), "non-finite box"),
        (ann(9, 2, [1, 1, 0, 3]), "zero-area box"),
        (ann(9, 2, [1, 1, 3]), "malformed box"),
        (ann(9, 2, [50, 1, 5, 5]), "box outside image"),
        (ann(9, 2, [1, 1, 5, 5], cat=77), "unknown category id"),
        (ann(9, 2, [1, 1, 5, 5], cat=True), "unknown category id"),  # a bool is not id 1
        (ann(9, 5, [1, 1, 5, 5]), "unknown image id"),
        ({**ann(9, 2, [1, 1, 5, 5]), "iscrowd": "yes"}, "malformed annotation"),
        ({**ann(9, 2, [1, 1, 5, 5]), "area": -3}, "malformed annotation"),
    ],
)
def test_each_bad_annotation_is_reported_with_file_and_image_id(tmp_path, bad, kind):
    path = write_dataset(tmp_path, [ann(1, 1, [2, 2, 10, 10]), bad])
    with pytest.raises(AnnotationError) as err:
        load_coco(path, tmp_path)
    message = str(err.value)
    assert f"{path}: image {bad['image_id']}: {kind}" in message
    records, report = load_coco(path, tmp_path, on_error="skip")
    assert report.counts() == {kind: 1}
    assert sum(len(r.annotations) for r in records) == 1


def test_missing_image_file_and_bad_image_entry(tmp_path):
    images = [
        {"id": 1, "file_name": "img/1.jpg", "width": 40, "height": 30},
        {"id": 2, "file_name": "img/nope.jpg", "width": 40, "height": 30},
        {"id": 3, "file_name": "img/3.jpg", "width": 0, "height": 30},
    ]
    path = write_dataset(tmp_path, [ann(1, 2, [1, 1, 4, 4])], images)
    (tmp_path / "img/nope.jpg").unlink()
    with pytest.raises(AnnotationError, match=r"image 2: missing image file.*img/nope.jpg"):
        load_coco(path, tmp_path)
    records, report = load_coco(path, tmp_path, on_error="skip")
    assert [r.image_id for r in records] == [1]
    assert report.counts() == {"missing image file": 1, "bad image entry": 1}


def test_box_policy_clip_and_reject(tmp_path):
    path = write_dataset(tmp_path, [ann(1, 1, [30, 20, 20, 20])])  # runs past the 40x30 image
    records, _ = load_coco(path, tmp_path, box_policy="clip")
    assert records[0].annotations[0]["bbox"] == [30, 20, 10, 10]
    with pytest.raises(AnnotationError, match="box outside image.*exceeds the 40x30 image"):
        load_coco(path, tmp_path, box_policy="reject")


def test_plan_shards_by_count_and_bytes():
    assert [list(r) for r in plan_shards(None, 5, 2, 10**9)] == [[0, 1], [2, 3], [4]]
    assert [list(r) for r in plan_shards([4, 4, 4, 9, 1], 5, 10, 8)] == [[0, 1], [2], [3], [4]]


def test_shards_copy_bytes_and_manifest_is_right(tmp_path):
    anns = [ann(1, 1, [2, 2, 10, 10], 1), ann(2, 1, [5, 5, 3, 3], 2), ann(3, 2, [0, 0, 4, 4], 1)]
    path = write_dataset(tmp_path, anns)
    records, report = load_coco(path, tmp_path)
    out = tmp_path / "shards"
    manifest = write_shards(
        records,
        FileImageReader(tmp_path),
        out,
        max_samples=1,
        workers=2,
        source=str(path),
        categories_file=path,
        progress=False,
    )
    assert [s["samples"] for s in manifest["shards"]] == [1, 1]
    assert manifest["category_instances"] == {"1": 2, "2": 1}
    assert manifest["category_images"] == {"1": 2, "2": 1}
    shards = ShardSet.open(out)
    assert shards.verify() == []
    for s in manifest["shards"]:
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    with tarfile.open(out / manifest["shards"][0]["name"]) as tar:
        names = tar.getnames()
        assert names == ["000000000001.jpg", "000000000001.json"]
        assert tar.extractfile(names[0]).read() == (tmp_path / "img/1.jpg").read_bytes()
    # a plain webdataset reads them back with keys and json intact
    samples = list(wds.WebDataset(shards.urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ["000000000001", "000000000002"]
    assert json.loads(samples[0]["json"])["annotations"][1]["bbox"] == [5, 5, 3, 3]
    # the same input writes byte-identical shards
    again = write_shards(
        records,
        FileImageReader(tmp_path),
        tmp_path / "again",
        max_samples=1,
        workers=1,
        progress=False,
    )
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_tampered_shard_is_detected(tmp_path):
    path = write_dataset(tmp_path, [ann(1, 1, [2, 2, 10, 10])])
    records, _ = load_coco(path, tmp_path)
    manifest = write_shards(records, FileImageReader(tmp_path), tmp_path / "s", progress=False)
    shard = tmp_path / "s" / manifest["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ShardSet.open(tmp_path / "s").verify() == [shard.name]


def test_non_image_file_is_refused_when_writing(tmp_path):
    path = write_dataset(tmp_path, [])
    (tmp_path / "img/1.jpg").write_bytes(b"GIF89a not a jpeg")
    records, _ = load_coco(path, tmp_path)
    with pytest.raises(ValueError, match="1.jpg: image 1: .*neither JPEG nor PNG"):
        write_shards(records, FileImageReader(tmp_path), tmp_path / "s", workers=1, progress=False)


@pytest.mark.parametrize(
    "change, kind",
    [
        (
            lambda root: (root / "img/2.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(99)),
            "undecodable image",
        ),
        (lambda root: Image.new("RGB", (30, 40)).save(root / "img/2.jpg"), "image size mismatch"),
    ],
)
def test_images_that_do_not_decode_or_fit_their_entry_are_refused_or_counted(
    tmp_path, change, kind
):
    """A JPEG that passes the magic-byte check but does not decode, or whose size is not the
    annotation file's (its boxes were checked against that size), stops the writing naming the
    image, or with on_error='skip' is left out and counted."""
    path = write_dataset(tmp_path, [ann(1, 1, [2, 2, 10, 10]), ann(2, 2, [2, 2, 5, 5], 2)])
    change(tmp_path)
    records, report = load_coco(path, tmp_path)
    with pytest.raises(AnnotationError, match=rf"img/2.jpg: image 2: {kind}"):
        write_shards(records, FileImageReader(tmp_path), tmp_path / "s", workers=1, progress=False)
    manifest = write_shards(
        records, FileImageReader(tmp_path), tmp_path / "k", workers=1, progress=False,
        check_report=report, on_error="skip",
    )  # fmt: skip
    assert manifest["num_samples"] == 1 and manifest["category_images"] == {"1": 1}
    assert manifest["skipped"] == {kind: 1}


def test_lvis_images_keep_their_federated_lists_through_shards_and_loader(tmp_path):
    """LVIS v1 names images by `coco_url` (no file_name) and gives each its federated lists:
    they resolve under the COCO image root, stay in the shard json (ids outside the vocabulary
    dropped), and reach the loader's targets; a malformed list is a bad image entry."""
    from pipelines.loader import target_from_meta

    images = [
        {
            "id": 1, "width": 40, "height": 30,
            "coco_url": "http://images.cocodataset.org/val2017/000000000001.jpg",
            "neg_category_ids": [3, 2, 99], "not_exhaustive_category_ids": [1],
        },
        {
            "id": 2, "width": 40, "height": 30, "file_name": "img/2.jpg",
            "neg_category_ids": "none", "not_exhaustive_category_ids": [],
        },
    ]  # fmt: skip
    (tmp_path / "val2017").mkdir()
    for name in ("val2017/000000000001.jpg", "img/2.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 30)).save(tmp_path / name)
    path = write_dataset(tmp_path, [ann(1, 1, [2, 2, 10, 10], 1)], images=images)
    records, report = load_coco(path, tmp_path, on_error="skip")
    assert [r.file_name for r in records] == ["val2017/000000000001.jpg"]
    assert [(p.image_id, p.kind) for p in report.problems] == [(2, "bad image entry")]
    meta = records[0].sample_json()
    assert meta["neg_category_ids"] == [2, 3] and meta["not_exhaustive_category_ids"] == [1]
    write_shards(records, FileImageReader(tmp_path), tmp_path / "s", max_samples=5, progress=False)
    shards = ShardSet.open(tmp_path / "s")
    sample = next(iter(wds.WebDataset(shards.urls, shardshuffle=False, empty_check=False)))
    target = target_from_meta(json.loads(sample["json"]))
    assert target["neg_category_ids"] == [2, 3] and target["not_exhaustive_category_ids"] == [1]
    # COCO files are as before: no federated keys appear
    plain = write_dataset(tmp_path, [ann(1, 1, [2, 2, 10, 10], 1)])
    assert set(load_coco(plain, tmp_path)[0][0].sample_json()) == {
        "image_id", "file_name", "width", "height", "annotations",
    }  # fmt: skip

"""Streaming loaders: exact round trip, equal batches per rank, exact evaluation pass, skips."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.annotations import load_coco
from pipelines.boxes import cxcywh_to_xyxy
from pipelines.loader import (
    IMAGES_PER_ITEM,
    PREFETCH_ITEMS,
    _Stages,
    eval_loader,
    train_loader,
)
from pipelines.shards import MANIFEST, FileImageReader, ShardSet, write_shards
from pipelines.synthetic import SynthConfig, SyntheticRenderer, make_records, write_coco
from pipelines.tarstream import tar_samples
from pipelines.transforms import (
    TransformConfig,
    build_transforms,
    decode_image_bytes,
    no_augmentation,
)
from taxonomy import Node, Taxonomy

TINY = SynthConfig(num_train=17, num_val=0, min_side=40, max_side=64, max_objects=3, seed=5)


@pytest.fixture(scope="module")
def tiny_taxonomy() -> Taxonomy:
    return Taxonomy(
        [Node("r", "root", category_id=1)]
        + [Node(f"n{i}", f"cat {i}", ("r",), i) for i in range(2, 9)]
    )


@pytest.fixture(scope="module")
def uneven_shards(tiny_taxonomy, tmp_path_factory):
    """17 images in shards of 10, 2 and 5 samples."""
    out = tmp_path_factory.mktemp("uneven")
    records = make_records(tiny_taxonomy, TINY)["train"]
    renderer = SyntheticRenderer(tiny_taxonomy, TINY)
    parts = [records[:10], records[10:12], records[12:]]
    entries = []
    for k, part in enumerate(parts):
        manifest = write_shards(
            part, renderer, out / f"p{k}", prefix=f"part{k}", max_samples=100, progress=False
        )
        (out / f"p{k}" / manifest["shards"][0]["name"]).rename(out / manifest["shards"][0]["name"])
        entries.append(manifest["shards"][0])
    full = write_shards(records[:1], renderer, out / "tmp", progress=False)  # a manifest to extend
    full.update(
        shards=entries,
        num_samples=len(records),
        category_images={str(k): v for k, v in _images_per_category(records).items()},
    )
    (out / MANIFEST).write_text(json.dumps(full))
    return ShardSet.open(out), records


def _images_per_category(records):
    counts = {}
    for r in records:
        for c in {a["category_id"] for a in r.annotations}:
            counts[c] = counts.get(c, 0) + 1
    return counts


def test_coco_to_shards_to_loader_returns_every_box_exactly(tiny_taxonomy, tmp_path):
    cfg = SynthConfig(num_train=9, num_val=0, min_side=40, max_side=64, max_objects=4, seed=2)
    paths = write_coco(tiny_taxonomy, cfg, tmp_path / "coco")
    records, _ = load_coco(paths["train"], tmp_path / "coco" / "images")
    write_shards(
        records,
        FileImageReader(tmp_path / "coco" / "images"),
        tmp_path / "shards",
        max_samples=4,
        progress=False,
    )
    expected = {r.image_id: r for r in records}
    seen = set()
    for batch in eval_loader(
        tmp_path / "shards", batch_size=3, transforms=no_augmentation(), num_workers=2
    ):
        for k, target in enumerate(batch.targets):
            record = expected[target["image_id"]]
            h, w = target["size"].tolist()
            assert (h, w) == (record.height, record.width)
            boxes = cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h])
            want = torch.tensor(
                [
                    [x, y, x + bw, y + bh]
                    for x, y, bw, bh in (a["bbox"] for a in record.annotations)
                ],
                dtype=torch.float32,
            ).reshape(-1, 4)
            torch.testing.assert_close(boxes, want, atol=1e-4, rtol=0)
            assert target["labels"].tolist() == [a["category_id"] for a in record.annotations]
            # pixels are the original file's, decoded; the mask marks only the padding
            original = np.array(
                Image.open(tmp_path / "coco" / "images" / record.file_name).convert("RGB")
            )
            assert torch.equal(
                batch.images[k, :, :h, :w], torch.from_numpy(original).permute(2, 0, 1)
            )
            assert (
                not batch.masks[k, :h, :w].any()
                and batch.masks[k].sum() == batch.masks[k].numel() - h * w
            )
            seen.add(target["image_id"])
    assert seen == set(expected)


def test_two_ranks_over_uneven_shards_get_equal_batch_counts(uneven_shards):
    shards, _ = uneven_shards
    cfg = TransformConfig(scales=(48, 56), max_size=80, crop_resize=(40,), crop_size=(24, 36))
    streams = []
    for rank in (0, 1):
        loader = train_loader(
            shards,
            batch_size=2,
            batches_per_epoch=7,
            transforms=build_transforms(cfg, True),
            seed=1,
            shuffle_buffer=8,
            num_workers=2,
            rank=rank,
            world_size=2,
        )
        batches = list(loader)
        assert len(batches) == 7 and all(len(b) == 2 for b in batches)
        streams.append([t["image_id"] for b in batches for t in b.targets])
    assert streams[0] != streams[1]  # each rank draws its own stream


def test_aspect_grouping_batches_orientations_apart_in_stream_order():
    """Hand-worked: landscape (L) and portrait (P) images fill separate batches, each in
    arrival order; a full batch goes out when the next sample arrives; at the end of a
    partial pass the unfinished groups go out too."""
    sizes = {0: (30, 50), 1: (60, 40), 2: (40, 60), 3: (32, 32), 4: (50, 20), 5: (45, 44)}
    order = [0, 1, 2, 3, 4, 5]  # L P L L(square) P P

    def run(group):
        stages = _Stages(transforms=None, seed=0, rank=0)
        samples = [(torch.zeros(3, *sizes[i], dtype=torch.uint8), {"image_id": i}) for i in order]
        items = stages.batches(iter(samples), 2, partial=True, group_by_aspect=group)
        return [([t["image_id"] for t in p.targets], p.shape) for item in items for p in item]

    assert run(True) == [
        ([0, 2], (2, 40, 60, 3)),
        ([1, 4], (2, 60, 40, 3)),
        ([3], (1, 32, 32, 3)),
        ([5], (1, 45, 44, 3)),
    ]
    assert [ids for ids, _ in run(False)] == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("group", [True, False])
def test_training_batches_group_landscape_and_portrait_images(uneven_shards, group):
    shards, _ = uneven_shards
    loader = train_loader(
        shards,
        3,
        20,
        no_augmentation(),
        shuffle_buffer=4,
        repeat_threshold=None,
        num_workers=2,
        rank=0,
        world_size=1,
        group_by_aspect=group,
    )
    pure = []
    for batch in loader:
        landscape = {bool(t["size"][1] >= t["size"][0]) for t in batch.targets}
        pure.append(len(landscape) == 1)
        h, w = batch.images.shape[-2:]
        assert h == max(int(t["size"][0]) for t in batch.targets)
        assert w == max(int(t["size"][1]) for t in batch.targets)
    assert len(pure) == 20
    # grouped: every batch one orientation; without grouping this stream mixes them
    assert all(pure) if group else not all(pure)


def test_training_stream_is_reproducible_from_the_seed(uneven_shards):
    shards, _ = uneven_shards

    def ids(seed):
        loader = train_loader(
            shards,
            2,
            4,
            no_augmentation(),
            seed=seed,
            shuffle_buffer=4,
            num_workers=2,
            rank=0,
            world_size=1,
        )
        return [t["image_id"] for b in loader for t in b.targets]

    assert ids(3) == ids(3)
    assert ids(3) != ids(4)


@pytest.mark.parametrize("world, workers", [(2, 2), (3, 0), (3, 2), (5, 1)])
def test_eval_loader_visits_each_image_once_with_equal_batches(uneven_shards, world, workers):
    shards, records = uneven_shards
    seen, counts = [], []
    for rank in range(world):
        batches = list(
            eval_loader(
                shards,
                batch_size=2,
                transforms=no_augmentation(),
                num_workers=workers,
                rank=rank,
                world_size=world,
            )
        )
        counts.append(len(batches))
        for b in batches:
            if b.empty:
                assert len(b) == 0 and b.targets[0]["image_id"] == -1
            else:
                seen += [t["image_id"] for t in b.targets]
    assert len(set(counts)) == 1, counts
    assert sorted(seen) == sorted(r.image_id for r in records)


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_image_and_bad_json_are_skipped_and_counted(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(good, format="JPEG")

    def meta(image_id, anns):
        return json.dumps(
            {"image_id": image_id, "width": 32, "height": 24, "annotations": anns}
        ).encode()

    box = [{"bbox": [2, 2, 10, 10], "category_id": 1, "iscrowd": 0, "area": 100.0}]
    out = tmp_path / "s"
    out.mkdir()
    with tarfile.open(out / "bad-000000.tar", "w") as tar:
        _member(tar, "000000000001.jpg", good.getvalue())
        _member(tar, "000000000001.json", meta(1, box))
        _member(tar, "000000000002.jpg", good.getvalue()[:40])  # truncated JPEG
        _member(tar, "000000000002.json", meta(2, box))
        _member(tar, "000000000003.jpg", good.getvalue())
        _member(tar, "000000000003.json", b"{not json")
        _member(tar, "000000000004.jpg", good.getvalue())
        _member(tar, "000000000004.json", meta(4, []))  # no objects: still a sample
        _member(tar, "000000000005.json", meta(5, box))  # its image member is missing
    manifest = {
        "format": "vastdet.shards/1",
        "num_samples": 5,
        "category_images": {"1": 2},
        "category_instances": {"1": 2},
        "num_instances": 2,
        "shards": [{"name": "bad-000000.tar", "samples": 5, "bytes": 0, "sha256": ""}],
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    loader = eval_loader(out, batch_size=2, transforms=no_augmentation(), num_workers=1)
    batches = list(loader)
    ids = [t["image_id"] for b in batches if not b.empty for t in b.targets]
    assert ids == [1, 4]
    assert loader.skipped() == {"corrupt image": 1, "bad json": 1, "incomplete sample": 1}
    assert len(batches) == 3 and batches[-1].empty  # counted from the manifest: ranks stay in step
    empty_target = batches[0].targets[1]
    assert empty_target["boxes"].shape == (0, 4)
    training = train_loader(
        out,
        2,
        3,
        no_augmentation(),
        repeat_threshold=None,
        shuffle_buffer=2,
        num_workers=1,
        rank=0,
        world_size=1,
    )
    assert len(list(training)) == 3 and training.skipped()["corrupt image"] >= 1


def _decoded_by_id(shards: ShardSet) -> dict[int, torch.Tensor]:
    out = {}
    for sample in tar_samples([{"url": u} for u in shards.urls], handler=lambda err: False):
        out[json.loads(sample["json"])["image_id"]] = decode_image_bytes(sample["jpg"])
    return out


def _check_pixels(batch, decoded):
    for k, target in enumerate(batch.targets):
        image = decoded[target["image_id"]]
        h, w = image.shape[1:]
        assert torch.equal(batch.images[k, :, :h, :w], image)
        assert not batch.images[k, :, h:].any() and not batch.images[k, :, :, w:].any()


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_kept_keep_their_pixels_and_freed_slots_are_reused(uneven_shards, workers):
    """Pixel buffers are reused once a batch is freed: a kept batch is never overwritten, a
    freed one's slot comes back (few distinct buffers over many batches), padding is zero
    although the slot held a larger image before."""
    shards, _ = uneven_shards
    decoded = _decoded_by_id(shards)

    def loader(batches):
        return train_loader(
            shards,
            3,
            batches,
            no_augmentation(),
            shuffle_buffer=4,
            repeat_threshold=None,
            num_workers=workers,
            rank=0,
            world_size=1,
        )

    kept = list(loader(12))  # every batch held: none may be written over
    assert len({b.images.data_ptr() for b in kept}) == 12
    for batch in kept:
        _check_pixels(batch, decoded)
    del kept
    pointers = []
    for batch in loader(150):  # each batch dropped before the next
        _check_pixels(batch, decoded)
        pointers.append(batch.images.data_ptr())
    # in-process: the batch held and the one being filled; a worker: the items prefetched, the
    # one being filled and the one being consumed, each of ceil(16 / 3) batches
    per_worker = (PREFETCH_ITEMS + 2) * math.ceil(IMAGES_PER_ITEM / 3)
    assert len(set(pointers)) <= (2 if workers == 0 else workers * per_worker) < 150

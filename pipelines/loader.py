"""Streaming loaders over shards for distributed workers.

Training (`train_loader`): every rank and loader worker draws shards with replacement from its
own seeded stream (webdataset's `ResampledShards`), so every rank yields exactly
`batches_per_epoch` batches whatever the shard sizes: uneven counts would hang DeepSpeed's
collectives. Then: parse, repeat-factor sampling, shuffle buffer, decode, transforms, batches.

Evaluation (`eval_loader`): each image exactly once across ranks. Shards are dealt to ranks
(balanced by sample count), every rank computes from the manifest how many batches each rank
will produce, and ranks that run out first yield marked empty batches, so all ranks make the
same number of (collective) forward passes.

Corrupt images and unreadable JSON are skipped, counted by kind and warned about with the shard
and key; `loader.skipped()` gives the counts summed over workers.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds

from pipelines.annotations import (
    FEDERATED_KEYS,
    SampleError,
    UnusableDataError,
    checked_annotations,
)
from pipelines.boxes import xywh_to_xyxy
from pipelines.buffers import BufferPool, SlotViews, pipe_sender, uint8_view
from pipelines.sampling import DEFAULT_THRESHOLD, category_repeat_factors, repeat_stream
from pipelines.shards import ShardSet
from pipelines.tarstream import tar_samples
from pipelines.transforms import decode_image_bytes

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "png")
# A worker sends batches in items of at least this many images: each item sent costs the
# trainer's process a fixed ~1 ms (queues, a thread hand-off, unpickling), which with small
# batches (DINO trains with 2 images per GPU) would be a large share of the loading time.
IMAGES_PER_ITEM = 16
PREFETCH_ITEMS = 2  # items each worker keeps ready (DataLoader's prefetch_factor)
# Unusable samples in a row before a training stream gives up: far more than a real dataset's
# scattered corrupt files, reached within seconds when every sample is bad.
MAX_BAD_IN_A_ROW = 200
# Niceness added to loader workers: the trainer's intra-op threads keep the cores they were
# sized for (`vastdet.engine.threads`), the workers take what is left.
WORKER_NICE = 10


@dataclass
class Batch:
    """Images padded to a common size, with their padding mask and per-image targets.

    `masks` is True on padding. Each target holds `boxes` (normalised cxcywh [N, 4]),
    `labels` (category ids [N]), `iscrowd`, `area`, `image_id`, `orig_size` and `size` (h, w).
    `empty` marks a filler batch of an evaluation pass (run it, ignore its outputs).
    """

    images: torch.Tensor  # [B, 3, H, W] uint8; `pipelines.transforms.normalize_images` on device
    masks: torch.Tensor  # [B, H, W] bool
    targets: list[dict]
    empty: bool = False
    skipped: dict = field(default_factory=dict)  # worker id -> cumulative skip counts

    def __len__(self) -> int:
        return 0 if self.empty else len(self.targets)


def rank_and_world() -> tuple[int, int]:
    """The process's rank and world size: torch.distributed if initialised, else RANK/WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_id_and_count() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# Skips of one kind logged per loader worker before they are only counted: a stream of bad
# samples must not bury the log (every sample would otherwise print a warning).
LOGGED_SKIPS = 10


class SkipCounter:
    """Per-worker counts of skipped samples; travels to the main process attached to batches.

    `max_in_a_row` bounds the unusable samples in a row at one stage (None: no bound): a
    resampled training stream over shards whose every image is corrupt would otherwise skip
    forever. Each stage (`parse`, `decode`) keeps its own run, ended by a sample it passes."""

    def __init__(self, max_in_a_row: int | None = None):
        self.counts: Counter[str] = Counter()
        self.max_in_a_row = max_in_a_row
        self.runs: dict[str, Counter[str]] = {}  # stage -> kind -> skips since a good sample
        self.shards: dict[str, set[str]] = {}  # stage -> where those skips came from

    def skip(self, kind: str, sample: dict, err: Exception, stage: str = "decode") -> None:
        self.counts[kind] += 1
        run = self.runs.setdefault(stage, Counter())
        run[kind] += 1
        self.shards.setdefault(stage, set()).add(str(sample.get("__url__")))
        if self.counts[kind] <= LOGGED_SKIPS:
            more = " (further skips of this kind are counted, not logged)"
            log.warning(
                "skipping %s in %s key %s: %s%s",
                kind,
                sample.get("__url__"),
                sample.get("__key__"),
                err,
                more if self.counts[kind] == LOGGED_SKIPS else "",
            )
        total = sum(run.values())
        if self.max_in_a_row is not None and total >= self.max_in_a_row:
            kinds = ", ".join(f"{k} {n}" for k, n in run.most_common())
            where = sorted(self.shards[stage])
            shards = ", ".join(where[:5]) + (" ..." if len(where) > 5 else "")
            raise UnusableDataError(
                f"{total} samples in a row were unusable ({kinds}) in {shards}: check the "
                "shards with `vastdet data inspect --verify` and the log's warnings"
            )

    def good(self, stage: str = "decode") -> None:
        """A usable sample at `stage`: its run of bad ones is over."""
        if self.runs.get(stage):
            self.runs[stage].clear()
            self.shards[stage].clear()


def batch_layout(images: Sequence[torch.Tensor]) -> tuple[tuple[int, int, int, int], int]:
    """The [B, H, W, 3] pixel shape of a batch (the largest height and width) and the bytes
    its buffer needs: the pixels, then the [B, H, W] padding mask."""
    shape = (
        len(images),
        max(img.shape[1] for img in images),
        max(img.shape[2] for img in images),
        3,
    )
    return shape, math.prod(shape) * 4 // 3


def batch_views(
    buffer: np.ndarray, shape: tuple[int, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [B, 3, H, W] uint8, masks [B, H, W] bool) over a flat uint8 batch buffer
    (sliced in numpy, which costs a fraction of torch's view ops on the trainer's side)."""
    b, h, w, _ = shape
    pixels = b * h * w * 3
    images = torch.from_numpy(buffer[:pixels].reshape(shape)).permute(0, 3, 1, 2)
    masks = torch.from_numpy(buffer[pixels : pixels + b * h * w].view(np.bool_).reshape(b, h, w))
    return images, masks


def fill_batch(
    buffer: np.ndarray, images: Sequence[torch.Tensor], shape: tuple[int, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay a batch out in a flat uint8 buffer: the [3, h, w] images padded with zeros at the
    bottom and right, then the padding mask (True on padding). Returns `batch_views`.

    Pixels are stored row-contiguously as [B, H, W, 3] (decoded images are HWC in memory, so
    each row is one copy). A reused buffer holds an earlier batch, so padding and mask are
    written in full. Numpy, not torch, slices: a batch is a few dozen slices, and torch's
    per-slice overhead was a third of the copy's time. `shape` is `batch_layout`'s."""
    b, h, w, _ = shape
    rows = buffer[: b * h * w * 3].reshape(b, h, w * 3)
    mask = buffer[b * h * w * 3 : b * h * w * 4].view(np.bool_).reshape(b, h, w)
    for i, img in enumerate(images):
        ih, iw = img.shape[1:]
        rows[i, :ih, : iw * 3] = img.permute(1, 2, 0).numpy().reshape(ih, iw * 3)
        rows[i, :ih, iw * 3 :] = 0
        rows[i, ih:] = 0
        mask[i, :ih, :iw] = False
        mask[i, :ih, iw:] = True
        mask[i, ih:] = True
    return batch_views(buffer, shape)


def collate(samples: Sequence[tuple[torch.Tensor, dict]]) -> Batch:
    """A `Batch` in fresh memory: images padded to the largest height and width (padding is
    zero) with their padding mask. The streaming loaders lay batches out the same way in
    reused buffers (`pipelines.buffers`)."""
    images = [img for img, _ in samples]
    shape, nbytes = batch_layout(images)
    pixels, masks = fill_batch(np.empty(nbytes, dtype=np.uint8), images, shape)
    return Batch(pixels, masks, [target_tensors(t) for _, t in samples])


def empty_batch(size: int = 32) -> Batch:
    """A filler batch: one blank image, no targets, `empty=True`."""
    target = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "image_id": -1,
        "iscrowd": torch.zeros(0, dtype=torch.int64),
        "area": torch.zeros(0),
        "orig_size": torch.tensor([size, size]),
        "size": torch.tensor([size, size]),
    }
    return Batch(
        torch.zeros(1, 3, size, size),
        torch.zeros(1, size, size, dtype=torch.bool),
        [target],
        empty=True,
    )


def target_from_meta(meta: dict) -> dict:
    """A sample's json -> its target as numpy arrays (boxes xyxy in pixels), the form the
    transforms take; `Batch` targets are tensors (`target_tensors`)."""
    anns = meta["annotations"]
    return {
        "boxes": xywh_to_xyxy(np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)),
        "labels": np.array([a["category_id"] for a in anns], dtype=np.int64),
        "iscrowd": np.array([a.get("iscrowd", 0) for a in anns], dtype=np.int64),
        "area": np.array([a.get("area", 0.0) for a in anns], dtype=np.float32),
        "orig_size": np.array([meta["height"], meta["width"]], dtype=np.int64),
        "image_id": meta["image_id"],
        **{k: list(meta[k]) for k in FEDERATED_KEYS if isinstance(meta.get(k), list)},
    }


def target_tensors(target: dict) -> dict:
    """A target's arrays as tensors sharing their memory; other values as they are."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in target.items()}


@dataclass
class _Packed:
    """The form a batch crosses from its producer in: pixels and mask stay in a reused slot
    (`pipelines.buffers`), whose storage travels only on the slot's first use; targets are
    numpy arrays pickled inline (each tensor sent between processes would cost a
    shared-memory segment of its own, and a batch's targets hold dozens)."""

    producer: int
    slot: int
    storage: torch.UntypedStorage | None
    retired: list[int]
    shape: tuple[int, int, int, int]  # pixels [B, H, W, 3]; the mask follows them
    nbytes: int
    targets: list[dict]
    skipped: dict


def _unpack(packed: _Packed, views: SlotViews) -> Batch:
    """Back to a `Batch` of tensors; images and masks are views of the slot."""
    buffer = views.buffer(
        packed.producer, packed.slot, packed.storage, packed.retired, packed.nbytes
    )
    images, masks = batch_views(buffer, packed.shape)
    return Batch(images, masks, [target_tensors(t) for t in packed.targets], False, packed.skipped)


class _Stages:
    """The per-sample steps, as one object so that worker processes share the skip counter."""

    def __init__(
        self,
        transforms: Callable,
        seed: int,
        rank: int,
        keep_annotations: bool = False,
        categories: Iterable[int] | None = None,
        max_bad_in_a_row: int | None = None,
    ):
        self.transforms = transforms
        self.keep_annotations = keep_annotations
        self.categories = frozenset(int(c) for c in categories) if categories is not None else None
        self.seed, self.rank = seed, rank
        self.counter = SkipCounter(max_bad_in_a_row)
        self._rng: random.Random | None = None
        self._pool: BufferPool | None = None
        self.returns: list = []  # per loader worker: the read end of its slot-return pipe

    @property
    def rng(self) -> random.Random:
        if self._rng is None:  # created inside the worker process: its own reproducible stream
            worker, _ = worker_id_and_count()
            self._rng = random.Random(hash((self.seed, self.rank, worker)))
        return self._rng

    def parse(self, samples):
        for sample in samples:
            image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
            if image_key is None or "json" not in sample:
                members = ValueError(f"members: {sorted(sample)}")
                self.counter.skip("incomplete sample", sample, members, "parse")
                continue
            try:
                meta = json.loads(sample["json"])
            except ValueError as err:
                self.counter.skip("bad json", sample, err, "parse")
                continue
            self.counter.good("parse")
            yield {
                "__url__": sample.get("__url__"),
                "__key__": sample.get("__key__"),
                "image": sample[image_key],
                "meta": meta,
            }

    def shuffle(self, samples, buffer_size: int):
        """A shuffle buffer: emit a random element once the buffer is full, then drain it."""
        buffer: list = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= buffer_size:
                k = self.rng.randrange(len(buffer))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                yield buffer.pop()
        self.rng.shuffle(buffer)
        yield from buffer

    def decode(self, samples):
        """Decoded, checked, transformed samples. A sample whose image does not decode or whose
        annotations do not fit it (`checked_annotations`: sizes, boxes, category ids) is
        skipped and counted by kind."""
        for sample in samples:
            try:
                image = decode_image_bytes(sample["image"])
            except Exception as err:  # noqa: BLE001 - decoders raise many kinds
                self.counter.skip("corrupt image", sample, err)
                continue
            meta = sample["meta"]
            try:
                annotations = checked_annotations(meta, *image.shape[1:], self.categories)
            except SampleError as err:
                self.counter.skip(err.kind, sample, err)
                continue
            self.counter.good()
            target = target_from_meta({**meta, "annotations": annotations})
            if self.keep_annotations:  # evaluation scores against the file's own boxes
                target["annotations"] = annotations
            yield self.transforms(image, target, self.rng)

    @property
    def pool(self) -> BufferPool:
        """This process's buffer pool: shared memory in a loader worker (made there, reading
        slots given back on the worker's own pipe), plain memory in-process."""
        if self._pool is None or self._pool.pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            if info is None:
                self._pool = BufferPool(shared=False)
            else:
                self._pool = BufferPool(shared=True, returns=self.returns[info.id])
        return self._pool

    @property
    def images_per_item(self) -> int:
        """Grouping only pays where batches cross processes."""
        return IMAGES_PER_ITEM if torch.utils.data.get_worker_info() is not None else 1

    def batches(self, samples, batch_size: int, partial: bool, group_by_aspect: bool = False):
        """Batches of `batch_size` (and, if `partial`, the smaller ones left at the end).

        With `group_by_aspect`, landscape (w >= h, after the transforms) and portrait images
        fill separate batches, as detectron2's and mmdetection's training loaders do: a batch
        is padded to its largest height and width, so mixing orientations pads each image
        towards a square, and padded pixels are copied here, sent to the device and computed
        on by the model.

        A full batch is sent when the next sample arrives or the stream ends, so that its skip
        counts include every sample skipped before then (at the end of an evaluation pass,
        the last ones)."""
        groups: dict[bool, list] = {}
        full: list | None = None
        packed: list[_Packed] = []
        for sample in samples:
            if full is not None:
                packed.append(self.pack(full))
                full = None
                if len(packed) * batch_size >= self.images_per_item:
                    yield packed
                    packed = []
            height, width = sample[0].shape[-2:]
            key = bool(group_by_aspect and width < height)
            groups.setdefault(key, []).append(sample)
            if len(groups[key]) == batch_size:
                full = groups.pop(key)
        if full is not None:
            packed.append(self.pack(full))
        if partial:
            packed += [self.pack(group) for group in groups.values() if group]
        if packed:
            yield packed
        elif self.counter.counts:  # no batch left to carry the last skips: report them alone
            yield [{worker_id_and_count()[0]: dict(self.counter.counts)}]

    def pack(self, samples: list[tuple[torch.Tensor, dict]]) -> _Packed:
        worker, _ = worker_id_and_count()
        images = [img for img, _ in samples]
        shape, nbytes = batch_layout(images)
        slot, storage, new, retired = self.pool.take(nbytes)
        fill_batch(uint8_view(storage, (nbytes,)).numpy(), images, shape)
        targets = [t for _, t in samples]  # numpy arrays, pickled inline
        skipped = {worker: dict(self.counter.counts)}
        return _Packed(
            worker, slot, storage if new else None, retired, shape, nbytes, targets, skipped
        )

    def tar_handler(self, err: Exception) -> bool:
        self.counter.counts["unreadable shard data"] += 1
        log.warning("skipping unreadable shard data: %s", err)
        return True


class _Loader:
    """Iterates a DataLoader over the stream, turns packed batches into `Batch`es, gives their
    pixel slots back to the producing worker once they are freed, and sums the skip counts the
    workers report."""

    def __init__(self, loader, stages: _Stages | None, num_batches: int, pad_to: int | None = None):
        self.loader = loader
        self.stages = stages
        self.num_batches = num_batches
        self.pad_to = pad_to
        self._skipped: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        workers = getattr(self.loader, "num_workers", 0)
        pipes = [multiprocessing.Pipe(duplex=False) for _ in range(workers)]
        give_back = {w: pipe_sender(writer) for w, (_, writer) in enumerate(pipes)}
        if self.stages is not None:  # read by the workers, which start with this iteration
            self.stages.returns = [reader for reader, _ in pipes]
            if not workers:
                give_back = {0: self.stages.pool.release}
        views = SlotViews(give_back)
        produced = 0
        try:
            for item in _unwrapped(self.loader):
                for packed in item:
                    if isinstance(packed, dict):  # a worker's final skip counts
                        self._skipped.update(packed)
                        continue
                    if produced == self.num_batches:
                        break
                    batch = _unpack(packed, views)
                    self._skipped.update(batch.skipped)
                    produced += 1
                    yield batch
                if produced == self.num_batches:
                    break
        finally:
            for reader, writer in pipes:
                reader.close()
                writer.close()
        while produced < (self.pad_to or 0):
            produced += 1
            yield empty_batch()

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far, by kind, summed over loader workers."""
        total: Counter[str] = Counter()
        for counts in self._skipped.values():
            total.update(counts)
        return dict(total)


def _unwrapped(loader) -> Iterator:
    """Items of `loader`; an `UnusableDataError` from a loader worker comes out with its own
    message (the DataLoader wraps it in the worker's traceback)."""
    try:
        yield from loader
    except UnusableDataError as err:
        raise UnusableDataError(str(err).rsplit("UnusableDataError: ", 1)[-1].strip()) from None


class _WorkerStart:
    """A loader worker's start: raise its scheduling niceness, so that it decodes in the cycles
    the trainer leaves rather than taking cores from the trainer's threads, and leave Ctrl-C to
    the trainer, which stops the workers itself (a worker that took SIGINT too would print a
    traceback of its own). Picklable."""

    def __init__(self, increment: int):
        self.increment = increment

    def __call__(self, worker: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.increment > 0 and hasattr(os, "nice"):
            os.nice(self.increment)


def _data_loader(pipeline, num_workers: int, worker_nice: int = WORKER_NICE):
    """A DataLoader over the stream. It gets a generator of its own: by default each iterator
    draws its workers' base seed from torch's global RNG, which would shift the model's random
    stream (denoising noise) whenever a loader starts, and a resumed run would diverge. The
    workers seed themselves from (seed, epoch, rank, worker) instead. Workers run one thread
    each (the DataLoader's default) at niceness + `worker_nice`."""
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=PREFETCH_ITEMS if num_workers else None,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=_WorkerStart(worker_nice) if num_workers else None,
    )


def train_loader(
    shards: ShardSet | str | os.PathLike,
    batch_size: int,
    batches_per_epoch: int,
    transforms: Callable,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 1000,
    repeat_threshold: float | None = DEFAULT_THRESHOLD,
    num_workers: int = 2,
    rank: int | None = None,
    world_size: int | None = None,
    group_by_aspect: bool = True,
    categories: Iterable[int] | None = None,
    max_bad_in_a_row: int = MAX_BAD_IN_A_ROW,
    worker_nice: int = WORKER_NICE,
) -> _Loader:
    """Exactly `batches_per_epoch` batches on every rank, from resampled shards.

    `repeat_threshold=None` turns repeat-factor sampling off; `group_by_aspect` batches
    landscape and portrait images separately (`_Stages.batches`). `rank`/`world_size` default to
    the environment; passing them simulates a rank. A sample with a category id outside
    `categories` (None: any), a bad box or a corrupt image is skipped and counted; after
    `max_bad_in_a_row` such samples in a row the loader raises `UnusableDataError`.
    """
    shards = shards if isinstance(shards, ShardSet) else ShardSet.open(shards)
    env_rank, env_world = rank_and_world()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    stages = _Stages(
        transforms,
        hash((seed, epoch)),
        rank,
        categories=categories,
        max_bad_in_a_row=max_bad_in_a_row,
    )
    factors = (
        category_repeat_factors(shards.category_images(), shards.num_samples, repeat_threshold)
        if repeat_threshold
        else {}
    )
    base_seed = hash((seed, epoch, rank))

    def shard_seed() -> int:
        worker, _ = worker_id_and_count()
        return hash((base_seed, worker)) & 0x7FFFFFFF

    pipeline = wds.DataPipeline(
        wds.ResampledShards(
            shards.urls, seed=base_seed & 0x7FFFFFFF, worker_seed=shard_seed, deterministic=True
        ),
        lambda sources: tar_samples(sources, stages.tar_handler, max(10, 2 * len(shards.urls))),
        stages.parse,
        lambda samples: repeat_stream(samples, factors, stages.rng) if factors else samples,
        lambda samples: stages.shuffle(samples, shuffle_buffer),
        stages.decode,
        lambda samples: stages.batches(samples, batch_size, False, group_by_aspect),
    )
    return _Loader(_data_loader(pipeline, num_workers, worker_nice), stages, batches_per_epoch)


def deal_shards(samples_per_shard: Sequence[int], world_size: int) -> list[list[int]]:
    """Shard indices per rank, greedily balancing sample counts (largest shards first)."""
    loads = [0] * world_size
    dealt: list[list[int]] = [[] for _ in range(world_size)]
    for idx in sorted(range(len(samples_per_shard)), key=lambda i: (-samples_per_shard[i], i)):
        r = min(range(world_size), key=lambda k: (loads[k], k))
        dealt[r].append(idx)
        loads[r] += samples_per_shard[idx]
    return [sorted(d) for d in dealt]


def eval_batch_count(
    samples_per_shard: Sequence[int], shard_ids: Sequence[int], batch_size: int, num_workers: int
) -> int:
    """Batches one rank yields: each loader worker reads shards[w::W] and batches them alone."""
    workers = max(num_workers, 1)
    return sum(
        math.ceil(sum(samples_per_shard[i] for i in shard_ids[w::workers]) / batch_size)
        for w in range(workers)
    )


def eval_loader(
    shards: ShardSet | str | os.PathLike,
    batch_size: int,
    transforms: Callable,
    num_workers: int = 2,
    rank: int | None = None,
    world_size: int | None = None,
    categories: Iterable[int] | None = None,
) -> _Loader:
    """Every image exactly once across ranks; the same number of batches on every rank.

    Each target also holds the sample's `annotations` as written (COCO dicts, boxes in original
    pixels), so evaluation scores against them rather than against transformed boxes."""
    shards = shards if isinstance(shards, ShardSet) else ShardSet.open(shards)
    env_rank, env_world = rank_and_world()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    dealt = deal_shards(shards.samples_per_shard, world_size)
    workers = min(num_workers, max(len(d) for d in dealt)) if dealt[rank] else 0
    counts = [eval_batch_count(shards.samples_per_shard, d, batch_size, workers) for d in dealt]
    urls = [shards.urls[i] for i in dealt[rank]]
    stages = _Stages(transforms, 0, rank, keep_annotations=True, categories=categories)
    if not urls:
        return _Loader([], None, 0, pad_to=max(counts))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        lambda sources: tar_samples(sources, stages.tar_handler),
        stages.parse,
        stages.decode,
        lambda samples: stages.batches(samples, batch_size, partial=True),
    )
    return _Loader(_data_loader(pipeline, workers), stages, counts[rank], pad_to=max(counts))

"""TensorBoard event files beside a run's metrics.jsonl (which stays the source of truth).

`tensorboard --logdir runs/` shows every run: `train/<name>` for each logged training number
(losses, learning rate, images/s, data-wait share, gradient diagnostics), `val/<name>` for each
evaluation, and `val/detections`, a few val images with the boxes the model predicts. Written
by rank 0 with tensorboardX (no TensorFlow); a resumed run drops the events past its checkpoint
(`purge_step`), as metrics.jsonl drops its rows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
PREVIEW_IMAGES = 4  # val images drawn at each evaluation
PREVIEW_SCORE = 0.3  # detections drawn on them: at least this score


class RunBoard:
    """The run's event writer (rank 0 only; other ranks pass `enabled=False`). The event file
    is opened with the first thing written, so a run that has nothing to add (a finished run
    started again) leaves no new file."""

    def __init__(self, output_dir: str | os.PathLike, start_step: int, enabled: bool = True):
        self.enabled, self.output_dir, self.start_step = enabled, output_dir, start_step
        self._writer = None

    @property
    def writer(self):
        if self._writer is None and self.enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(
                logdir=str(self.output_dir), purge_step=self.start_step or None, flush_secs=30
            )
        return self._writer

    def scalars(self, prefix: str, row: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def detections(self, val_shards, results, step: int, names: dict) -> None:
        """The first val images with their detections (`BoxArrays`) scoring >= PREVIEW_SCORE,
        drawn."""
        if self.writer is None:
            return
        from pipelines.preview import draw_boxes, iter_samples
        from pipelines.shards import ShardSet

        shards = val_shards if isinstance(val_shards, ShardSet) else ShardSet.open(val_shards)
        drawn = []
        for image, meta in iter_samples(shards, PREVIEW_IMAGES):
            rows = np.flatnonzero(
                (results.image_ids == meta["image_id"]) & (results.scores >= PREVIEW_SCORE)
            )
            dets = results.take(rows).result_dicts()
            texts = [
                f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in dets
            ]
            drawn.append(np.asarray(draw_boxes(image, [d["bbox"] for d in dets], texts)))
        for k, picture in enumerate(drawn):
            self.writer.add_image(f"val/detections/{k}", picture, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def event_files(run_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(run_dir).glob("events.out.tfevents.*"))

"""A run's `metrics.jsonl`, read back: one JSON object per line, each with its `step`.

Training rows carry the losses, learning rate and throughput of a logged step; evaluation rows
(`eval_every`, and the end-of-run evaluation) carry `val_<metric>` numbers. A line cut short by
a kill is skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LOGGED_TERMS = (  # the loss terms a training row carries (those the model has)
    "loss",
    "loss_ce",
    "loss_bbox",
    "loss_giou",
    "loss_dn",
    "loss_enc",
    "loss_o2m",
    "loss_sel",
    "loss_div",
)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every complete row of the run's metrics.jsonl, in order ([] when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def is_evaluation(row: dict) -> bool:
    return any(key.startswith("val_") for key in row)


def training_rows(run_dir: str | os.PathLike) -> list[dict]:
    """The logged training steps."""
    return [row for row in read_metrics(run_dir) if not is_evaluation(row)]


def evaluation_rows(run_dir: str | os.PathLike) -> list[dict]:
    """The evaluations, by step."""
    return [row for row in read_metrics(run_dir) if is_evaluation(row)]


class RunLog:
    """Where rank 0 records a run: metrics.jsonl (appended, rows past `start_step` dropped
    first, as a resumed run logs those steps again) and TensorBoard event files beside it.
    Other ranks get a log that records nothing."""

    def __init__(self, output_dir: str | os.PathLike, start_step: int, enabled: bool = True):
        from vastdet.runtime.tensorboard import RunBoard

        self.path = Path(output_dir) / "metrics.jsonl"
        self.file = None
        if enabled:
            drop_rows_after(self.path, start_step)
            self.file = self.path.open("a")
        self.board = RunBoard(output_dir, start_step, enabled)

    def _write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def training(self, row: dict) -> None:
        self._write(row)
        self.board.scalars("train", row, row["step"])

    def evaluation(self, step: int, metrics: dict, results, val_shards, names) -> None:
        """An evaluation's numbers as `val_<name>` at `step`; a few val images drawn."""
        row = evaluation_row(step, metrics)
        self._write(row)
        self.board.scalars(
            "val", {k[len("val_") :]: v for k, v in row.items() if k != "step"}, step
        )
        self.board.detections(val_shards, results, step, names)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.board.close()


def evaluation_row(step: int, metrics: dict) -> dict:
    """An evaluation's numbers as a metrics row: `val_<name>` at `step`."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return {"step": step, **{f"val_{k}": v for k, v in numbers.items()}}


def append_evaluation(run_dir: str | os.PathLike, step: int, metrics: dict) -> None:
    """Add an evaluation made elsewhere (a pipeline's evaluation job) to a finished run's
    metrics.jsonl, in place of one already recorded at that step."""
    from taxonomy.files import atomic_output

    path = Path(run_dir) / "metrics.jsonl"
    kept = [r for r in read_metrics(run_dir) if not (r["step"] == step and is_evaluation(r))]
    with atomic_output(path) as tmp:
        tmp.write_text(
            "".join(json.dumps(r) + "\n" for r in [*kept, evaluation_row(step, metrics)])
        )


def drop_rows_after(path: Path, step: int) -> None:
    """Keep only the metrics lines up to `step` (a resumed run logs the steps after its
    checkpoint again) and drop a line cut short by a kill."""
    if not path.is_file():
        return
    from taxonomy.files import atomic_output

    kept = [row for row in read_metrics(path.parent) if row["step"] <= step]
    with atomic_output(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))

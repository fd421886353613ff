"""A pipeline's progress, printed by the driver while the workers run: each stage's step, loss,
images/s and time left.

Rank 0 of a training job pushes every logged row to a named actor (the board); a thread of the
driver takes them every few seconds and prints one line per new row. The board lives as long
as the driver's `ProgressPrinter`; nothing in training waits on it (a push is fire-and-forget).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

log = logging.getLogger(__name__)
NAMESPACE = "vastdet"


def board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self.rows: list[tuple[str, dict]] = []

        def push(self, stage: str, row: dict) -> None:
            self.rows.append((stage, row))

        def take(self) -> list[tuple[str, dict]]:
            rows, self.rows = self.rows, []
            return rows

    return ProgressBoard


def duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class StageClock:
    """Time left in a stage from the steps done since its first row reached the driver (a
    restored run's earlier steps do not count as speed)."""

    def __init__(self):
        self.first: dict[str, tuple[int, float]] = {}

    def eta(self, stage: str, step: int, steps: int, now: float) -> float | None:
        first_step, first_time = self.first.setdefault(stage, (step, now))
        if step <= first_step or now <= first_time:
            return None
        return (steps - step) * (now - first_time) / (step - first_step)


def progress_line(stage: str, row: dict, eta: float | None) -> str:
    parts = [f"{stage:<7} step {row['step']:>6}/{row.get('steps', '?')}"]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f}")
    if "images_per_s" in row:
        parts.append(f"{row['images_per_s']:.1f} images/s")
    parts.append(f"ETA {duration(eta)}" if eta is not None else "ETA -")
    return "  ".join(parts)


class ProgressPrinter:
    """`with ProgressPrinter() as progress:` a board for the workers (its actor name is
    `progress.name`) and a thread printing its rows (to `emit`, default: print)."""

    def __init__(self, emit=None, every_s: float = 2.0):
        self.name = f"vastdet-progress-{uuid.uuid4().hex[:8]}"
        self.emit = emit or (lambda line: print(line, flush=True))
        self.every_s = every_s
        self.clock = StageClock()
        self.stop = threading.Event()

    def __enter__(self) -> ProgressPrinter:
        self.board = board_class().options(name=self.name, namespace=NAMESPACE).remote()
        self.thread = threading.Thread(target=self._run, daemon=True, name="vastdet-progress")
        self.thread.start()
        return self

    def _drain(self) -> None:
        import ray

        now = time.monotonic()
        for stage, row in ray.get(self.board.take.remote()):
            eta = self.clock.eta(stage, row["step"], row.get("steps", row["step"]), now)
            self.emit(progress_line(stage, row, eta))

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self._drain()
            except Exception as err:  # noqa: BLE001 - progress must never stop a pipeline
                log.debug("progress board unreadable: %s", err)

    def __exit__(self, *exc) -> None:
        import ray

        self.stop.set()
        self.thread.join(timeout=10)
        try:
            self._drain()
        except Exception:  # noqa: BLE001
            pass
        ray.kill(self.board)


def board_handle(name: str | None):
    """The board a worker pushes to (None without one, or when it is gone: progress lines are
    never worth a failed run)."""
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        log.warning("progress board %s not found: this run's progress is not printed", name)
        return None

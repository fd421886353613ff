"""`vastdet plot RUN_DIR`: PNG charts of a run's metrics.jsonl."""

from __future__ import annotations

import os
import re
from pathlib import Path

from vastdet.runtime.metrics import LOGGED_TERMS, read_metrics

CHARTS = {
    "losses.png": LOGGED_TERMS,
    "learning_rate.png": ("lr",),
    # the learning curve: AP on the val shards, and at each hierarchy depth evaluated
    "validation_ap.png": ("val_AP", "val_AP50", "val_AP75", r"val_AP(50)?_level\d+"),
    "validation_other.png": (
        "val_AR100",
        "val_AR_C",
        "val_query_gini",
        "val_APr",
        "val_APc",
        "val_APf",
    ),
    "throughput.png": ("images_per_s",),
    "data_wait.png": ("data_wait_share",),
}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out, write (100 dpi, the folder made when missing) and close `fig`; returns `path`."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def chart_keys(keys, records: list[dict]) -> list[str]:
    """The metrics a chart draws: its plain keys present in the records, then every recorded
    key matching its patterns (keys with a backslash), sorted."""
    seen = {k for r in records for k in r}
    plain = [k for k in keys if "\\" not in k and k in seen]
    patterns = [re.compile(k) for k in keys if "\\" in k]
    matched = sorted(k for k in seen if any(p.fullmatch(k) for p in patterns))
    return plain + [k for k in matched if k not in plain]


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """One PNG per chart family, against the step; returns the files written."""
    from vastdet.runtime.loading import check_run_dir

    run = check_run_dir(run_dir, needs_checkpoint=False)
    records = read_metrics(run)
    if not records:
        raise ValueError(
            f"{run / 'metrics.jsonl'} has no records yet: the run logs every log_every steps"
        )
    out = Path(out_dir or run / "plots")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in CHARTS:
        fig = chart(records, name, run.name)
        if fig is not None:
            written.append(save_figure(fig, out / name))
    return written


Y_LABELS = {
    "losses.png": "loss (each term as weighted in the total)",
    "learning_rate.png": "learning rate",
    "validation_ap.png": "AP on the val shards",
    "validation_other.png": "value on the val shards",
    "throughput.png": "images / s (all ranks)",
    "data_wait.png": "share of wall time waiting for data",
}


def chart(records: list[dict], name: str, run_name: str):
    """The figure of chart `name` (a key of CHARTS) over `records`, against the step, its
    legend beside the axes so that no curve is hidden; None when no record has its keys."""
    present = chart_keys(CHARTS[name], records)
    if not present:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in present:
        points = [(r["step"], r[key]) for r in records if key in r]
        marker = "o" if key.startswith("val_") else None  # evaluations are few points
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker=marker)
    ax.set(xlabel="step", ylabel=Y_LABELS[name], title=f"{run_name}: {name[:-4].replace('_', ' ')}")
    ax.grid(alpha=0.3)
    outside_legend(ax)
    return fig


def outside_legend(ax) -> None:
    """The axes' legend to the right of its plotting area, clear of the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)

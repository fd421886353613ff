"""Figures read at a glance: box labels inside the picture and clear of each other, chart
legends beside the data, every axis labelled."""

from __future__ import annotations

import pytest
from PIL import Image

from pipelines.preview import draw_boxes, place_labels
from vastdet.runtime.plot import CHARTS, chart


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_stay_inside_the_image_and_do_not_cover_each_other():
    # three nearly identical boxes at the top edge, one at the right edge, one at the bottom
    boxes = [[2, 1, 60, 40], [3, 2, 61, 41], [4, 0, 62, 42], [90, 30, 100, 60], [10, 95, 40, 100]]
    sizes = [(70, 14)] * 5
    rects = place_labels(boxes, sizes, 100, 100)
    for x0, y0, x1, y1 in rects:
        assert 0 <= x0 < x1 <= 100 and 0 <= y0 < y1 <= 100
    assert not any(_overlap(a, b) for i, a in enumerate(rects) for b in rects[i + 1 :])
    assert rects[3][2] == 100  # pushed left to fit, not cut at the right edge


def test_a_drawn_label_keeps_the_space_between_name_and_score():
    image = Image.new("RGB", (200, 120))
    drawn = draw_boxes(image, [[20, 40, 80, 50]], ["golfcart 0.21"])
    assert drawn.size == (200, 120)
    # the text's pixels split into two runs: the name and the score, with a gap between them
    row_band = [
        any(drawn.getpixel((x, y)) == (255, 255, 0) for y in range(20, 40)) for x in range(200)
    ]
    runs, inside = 0, False
    gaps = []
    gap = 0
    for lit in row_band[20:]:
        if lit and not inside:
            runs += 1
            gaps.append(gap)
        gap = 0 if lit else gap + 1
        inside = lit
    assert max(gaps[1:]) >= 3  # a real space, not letters run together


RECORDS = [
    {"step": s, "loss": 3.0 / s, "loss_ce": 1.0 / s, "loss_bbox": 1.5 / s, "lr": 1e-4,
     "images_per_s": 10.0, "data_wait_share": 0.01}
    for s in range(1, 30)
] + [{"step": 10, "val_AP": 0.1, "val_AP50": 0.2, "val_AR100": 0.3, "val_AR_C": 0.5}]  # fmt: skip


@pytest.mark.parametrize("name", sorted(CHARTS))
def test_charts_put_their_legend_beside_the_data_and_label_both_axes(name):
    fig = chart(RECORDS, name, "run")
    if fig is None:
        pytest.skip(f"{name}: no keys in these records")
    ax = fig.axes[0]
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    plot_area = ax.get_window_extent()
    assert legend.x0 >= plot_area.x1  # right of the plotting area: it covers no curve
    assert ax.get_xlabel() == "step" and ax.get_ylabel()

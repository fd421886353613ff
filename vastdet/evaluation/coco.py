"""COCO box evaluation with pycocotools' exact semantics, sparse over (category, image) pairs.

pycocotools' COCOeval visits every (image, category) pair in Python, empty or not: at 13,204
categories and 2,000 images that is 26 million pairs and about 12 minutes here. This visits only
the pairs that hold a ground truth or a detection, and reproduces COCOeval's rules: detections
sorted by score (stable) and cut to the largest maxDet per image and category, ground truths with
`iscrowd` ignored and matched without being used up, greedy matching per IoU threshold with
ignored ground truths last, unmatched detections outside an area range ignored, matches recorded
by ground-truth id (so, as there, a ground truth with id 0 never counts as matched), 101-point
interpolated precision, and the same 12 summary numbers, with one deliberate difference: AP is
taken at the largest maxDet (pycocotools takes it at 100 whatever the settings, so V3Det's
300-detection protocol would print -1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = {
    "all": (0.0, 1e10),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e10),
}


def stat_names(max_dets: tuple[int, ...] = (1, 10, 100)) -> tuple[str, ...]:
    """The 12 summary numbers' names; recall is named by its maxDet (`AR300` under V3Det's
    (1, 10, 300), where pycocotools' labels would say AR100)."""
    dets = sorted(max_dets)
    return (
        ("AP", "AP50", "AP75", "APs", "APm", "APl")
        + tuple(f"AR{m}" for m in dets[:3])
        + ("ARs", "ARm", "ARl")
    )


STAT_NAMES = stat_names()  # COCO's (1, 10, 100)


@dataclass
class BoxEvaluation:
    """precision [T, R, K, A, M] and recall [T, K, A, M] (-1 where undefined) over the K
    categories that have a ground truth or a detection (`category_ids`); every other category
    is -1 throughout, as in pycocotools, and is not stored: at 13,204 categories the dense
    precision array alone is 1.3 GB. Plus the 12 summary numbers."""

    precision: np.ndarray
    recall: np.ndarray
    stats: dict[str, float]
    category_ids: list[int]
    max_dets: tuple[int, ...]

    def dense_precision(self, all_category_ids: list[int]) -> np.ndarray:
        """precision over `all_category_ids` (pycocotools' layout), -1 for absent ones."""
        return self._dense(self.precision, 2, all_category_ids)

    def dense_recall(self, all_category_ids: list[int]) -> np.ndarray:
        """recall over `all_category_ids` (pycocotools' layout), -1 for absent ones."""
        return self._dense(self.recall, 1, all_category_ids)

    def _dense(self, values: np.ndarray, axis: int, all_category_ids: list[int]) -> np.ndarray:
        shape = list(values.shape)
        shape[axis] = len(all_category_ids)
        dense = -np.ones(shape)
        index = {c: k for k, c in enumerate(all_category_ids)}
        np.moveaxis(dense, axis, 0)[[index[c] for c in self.category_ids]] = np.moveaxis(
            values, axis, 0
        )
        return dense


def _box_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes [D, G]; for a crowd ground truth the union is the detection's area."""
    dx0, dy0, dw, dh = dt.T
    gx0, gy0, gw, gh = gt.T
    iw = np.minimum(dx0[:, None] + dw[:, None], gx0 + gw) - np.maximum(dx0[:, None], gx0)
    ih = np.minimum(dy0[:, None] + dh[:, None], gy0 + gh) - np.maximum(dy0[:, None], gy0)
    overlap = (iw > 0) & (ih > 0)
    inter = np.where(overlap, iw * ih, 0.0)
    d_area = (dw * dh)[:, None]
    union = np.where(crowd[None, :], d_area, d_area + (gw * gh)[None, :] - inter)
    # no overlap is IoU 0 (pycocotools skips the division): a zero-area detection on a crowd
    # ground truth would otherwise be 0 / 0 and drop out instead of counting as a false positive
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap)


def _match(ious, gt_ignore, crowd, gt_ids, dt_area, area_range):
    """COCOeval.evaluateImg's matching for one (image, category, area range).

    Ground truths come sorted non-ignored first; returns (dtm [T, D] matched gt ids, dt_ignore
    [T, D] bool)."""
    t_count, d_count, g_count = len(IOU_THRESHOLDS), ious.shape[0], ious.shape[1]
    dtm = np.zeros((t_count, d_count))
    dt_ig = np.zeros((t_count, d_count), dtype=bool)
    if g_count and d_count:
        iou_rows = ious.tolist()
        for t_i, t in enumerate(IOU_THRESHOLDS.tolist()):
            used = [False] * g_count
            for d_i in range(d_count):
                best, m = min(t, 1 - 1e-10), -1
                row = iou_rows[d_i]
                for g_i in range(g_count):
                    if used[g_i] and not crowd[g_i]:
                        continue
                    if m > -1 and not gt_ignore[m] and gt_ignore[g_i]:
                        break
                    if row[g_i] < best:
                        continue
                    best, m = row[g_i], g_i
                if m == -1:
                    continue
                dt_ig[t_i, d_i] = gt_ignore[m]
                dtm[t_i, d_i] = gt_ids[m]
                used[m] = True
    outside = (dt_area < area_range[0]) | (dt_area > area_range[1])
    return dtm, dt_ig | ((dtm == 0) & outside[None, :])


def category_descendants(taxonomy) -> dict[int, set[int]]:
    """category id -> the category ids below it (transitively), for the V3Det rule."""
    tree = taxonomy.restrict(taxonomy.category_ids())
    ptr, idx = tree.ancestor_closure()
    cats = tree.category_column()
    below: dict[int, set[int]] = {}
    for i in range(len(tree)):
        for a in idx[ptr[i] : ptr[i + 1]].tolist():
            below.setdefault(int(cats[a]), set()).add(int(cats[i]))
    return below


def _v3det_ignored_copies(
    anns: list[dict], results: list[dict], descendants: dict[int, set[int]]
) -> list[dict]:
    """V3Det's rule: a ground truth of category A gets an ignored copy in every descendant
    category C of A that has detections in the same image, so a finer-grained detection on it
    is neither a true nor a false positive (copies keep the original's id, as V3Det's do).
    `results` hold evaluated categories only."""
    detected = {(r["image_id"], r["category_id"]) for r in results}
    copies = []
    for a in anns:
        for child in sorted(descendants.get(a["category_id"], ())):
            if (a["image_id"], child) in detected:
                copies.append({**a, "category_id": child, "_ignored_copy": True})
    return copies


def evaluate_boxes(
    gt: dict,
    results: list[dict],
    max_dets: tuple[int, ...] = (1, 10, 100),
    descendants: dict[int, set[int]] | None = None,
) -> BoxEvaluation:
    """Evaluate COCO-format detections against a COCO-format ground-truth document.

    `descendants` (category id -> ids below it, see `category_descendants`) turns on the V3Det
    protocol's hierarchy rule; V3Det evaluates 300 detections per image: `max_dets=(1, 10, 300)`.
    """
    max_dets = tuple(sorted(max_dets))  # as pycocotools sorts its maxDets
    image_ids = sorted(img["id"] for img in gt["images"])
    category_ids = sorted(c["id"] for c in gt["categories"])
    img_index = {i: n for n, i in enumerate(image_ids)}
    cat_index = {c: n for n, c in enumerate(category_ids)}
    n_img = len(image_ids)
    unknown_images = {r["image_id"] for r in results} - set(img_index)
    if unknown_images:
        raise ValueError(
            f"results name images not in the ground truth: {sorted(unknown_images)[:10]}"
        )
    kept = [r for r in results if r["category_id"] in cat_index]  # as pycocotools' catIds
    anns = list(gt["annotations"])
    if descendants:
        anns += _v3det_ignored_copies(anns, kept, descendants)
    g_key = np.array(
        [cat_index[a["category_id"]] * n_img + img_index[a["image_id"]] for a in anns],
        dtype=np.int64,
    )
    g_box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    g_area = np.array([a["area"] for a in anns], dtype=np.float64)
    g_crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    g_copy = np.array([a.get("_ignored_copy", False) for a in anns], dtype=bool)
    g_id = np.array([a["id"] for a in anns], dtype=np.float64)
    d_key = np.array(
        [cat_index[r["category_id"]] * n_img + img_index[r["image_id"]] for r in kept],
        dtype=np.int64,
    )
    d_box = np.array([r["bbox"] for r in kept], dtype=np.float64).reshape(-1, 4)
    d_score = np.array([r["score"] for r in kept], dtype=np.float64)
    d_area = d_box[:, 2] * d_box[:, 3]

    g_order = np.argsort(g_key, kind="mergesort")
    d_order = np.lexsort((-d_score, d_key))  # by group, then score descending; stable
    keys = np.union1d(g_key, d_key)
    g_start = np.searchsorted(g_key[g_order], keys, "left")
    g_stop = np.searchsorted(g_key[g_order], keys, "right")
    d_start = np.searchsorted(d_key[d_order], keys, "left")
    d_stop = np.searchsorted(d_key[d_order], keys, "right")
    areas = list(AREA_RANGES.values())
    top = max(max_dets)
    per_group = []  # (category index, [per area: (dtm, dt_ignore, gt_ignore)], scores)
    for k, key in enumerate(keys.tolist()):
        gi = g_order[g_start[k] : g_stop[k]]
        di = d_order[d_start[k] : d_stop[k]][:top]
        crowd = g_crowd[gi]
        ious = (
            _box_iou(d_box[di], g_box[gi], crowd)
            if len(gi) and len(di)
            else np.zeros((len(di), len(gi)))
        )
        by_area = []
        for lo, hi in areas:
            ignore = crowd | g_copy[gi] | (g_area[gi] < lo) | (g_area[gi] > hi)
            order = np.argsort(ignore, kind="mergesort")
            dtm, dt_ig = _match(
                ious[:, order],
                ignore[order].tolist(),
                crowd[order].tolist(),
                g_id[gi][order].tolist(),
                d_area[di],
                (lo, hi),
            )
            by_area.append((dtm, dt_ig, ignore[order]))
        per_group.append((key // n_img, by_area, d_score[di]))
    present = sorted({g[0] for g in per_group})
    compact = {c: k for k, c in enumerate(present)}
    per_group = [(compact[c], by_area, scores) for c, by_area, scores in per_group]
    return _accumulate(per_group, len(present), [category_ids[c] for c in present], max_dets)


def _accumulate(per_group, n_cat, category_ids, max_dets) -> BoxEvaluation:
    t_n, r_n, a_n, m_n = (
        len(IOU_THRESHOLDS),
        len(RECALL_THRESHOLDS),
        len(AREA_RANGES),
        len(max_dets),
    )
    precision = -np.ones((t_n, r_n, n_cat, a_n, m_n))
    recall = -np.ones((t_n, n_cat, a_n, m_n))
    start = 0
    while start < len(per_group):
        cat = per_group[start][0]
        stop = start
        while stop < len(per_group) and per_group[stop][0] == cat:
            stop += 1
        groups = per_group[start:stop]  # this category's images, in image order
        for a in range(a_n):
            gt_ig = np.concatenate([g[1][a][2] for g in groups])
            npig = int(np.count_nonzero(~gt_ig))
            if npig == 0:
                continue
            for m, max_det in enumerate(max_dets):
                scores = np.concatenate([g[2][:max_det] for g in groups])
                order = np.argsort(-scores, kind="mergesort")
                dtm = np.concatenate([g[1][a][0][:, :max_det] for g in groups], axis=1)[:, order]
                dt_ig = np.concatenate([g[1][a][1][:, :max_det] for g in groups], axis=1)[:, order]
                tps = np.cumsum(np.logical_and(dtm, ~dt_ig), axis=1).astype(float)
                fps = np.cumsum(np.logical_and(~dtm.astype(bool), ~dt_ig), axis=1).astype(float)
                nd = tps.shape[1]
                if nd == 0:
                    recall[:, cat, a, m] = 0
                    precision[:, :, cat, a, m] = 0
                    continue
                rc = tps / npig
                pr = tps / (fps + tps + np.spacing(1))
                recall[:, cat, a, m] = rc[:, -1]
                pr = np.flip(np.maximum.accumulate(np.flip(pr, 1), axis=1), 1)  # precision envelope
                for t in range(t_n):
                    idx = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
                    valid = idx < nd
                    q = np.zeros(r_n)
                    q[valid] = pr[t, idx[valid]]
                    precision[t, :, cat, a, m] = q
        start = stop
    return BoxEvaluation(
        precision, recall, _summarize(precision, recall, max_dets), category_ids, tuple(max_dets)
    )


def _summarize(precision, recall, max_dets) -> dict[str, float]:
    areas = list(AREA_RANGES)

    def mean(values):
        values = values[values > -1]
        return float(np.mean(values)) if values.size else -1.0

    def ap(iou=None, area="all", m=-1):
        p = precision[:, :, :, areas.index(area), m]
        if iou is not None:
            p = p[np.where(np.isclose(IOU_THRESHOLDS, iou))[0]]
        return mean(p)

    def ar(area="all", m=-1):
        return mean(recall[:, :, areas.index(area), m])

    values = [
        ap(),
        ap(0.5),
        ap(0.75),
        ap(area="small"),
        ap(area="medium"),
        ap(area="large"),
        ar(m=0),
        ar(m=1),
        ar(m=2),
        ar("small"),
        ar("medium"),
        ar("large"),
    ]
    return dict(zip(stat_names(max_dets), values))


def split_ap(evaluation: BoxEvaluation, groups: dict[str, set[int]]) -> dict[str, float]:
    """AP (IoU 0.5:0.95, all areas, largest maxDet) over each named subset of category ids,
    e.g. V3Det's base and novel classes (`novel` in its category file)."""
    out = {}
    for name, ids in groups.items():
        index = [k for k, c in enumerate(evaluation.category_ids) if c in ids]
        values = evaluation.precision[:, :, index, 0, -1]
        values = values[values > -1]
        out[name] = float(values.mean()) if values.size else -1.0
    return out


def novel_split(taxonomy) -> dict[str, set[int]]:
    """{"base": ..., "novel": ...} category ids from the `novel` attribute of a category file
    (V3Det's `cat_info` marks 6,495 novel classes); empty when no category is marked."""
    cats = taxonomy.category_ids().tolist()
    novel = {c for c in cats if taxonomy.node(taxonomy.node_of_category(c)).attributes.get("novel")}
    return {"base": set(cats) - novel, "novel": novel} if novel else {}

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
        + tuple(f"AR{m}" for m in dets[-3:])
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
            start = min(t, 1 - 1e-10)
            for d_i in range(d_count):
                best, m = start, -1
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


@dataclass
class BoxArrays:
    """Boxes as arrays, one row each: what detections and ground truths are inside evaluation
    (a dict per box costs ~1 KB; 9 million detections do not fit as dicts). Detections leave
    `area`, `iscrowd` and `ids` empty; ground truths leave `score` empty."""

    image_ids: np.ndarray  # [N] int64
    category_ids: np.ndarray  # [N] int64
    boxes: np.ndarray  # [N, 4] float64, xywh pixels
    scores: np.ndarray | None = None  # [N] float64
    areas: np.ndarray | None = None  # [N] float64
    iscrowd: np.ndarray | None = None  # [N] bool
    ids: np.ndarray | None = None  # [N] float64 (COCO annotation ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def take(self, index: np.ndarray) -> BoxArrays:
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return BoxArrays(
            self.image_ids[index], self.category_ids[index], self.boxes[index],
            pick(self.scores), pick(self.areas), pick(self.iscrowd), pick(self.ids),
        )  # fmt: skip

    @classmethod
    def concat(cls, parts: list[BoxArrays]) -> BoxArrays:
        """One set of rows from many (e.g. every batch's detections, every rank's)."""
        parts = [p for p in parts if len(p)] or parts[:1]
        if not parts:
            return cls.empty()

        def joined(name: str):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        return cls(*(joined(f) for f in FIELDS))

    @classmethod
    def empty(cls) -> BoxArrays:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0))

    def relabel(self, mapping: dict[int, int]) -> BoxArrays:
        """The same rows with their category ids mapped (every id must be a key)."""
        keys = np.array(sorted(mapping), dtype=np.int64)
        values = np.array([mapping[k] for k in keys.tolist()], dtype=np.int64)
        index = np.searchsorted(keys, self.category_ids)
        if len(self.category_ids) and not np.array_equal(
            keys[np.minimum(index, len(keys) - 1)], self.category_ids
        ):
            raise KeyError("a category id has no mapping")
        out = self.take(np.arange(len(self)))
        out.category_ids = values[index]
        return out

    def result_dicts(self) -> list[dict]:
        """COCO result dicts (image_id, category_id, bbox, score): for small sets only."""
        return [
            {"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(
                self.image_ids.tolist(), self.category_ids.tolist(), self.boxes.tolist(),
                self.scores.tolist(),
            )
        ]  # fmt: skip

    @classmethod
    def from_results(cls, results: list[dict]) -> BoxArrays:
        return cls(
            np.array([r["image_id"] for r in results], dtype=np.int64),
            np.array([r["category_id"] for r in results], dtype=np.int64),
            np.array([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4),
            np.array([r["score"] for r in results], dtype=np.float64),
        )

    @classmethod
    def from_annotations(cls, anns: list[dict]) -> BoxArrays:
        return cls(
            np.array([a["image_id"] for a in anns], dtype=np.int64),
            np.array([a["category_id"] for a in anns], dtype=np.int64),
            np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
            None,
            np.array([a["area"] for a in anns], dtype=np.float64),
            np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
            np.array([a["id"] for a in anns], dtype=np.float64),
        )


FIELDS = ("image_ids", "category_ids", "boxes", "scores", "areas", "iscrowd", "ids")


def _v3det_ignored_copies(
    gts: BoxArrays, dets: BoxArrays, descendants: dict[int, set[int]]
) -> tuple[BoxArrays, np.ndarray]:
    """V3Det's rule: a ground truth of category A gets an ignored copy in every descendant
    category C of A that has detections in the same image, so a finer-grained detection on it
    is neither a true nor a false positive (copies keep the original's id, as V3Det's do).
    `dets` hold evaluated categories only. Returns the ground truths with the copies appended
    and a flag per row marking the copies."""
    ancestors: dict[int, list[int]] = {}
    for parent, below in descendants.items():
        for child in below:
            ancestors.setdefault(child, []).append(parent)
    by_pair: dict[tuple[int, int], list[int]] = {}
    for row, pair in enumerate(zip(gts.image_ids.tolist(), gts.category_ids.tolist())):
        by_pair.setdefault(pair, []).append(row)
    detected = set(zip(dets.image_ids.tolist(), dets.category_ids.tolist()))
    rows, cats = [], []
    for image, child in sorted(detected):
        for parent in ancestors.get(child, ()):
            for row in by_pair.get((image, parent), ()):
                rows.append(row)
                cats.append(child)
    order = np.lexsort((np.array(cats, dtype=np.int64), np.array(rows, dtype=np.int64)))
    rows_a, cats_a = np.array(rows, dtype=np.int64)[order], np.array(cats, dtype=np.int64)[order]
    copies = gts.take(rows_a)
    copies.category_ids = cats_a
    merged = BoxArrays.concat([gts, copies]) if len(copies) else gts
    return merged, np.concatenate([np.zeros(len(gts), bool), np.ones(len(copies), bool)])


@dataclass
class Federated:
    """LVIS's federated annotation, per image id: the categories verified absent
    (`neg_category_ids`) and those whose instances are not all annotated
    (`not_exhaustive_category_ids`). A detection of a category an image neither annotates nor
    lists as absent is not evaluated; an unmatched detection of a not-exhaustive category is
    ignored (neither true nor false positive)."""

    negative: dict[int, list[int]]
    not_exhaustive: dict[int, list[int]]

    @classmethod
    def from_images(cls, images: list[dict]) -> Federated:
        """From LVIS image entries (their two lists; missing lists are empty)."""
        return cls(
            {int(i["id"]): list(i.get("neg_category_ids") or ()) for i in images},
            {int(i["id"]): list(i.get("not_exhaustive_category_ids") or ()) for i in images},
        )

    def keys(self, which: str, image_ids: np.ndarray, category_ids: np.ndarray) -> np.ndarray:
        """(category index * images + image index) of the listed pairs inside the evaluation."""
        lists = getattr(self, which)
        img = np.array([i for i, cats in lists.items() for _ in cats], dtype=np.int64)
        cat = np.array([c for cats in lists.values() for c in cats], dtype=np.int64)
        inside = np.isin(img, image_ids) & np.isin(cat, category_ids)
        img, cat = img[inside], cat[inside]
        return np.searchsorted(category_ids, cat) * len(image_ids) + np.searchsorted(image_ids, img)


def limit_per_image(dets: BoxArrays, max_dets: int) -> BoxArrays:
    """Each image's `max_dets` best-scoring detections over all categories (LVIS's 300), ties
    kept in their given order; the rows keep their order."""
    order = np.lexsort((-dets.scores, dets.image_ids))
    image = dets.image_ids[order]
    rank = np.arange(len(order)) - np.searchsorted(image, image, "left")
    return dets.take(np.sort(order[rank < max_dets]))


def evaluate_boxes(
    gt: dict,
    results: list[dict] | BoxArrays,
    max_dets: tuple[int, ...] = (1, 10, 100),
    descendants: dict[int, set[int]] | None = None,
    federated: Federated | None = None,
) -> BoxEvaluation:
    """Evaluate detections (COCO result dicts, or `BoxArrays`) against a COCO-format
    ground-truth document (see `evaluate_arrays`)."""
    dets = results if isinstance(results, BoxArrays) else BoxArrays.from_results(results)
    return evaluate_arrays(
        [img["id"] for img in gt["images"]],
        [c["id"] for c in gt["categories"]],
        BoxArrays.from_annotations(gt["annotations"]),
        dets,
        max_dets,
        descendants,
        federated,
    )


THRESHOLD_BITS = 1 << np.arange(len(IOU_THRESHOLDS), dtype=np.uint16)


def evaluate_arrays(
    image_ids,
    category_ids,
    gts: BoxArrays,
    dets: BoxArrays,
    max_dets: tuple[int, ...] = (1, 10, 100),
    descendants: dict[int, set[int]] | None = None,
    federated: Federated | None = None,
) -> BoxEvaluation:
    """Evaluate detections against ground truths, both as arrays, over the given images and
    categories. `descendants` (category id -> ids below it, see `category_descendants`) turns
    on the V3Det protocol's hierarchy rule; V3Det evaluates 300 detections per image:
    `max_dets=(1, 10, 300)`. `federated` turns on LVIS's rules (`Federated`); LVIS keeps 300
    detections per image over all categories (`limit_per_image`, before this) and one maxDet:
    `max_dets=(300,)`, as the `lvis` package does.

    Only (category, image) pairs that hold both a ground truth and a detection are matched one
    by one; a detection alone in its pair is a false positive (or ignored outside an area
    range) whatever the threshold, decided for all of them at once. Each detection's outcome
    per IoU threshold is kept as bits, so memory grows by a few bytes a detection."""
    max_dets = tuple(sorted(max_dets))  # as pycocotools sorts its maxDets
    image_ids = np.array(sorted(image_ids), dtype=np.int64)
    category_ids = np.array(sorted(category_ids), dtype=np.int64)
    n_img = len(image_ids)
    unknown = np.setdiff1d(dets.image_ids, image_ids)
    if len(unknown):
        raise ValueError(f"results name images not in the ground truth: {unknown[:10].tolist()}")
    dets = dets.take(np.flatnonzero(np.isin(dets.category_ids, category_ids)))  # as catIds
    copy = np.zeros(len(gts), dtype=bool)
    if descendants:
        gts, copy = _v3det_ignored_copies(gts, dets, descendants)
    g_cat = np.searchsorted(category_ids, gts.category_ids)
    g_key = g_cat * n_img + np.searchsorted(image_ids, gts.image_ids)
    d_cat = np.searchsorted(category_ids, dets.category_ids)
    d_key = d_cat * n_img + np.searchsorted(image_ids, dets.image_ids)
    not_exhaustive = np.zeros(0, dtype=np.int64)
    if federated is not None:  # only pairs the image annotates or verified absent are scored
        known = np.union1d(g_key, federated.keys("negative", image_ids, category_ids))
        kept = np.isin(d_key, known)
        dets, d_key = dets.take(np.flatnonzero(kept)), d_key[kept]
        not_exhaustive = federated.keys("not_exhaustive", image_ids, category_ids)
    # detections by (category, image), then score descending (stable); each one's rank there
    d_order = np.lexsort((-dets.scores, d_key))
    d_key = d_key[d_order]
    first = np.searchsorted(d_key, d_key, "left")
    rank = np.arange(len(d_key)) - first
    keep = rank < max(max_dets)
    d_order, d_key, rank = d_order[keep], d_key[keep], rank[keep]
    d_box, d_score = dets.boxes[d_order], dets.scores[d_order]
    d_area = d_box[:, 2] * d_box[:, 3]
    areas = list(AREA_RANGES.values())
    # outcome bits per area: matched (true positive) and ignored, one bit per IoU threshold;
    # a detection without a ground truth in its pair is unmatched, ignored outside the range
    every = np.uint16(THRESHOLD_BITS.sum())
    tp_bits = np.zeros((len(areas), len(d_key)), dtype=np.uint16)
    unlisted = np.isin(d_key, not_exhaustive)  # unmatched there: ignored (LVIS)
    ig_bits = np.stack(
        [
            np.where((d_area < lo) | (d_area > hi) | unlisted, every, np.uint16(0))
            for lo, hi in areas
        ]
    )
    g_order = np.argsort(g_key, kind="mergesort")
    g_sorted = g_key[g_order]
    both = np.intersect1d(g_sorted, d_key)
    g_start, g_stop = (
        np.searchsorted(g_sorted, both, "left"),
        np.searchsorted(g_sorted, both, "right"),
    )
    d_start, d_stop = np.searchsorted(d_key, both, "left"), np.searchsorted(d_key, both, "right")
    g_area, g_crowd, g_id = gts.areas, gts.iscrowd, gts.ids
    for k in range(len(both)):
        gi = g_order[g_start[k] : g_stop[k]]
        ds = slice(d_start[k], d_stop[k])
        crowd = g_crowd[gi]
        ious = _box_iou(d_box[ds], gts.boxes[gi], crowd)
        for a, (lo, hi) in enumerate(areas):
            ignore = crowd | copy[gi] | (g_area[gi] < lo) | (g_area[gi] > hi)
            order = np.argsort(ignore, kind="mergesort")
            dtm, dt_ig = _match(
                ious[:, order], ignore[order].tolist(), crowd[order].tolist(),
                g_id[gi][order].tolist(), d_area[ds], (lo, hi),
            )  # fmt: skip
            if unlisted[d_start[k]]:
                dt_ig |= dtm == 0
            tp_bits[a, ds] = ((dtm != 0) & ~dt_ig).T @ THRESHOLD_BITS
            ig_bits[a, ds] = dt_ig.T @ THRESHOLD_BITS
    # non-ignored ground truths per (category, area)
    npig = np.zeros((len(category_ids), len(areas)), dtype=np.int64)
    for a, (lo, hi) in enumerate(areas):
        counted = ~(g_crowd | copy | (g_area < lo) | (g_area > hi))
        npig[:, a] = np.bincount(g_cat[counted], minlength=len(category_ids))
    d_cat = d_key // n_img
    present = np.union1d(np.unique(g_cat), np.unique(d_cat))
    return _accumulate(
        present, d_cat, rank, d_score, tp_bits, ig_bits, npig,
        category_ids[present].tolist(), max_dets,
    )  # fmt: skip


def _accumulate(
    present, d_cat, rank, d_score, tp_bits, ig_bits, npig, category_ids, max_dets
) -> BoxEvaluation:
    """Precision and recall per present category from each detection's outcome bits;
    detections come ordered by (category, image, score descending)."""
    t_n, r_n, a_n, m_n = (
        len(IOU_THRESHOLDS),
        len(RECALL_THRESHOLDS),
        len(AREA_RANGES),
        len(max_dets),
    )
    # filled a category at a time, so laid out category first (written [T, R, K, A, M] one
    # category's 1,010 values were 1,010 cache lines apart); returned as views in COCOeval's order
    precision = -np.ones((len(present), a_n, m_n, t_n, r_n))
    recall = -np.ones((len(present), a_n, m_n, t_n))
    starts = np.searchsorted(d_cat, present, "left")
    stops = np.searchsorted(d_cat, present, "right")
    shifts = np.arange(t_n, dtype=np.uint16)[:, None]
    rows = np.arange(t_n)[:, None]
    for k, cat in enumerate(present.tolist()):
        if not npig[cat].any():
            continue
        segment = slice(starts[k], stops[k])
        # score order once per category: a stable sort's order restricted to the detections
        # within a maxDet is the stable sort of those (COCOeval sorts each subset by score)
        order = np.argsort(-d_score[segment], kind="mergesort")
        ranks = rank[segment][order]
        tp_all, ig_all = tp_bits[:, segment][:, order], ig_bits[:, segment][:, order]
        for m, max_det in enumerate(max_dets):
            within = ranks < max_det
            tp_m, ig_m = tp_all[:, within], ig_all[:, within]
            nd = tp_m.shape[1]
            for a in range(a_n):
                if npig[cat, a] == 0:
                    continue
                if nd == 0:
                    recall[k, a, m] = 0
                    precision[k, a, m] = 0
                    continue
                tp = ((tp_m[a] >> shifts) & 1).astype(bool)
                ig = ((ig_m[a] >> shifts) & 1).astype(bool)
                tps = np.cumsum(tp, axis=1).astype(float)
                fps = np.cumsum(~tp & ~ig, axis=1).astype(float)
                rc = tps / npig[cat, a]
                pr = tps / (fps + tps + np.spacing(1))
                recall[k, a, m] = rc[:, -1]
                pr = np.flip(np.maximum.accumulate(np.flip(pr, 1), axis=1), 1)  # envelope
                idx = _recall_points(tps, npig[cat, a])
                valid = idx < nd
                precision[k, a, m] = np.where(valid, pr[rows, np.minimum(idx, nd - 1)], 0)
    precision, recall = precision.transpose(3, 4, 0, 1, 2), recall.transpose(3, 0, 1, 2)
    return BoxEvaluation(
        precision, recall, _summarize(precision, recall, max_dets), category_ids, tuple(max_dets)
    )


def _recall_points(tps: np.ndarray, positives: int) -> np.ndarray:
    """[T, R]: for each IoU threshold's row of true-positive counts `tps` [T, D] (integers,
    non-decreasing), the first detection whose recall tps / positives reaches each of COCO's
    recall thresholds (D if none): what `np.searchsorted(tps[t] / positives, RECALL_THRESHOLDS)`
    gives row by row, in two searches. A threshold is reached at the smallest count v whose
    v / positives (the same float division) reaches it; counts are integers at most
    `positives`, so the rows are searched as one, row t shifted by t * (positives + 1)."""
    t_n, d_n = tps.shape
    ratios = np.arange(positives + 1, dtype=np.float64) / positives
    needed = np.searchsorted(ratios, RECALL_THRESHOLDS, side="left")  # [R]
    shift = np.arange(t_n)[:, None] * (positives + 1)
    found = np.searchsorted((tps + shift).ravel(), (needed[None, :] + shift).ravel(), "left")
    return found.reshape(t_n, -1) - np.arange(t_n)[:, None] * d_n


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

    values = [ap(), ap(0.5), ap(0.75), ap(area="small"), ap(area="medium"), ap(area="large")]
    values += [ar(m=m) for m in range(len(max_dets))[-3:]]
    values += [ar("small"), ar("medium"), ar("large")]
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

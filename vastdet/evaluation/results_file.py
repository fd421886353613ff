"""`results.json` as a stream: COCO result dicts written one per line, and read back into
arrays without holding a dict per detection.

V3Det's val set under its protocol is 9 million detections (30,000 images x 300): as Python
dicts that is ~10 GB before evaluation starts. The writer emits a plain JSON array, one object
per line, from the arrays evaluation holds; the reader takes any COCO results file (one line or
many, keys in any order, extra keys ignored) in blocks and keeps only four arrays. A block of
plain results (the four keys and nothing else, in one order throughout: ours, pycocotools'
and mmdetection's files) is read as numbers by NumPy once its structure is checked; any other
block's objects are parsed in one call of the json module's C parser.
"""

from __future__ import annotations

import json
import operator
import os
import re
import warnings
from pathlib import Path

import numpy as np

from vastdet.evaluation.coco import BoxArrays

BLOCK = 1 << 24  # characters parsed at a time
OBJECT = re.compile(r"\{[^{}]*\}")  # a flat result dict, for naming the one at fault


def write_results(path: str | os.PathLike, detections: BoxArrays, rows: int = 100_000) -> Path:
    """Write `detections` as a COCO results file (atomically), `rows` at a time."""
    from taxonomy.files import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w") as out:
        out.write("[")
        for start in range(0, len(detections), rows):
            part = detections.take(np.arange(start, min(start + rows, len(detections))))
            lines = [
                json.dumps({"image_id": i, "category_id": c, "bbox": b, "score": s})
                for i, c, b, s in zip(
                    part.image_ids.tolist(), part.category_ids.tolist(), part.boxes.tolist(),
                    part.scores.tolist(),
                )
            ]  # fmt: skip
            out.write(("\n" if start == 0 else ",\n") + ",\n".join(lines))
        out.write("\n]\n")
    return path


def read_results(path: str | os.PathLike) -> BoxArrays:
    """A COCO results file (a JSON array of {image_id, category_id, bbox, score}) as arrays,
    read in blocks: memory holds the arrays and one block, never a dict per detection."""
    parts: list[BoxArrays] = []
    carry = ""
    with open(path, encoding="utf-8") as handle:
        while block := handle.read(BLOCK):
            text = carry + block
            end = _last_boundary(text)  # objects up to the last one known complete
            if end:
                parts.append(_parse(text[:end], path))
            carry = text[end:]
    end = carry.rfind("}") + 1  # the last object
    if end:
        parts.append(_parse(carry[:end], path))
        carry = carry[end:]
    if carry.strip(" \n\r\t,]") not in ("", "["):
        raise ValueError(f"{path}: not a COCO results file (unparsed text at the end)")
    return BoxArrays.concat(parts) if parts else BoxArrays.empty()


def _last_boundary(text: str) -> int:
    """The end of the last object of the array in `text` that another follows ("}, {"; an
    object inside a result, such as an RLE mask, follows a key instead), 0 if none."""

    def before(j: int) -> int:  # the last character before j that is not white space
        j -= 1
        while j >= 0 and text[j] in " \n\r\t":
            j -= 1
        return j

    i = len(text)
    while (i := text.rfind("{", 0, i)) > 0:
        j = before(i)
        if j > 0 and text[j] == ",":
            k = before(j)
            if k >= 0 and text[k] == "}":
                return k + 1
    return 0


FIELDS = operator.itemgetter("image_id", "category_id", "bbox", "score")


def _parse(text: str, path) -> BoxArrays:
    """The objects in `text` (whole ones, separated by commas): as plain results if they are
    (`_parse_plain`), else parsed as one JSON array, which runs in the json module's C code; a
    block that does not parse that way (an object with nested ones, a missing key) goes object
    by object, which names the one at fault."""
    start = text.find("{")
    if start < 0:
        return BoxArrays.empty()
    if (plain := _parse_plain(text[start:])) is not None:
        return plain
    try:
        rows = list(map(FIELDS, json.loads("[" + text[start:] + "]")))
        image_ids, category_ids, boxes, scores = zip(*rows) if rows else ((),) * 4
        return _arrays(image_ids, category_ids, boxes, scores)
    except (ValueError, KeyError, TypeError):
        return _parse_each(text, path)


KEYS = (b'"image_id":', b'"category_id":', b'"bbox":', b'"score":')
MARKS = bytes((1, 2, 3, 4))  # a key's stand-in: JSON text holds no raw control characters
WIDTHS = {1: 1, 2: 1, 3: 4, 4: 1}  # numbers per key
NUMBERS = b"0123456789.-+eE \t\r\n"  # what a number and white space are made of
TO_SPACE = bytes.maketrans(MARKS + b"{}[],", b" " * 9)


def _parse_plain(text: str) -> BoxArrays | None:
    """Objects that are exactly {image_id, category_id, bbox: [4 numbers], score}, all with
    their keys in the first one's order, as arrays; None for anything else. The keys become
    one byte each; with the numbers and white space taken out, what is left (the skeleton)
    must be one object's skeleton n times over, so every number's place is known, and then
    NumPy reads the numbers (the same doubles as the json module's: both round correctly)."""
    data = text.encode()
    for key, mark in zip(KEYS, MARKS):
        data = data.replace(key, bytes((mark,)))
    skeleton = data.translate(None, NUMBERS)
    order = skeleton[: skeleton.find(b"}") + 1].translate(None, b"{}[],")
    if sorted(order) != list(MARKS):
        return None
    one = b"{" + b",".join(b"\x03[,,,]" if m == 3 else bytes((m,)) for m in order) + b"}"
    n = skeleton.count(b"{")
    if skeleton != b",".join([one] * n):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy warns where its reading stops early
        try:
            values = np.fromstring(data.translate(TO_SPACE), dtype=np.float64, sep=" ")
        except (ValueError, DeprecationWarning):
            return None
    if values.size != 7 * n:
        return None
    values = values.reshape(n, 7)
    column = dict(zip(order, np.cumsum([0] + [WIDTHS[m] for m in order])))
    return BoxArrays(
        values[:, column[1]].astype(np.int64),
        values[:, column[2]].astype(np.int64),
        np.ascontiguousarray(values[:, column[3] : column[3] + 4]),
        np.ascontiguousarray(values[:, column[4]]),
    )


def _arrays(image_ids, category_ids, boxes, scores) -> BoxArrays:
    return BoxArrays(
        np.array(image_ids, dtype=np.int64),
        np.array(category_ids, dtype=np.int64),
        np.array(boxes, dtype=np.float64).reshape(-1, 4),
        np.array(scores, dtype=np.float64),
    )


def _parse_each(text: str, path) -> BoxArrays:
    image_ids, category_ids, boxes, scores = [], [], [], []
    for match in OBJECT.finditer(text):
        try:
            item = json.loads(match.group())
            image_ids.append(item["image_id"])
            category_ids.append(item["category_id"])
            boxes.append(item["bbox"])
            scores.append(item["score"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}: not a COCO result: {match.group()[:120]} ({err!r})"
            ) from None
    return _arrays(image_ids, category_ids, boxes, scores)

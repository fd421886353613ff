"""The `vastdet data` commands, run through the real entry point."""

from __future__ import annotations

import json

from PIL import Image

from pipelines.shards import ShardSet
from taxonomy import Node, Taxonomy, save_taxonomy
from vastdet.cli import main


def small_taxonomy(path):
    save_taxonomy(
        Taxonomy(
            [Node("r", "thing", category_id=1)]
            + [Node(f"n{i}", f"kind {i}", ("r",), i) for i in range(2, 6)]
        ),
        path,
    )


def synth(tmp_path, *options: str) -> int:
    """`vastdet data synth` over a small taxonomy into tmp_path / "syn"."""
    tax = tmp_path / "t.json"
    small_taxonomy(tax)
    return main(["data", "synth", "--taxonomy", str(tax), "-o", str(tmp_path / "syn"), *options])


def test_synth_shards_then_inspect_with_picture(tmp_path, capsys):
    options = ["--train", "12", "--val", "4", "--min-side", "48", "--max-side", "64"]
    assert synth(tmp_path, *options, "--shards", "--max-samples", "5") == 0
    train = ShardSet.open(tmp_path / "syn" / "shards" / "train")
    assert train.num_samples == 12 and train.samples_per_shard == [5, 5, 2]
    png = tmp_path / "look.png"
    inspect = [
        "data",
        "inspect",
        str(tmp_path / "syn" / "shards" / "train"),
        "--verify",
        "--png",
        str(png),
    ]
    assert main(inspect) == 0
    out = capsys.readouterr().out
    assert "images                         12" in out and "sha256: all shards match" in out
    assert "kind" in out or "thing" in out  # names come from the manifest's category file
    assert Image.open(png).size == (4 * 320, 2 * 320)


def test_synth_coco_then_shard_reports_problems(tmp_path, capsys):
    assert (
        synth(tmp_path, "--train", "6", "--val", "0", "--min-side", "48", "--max-side", "48") == 0
    )
    ann = tmp_path / "syn" / "train.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["category_id"] = 999
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    images = str(tmp_path / "syn" / "images")
    args = [
        "data",
        "shard",
        "--annotations",
        str(bad),
        "--images",
        images,
        "-o",
        str(tmp_path / "shards"),
        "--taxonomy",
        str(tmp_path / "t.json"),
    ]
    assert main(args) == 2
    assert (
        f"image {doc['annotations'][0]['image_id']}: unknown category id" in capsys.readouterr().err
    )
    assert main([*args, "--on-error", "skip"]) == 0
    assert "skipped 1 x unknown category id" in capsys.readouterr().out
    manifest = ShardSet.open(tmp_path / "shards").manifest
    assert manifest["skipped"] == {"unknown category id": 1} and manifest["num_samples"] == 6

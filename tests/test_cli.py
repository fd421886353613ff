"""The `vastdet taxonomy` commands, run through the real entry point."""

from __future__ import annotations

import json

from conftest import V3DET_NAMES

from taxonomy import load_taxonomy, save_taxonomy
from vastdet.cli import main


def test_show_prints_stats_and_tree(vehicles, tmp_path, capsys):
    path = tmp_path / "v.json"
    save_taxonomy(vehicles, path)
    assert main(["taxonomy", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "nodes with several parents" in out and "amphibious car [amph] #5" in out
    assert "└── amphibious car [amph] #5 ^" in out  # second appearance under boat is marked
    assert main(["taxonomy", "show", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (
        stats["nodes"] == 9
        and stats["categories"] == 8
        and stats["depth histogram"] == [1, 2, 4, 2]
    )


def test_convert_between_formats(vehicles, tmp_path):
    src = tmp_path / "v.json"
    save_taxonomy(vehicles, src)
    assert main(["taxonomy", "convert", str(src), str(tmp_path / "v3.json"), "--to", "v3det"]) == 0
    assert main(["taxonomy", "convert", str(tmp_path / "v3.json"), str(tmp_path / "t.csv")]) == 0
    back = load_taxonomy(tmp_path / "t.csv")
    assert back.category_names() == vehicles.category_names()
    assert sorted(back.parents("amph")) == ["boat", "car"]


def test_build_from_synsets_and_link(tmp_path, capsys):
    out = tmp_path / "small.json"
    assert main(["taxonomy", "build", "--synsets", "cat.n.01", "dog", "-o", str(out)]) == 0
    assert load_taxonomy(out).category_names() == {1: "cat", 2: "dog"}
    names = tmp_path / "names.txt"
    names.write_text("aardvark\nrefrigerator magnet\n")
    report = tmp_path / "report.json"
    assert (
        main(
            [
                "taxonomy",
                "build",
                "--link",
                str(names),
                "-o",
                str(tmp_path / "l.json"),
                "--report",
                str(report),
            ]
        )
        == 0
    )
    assert "linked 1 of 2 categories" in capsys.readouterr().out
    assert json.loads(report.read_text())["counts"] == {"unique-name": 1, "unmatched": 1}


def test_embed_with_tiny_model(tmp_path, capsys):
    out = tmp_path / "emb.pt"
    first = main(
        [
            "taxonomy",
            "embed",
            str(V3DET_NAMES),
            "--model",
            "vastdet-tiny-clip",
            "--template",
            "a photo of a {}.",
            "-o",
            str(out),
        ]
    )
    assert first == 0 and "(13204, 64)" in capsys.readouterr().out


def test_errors_exit_2_with_the_message(tmp_path, capsys):
    bad = tmp_path / "cyc.json"
    bad.write_text(
        json.dumps(
            {
                "format": "vastdet.taxonomy",
                "version": 1,
                "nodes": [
                    {"id": "a", "name": "a", "parents": ["b"]},
                    {"id": "b", "name": "b", "parents": ["a"]},
                ],
            }
        )
    )
    assert main(["taxonomy", "show", str(bad)]) == 2
    assert "cycle: " in capsys.readouterr().err


def test_paths_that_are_not_runs_say_what_they_are_and_what_to_give(tmp_path, capsys):
    """eval, export, predict and plot name a missing path, a run's checkpoint folder or one
    checkpoint, a shard folder and a run without a complete checkpoint for what they are."""
    from vastdet.cli import main

    run = tmp_path / "runs" / "tiny"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    shards = tmp_path / "syn" / "shards" / "val"
    shards.mkdir(parents=True)
    (shards / "manifest.json").write_text("{}")
    unfinished = tmp_path / "runs" / "young"
    (unfinished / "checkpoints" / "step_00000002.partial").mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    cases = {
        tmp_path / "runs" / "nope": f"{tmp_path / 'runs' / 'nope'} does not exist: give a run "
        "folder (a training config's output_dir) or an exported model file",
        run / "checkpoints": f"{run / 'checkpoints'} is the checkpoint folder of run {run}: "
        f"give the run folder, {run}",
        run / "checkpoints" / "step_00000004": f"is one checkpoint of run {run}: give the run "
        f"folder ({run}; `vastdet export --tag step_00000004` picks this one)",
        tmp_path / "syn": f"{tmp_path / 'syn'} holds shards, not a trained run",
        unfinished: f"run {unfinished} has no complete checkpoint yet (1 partial, cut short)",
    }
    for path, message in cases.items():
        for command in (
            ["eval", str(path), "--shards", str(shards), "-o", str(tmp_path / "out")],
            ["export", str(path), "-o", str(tmp_path / "model.pt")],
            ["predict", str(shards / "manifest.json"), "--checkpoint", str(path), "-o", "x.json"],
        ):
            assert main(command) == 2, command
            assert message in capsys.readouterr().err, command
    assert main(["plot", str(tmp_path / "syn")]) == 2
    assert "holds shards, not a trained run" in capsys.readouterr().err
    assert main(["plot", str(run)]) == 2  # a run folder, nothing logged yet
    assert "metrics.jsonl has no records yet" in capsys.readouterr().err

"""The DeepSpeed training engine: one process with resume, and two ranks under ZeRO-2 and ZeRO-3
on gloo where batches without targets occur (every parameter must take part on every rank)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipelines.shards import write_shards
from pipelines.synthetic import SynthConfig, SyntheticRenderer, make_records
from taxonomy import Node, Taxonomy, save_taxonomy
from vastdet.evaluation.predict import DRAW_MIN_SIDE, category_names, clip_xywh
from vastdet.runtime.metrics import evaluation_rows, read_metrics, training_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """24 small synthetic images, about half of them without objects."""
    root = tmp_path_factory.mktemp("engine")
    tax = Taxonomy(
        [Node("r", "thing", category_id=1)]
        + [Node(f"c{i}", f"kind {i}", ("r",), i) for i in range(2, 6)]
    )
    save_taxonomy(tax, root / "tax.json")
    cfg = SynthConfig(
        num_train=24, num_val=0, min_side=64, max_side=96, min_objects=0, max_objects=2, seed=3
    )
    val_cfg = SynthConfig(
        num_train=0, num_val=5, min_side=64, max_side=96, min_objects=0, max_objects=2, seed=4
    )
    records = {"train": make_records(tax, cfg)["train"], "val": make_records(tax, val_cfg)["val"]}
    renderers = {"train": SyntheticRenderer(tax, cfg), "val": SyntheticRenderer(tax, val_cfg)}
    for split, per_shard in (("train", 8), ("val", 4)):  # val: uneven shards of 4 and 1
        write_shards(
            records[split],
            renderers[split],
            root / split,
            max_samples=per_shard,
            workers=1,
            categories_file=root / "tax.json",
            progress=False,
        )
    (root / "images").mkdir()
    for record in records["val"]:
        (root / "images" / f"{record.image_id}.png").write_bytes(renderers["val"](record))
    return root


def config(dataset: Path, out: Path, evaluate: bool = False, **overrides) -> Path:
    cfg = {
        "model": "dino_tiny",
        "data": {
            "train_shards": str(dataset / "train"),
            "batch_size": 1,
            "num_workers": 1,
            "shuffle_buffer": 8,
            "transforms": {"scales": [64, 80], "max_size": 112, "crop_resize": []},
        },
        "optim": {"lr": 1e-3, "clip_grad": 1.0},
        "steps": 8,
        "steps_per_epoch": 5,
        "log_every": 1,
        "checkpoint_every": 4,
        "zero_stage": 0,
        "output_dir": str(out),
    }
    if evaluate:  # the val shards at the end of the run
        cfg["data"]["val_shards"] = str(dataset / "val")
        cfg["eval"] = {"batch_size": 1, "num_workers": 1}
    cfg.update(overrides)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(
    args: list[str], world: int, wrap: dict[int, list[str]] | None = None, **popen
) -> list[subprocess.Popen]:
    """`python -m ARGS` started as `world` ranks on loopback (text pipes as `popen` says); a
    rank in `wrap` runs under that command prefix."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    return [
        subprocess.Popen(
            [*(wrap or {}).get(r, []), sys.executable, "-m", *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=REPO,
            text=True,
            **popen,
        )
        for r in range(world)
    ]


def finish(
    procs: list[subprocess.Popen], timeout: float, stream: str = "stderr"
) -> tuple[list, list[str]]:
    """Each process's exit code and its `stream` ("stdout" or "stderr"); one still running
    after `timeout` seconds in all is killed and its code given as None."""
    deadline, part = time.monotonic() + timeout, ("stdout", "stderr").index(stream)
    codes, texts = [], []
    for p in procs:
        try:
            texts.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[part])
            codes.append(p.returncode)
        except subprocess.TimeoutExpired:
            p.kill()
            texts.append(p.communicate()[part])
            codes.append(None)
    return codes, texts


def launch(args: list[str], world: int) -> list[str]:
    """`python -m ARGS` as `world` ranks on loopback; every rank must exit 0. Their outputs."""
    procs = start_ranks(args, world, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    codes, outputs = finish(procs, timeout=300, stream="stdout")
    for code, out in zip(codes, outputs):
        assert code == 0, out[-3000:]
    return outputs


def run(config_path: Path, world: int = 1) -> list[dict]:
    """Run `python -m vastdet.engine.train` as `world` ranks; returns the training rows of its
    metrics.jsonl."""
    launch(["vastdet.engine.train", "--config", str(config_path)], world)
    cfg = yaml.safe_load(config_path.read_text())
    return training_rows(cfg["output_dir"])


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(dataset, tmp_path):
    straight = run(config(dataset, tmp_path / "straight", evaluate=True))
    assert [m["step"] for m in straight] == list(range(1, 9))
    stopped = config(dataset, tmp_path / "stopped", steps=4)
    first = run(stopped)
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    resumed = run(config(dataset, tmp_path / "stopped", steps=8))  # same folder: resumes at 4
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a, b)
    assert all(m["skipped_steps"] == 0 for m in resumed)
    # export: the plain file holds exactly the weights DeepSpeed saved, and loads without it
    from vastdet.cli import main

    exported = tmp_path / "model.pt"
    assert main(["export", str(tmp_path / "straight"), "-o", str(exported)]) == 0
    payload = torch.load(exported, map_location="cpu", weights_only=True)
    saved = torch.load(
        tmp_path / "straight" / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=True,
    )["module"]
    assert set(payload["model"]) == set(saved)
    assert all(torch.equal(payload["model"][k], saved[k]) for k in saved)
    # the same model as safetensors: the same tensors, and it evaluates as the PyTorch file
    safe = tmp_path / "model.safetensors"
    assert main(["export", str(tmp_path / "straight"), "-o", str(safe)]) == 0
    from safetensors.torch import load_file

    tensors = load_file(safe)
    assert set(tensors) == set(saved) and all(torch.equal(tensors[k], saved[k]) for k in saved)
    from vastdet.runtime.loading import load_model

    model, _, safe_config = load_model(safe)
    assert safe_config == json.loads(payload["config"])
    assert model.category_ids.tolist() == [1, 2, 3, 4, 5]
    assert main(["plot", str(tmp_path / "straight")]) == 0
    assert (tmp_path / "straight" / "plots" / "losses.png").stat().st_size > 1000
    check_eval_and_predict(dataset, tmp_path, tmp_path / "straight", exported)


def test_a_run_killed_between_logging_and_saving_resumes_without_repeating_metrics(
    dataset, tmp_path
):
    """Killed after logging steps 5-8 (and mid-line) but before the step-8 checkpoint: the
    resumed run starts at 4 again, and metrics.jsonl keeps each step once."""
    out = tmp_path / "killed"
    first = run(config(dataset, out, steps=8, checkpoint_every=4))
    shutil.rmtree(out / "checkpoints" / "step_00000008")
    with (out / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 9, "loss": 1.')  # the line a kill cut short
    resumed = run(config(dataset, out, steps=8, checkpoint_every=4))
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(first, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a, b)


def eval_command(model: Path, val: Path, out: Path, world: int) -> dict:
    """`vastdet eval` as `world` processes; rank 0's metrics.json."""
    args = ["vastdet.cli", "eval", str(model), "--shards", str(val)]
    args += ["-o", str(out), "--batch-size", "1", "--workers", "1"]
    outputs = launch(args, world)
    assert "AP50" in outputs[-1] or world > 1
    return json.loads((out / "metrics.json").read_text())


def check_eval_and_predict(dataset: Path, tmp_path: Path, run_dir: Path, exported: Path) -> None:
    """The engine's end-of-run evaluation, `vastdet eval` of the exported file on one and on two
    processes (uneven val shards) and of the run folder all agree; `vastdet predict` on the val
    images as files gives the detections evaluation scored."""
    from vastdet.cli import main

    in_training = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert in_training["images"] == 5 and in_training["detections"] == 5 * 100
    assert 0 <= in_training["AP"] <= 1
    for model, world in ((exported, 1), (exported, 2), (run_dir, 1)):
        got = eval_command(model, dataset / "val", tmp_path / f"eval{world}{model.name}", world)
        assert got.keys() == in_training.keys()
        for k, v in in_training.items():
            assert got[k] == pytest.approx(v, abs=1e-6), (model, world, k)
    scored = json.loads((run_dir / "eval" / "results.json").read_text())
    images = sorted((dataset / "images").glob("*.png"))
    results = tmp_path / "predicted.json"
    draw = tmp_path / "drawn"
    args = ["predict", *map(str, images), "--checkpoint", str(exported), "-o", str(results)]
    # one image per batch, as evaluated: padding to a batch's largest image changes the features
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*args, "--draw", str(draw), "--threshold", "0", "--batch-size", "1"]) == 0
    assert f"{5 * 100} detections scored >= 0.0 and are drawn in {draw}" in printed.getvalue()
    predicted = json.loads(results.read_text())
    drawings = sorted(draw.glob("*.png"))
    assert len(drawings) == len(images)
    assert all(max(Image.open(p).size) == DRAW_MIN_SIDE for p in drawings)  # small: scaled up
    for position, path in enumerate(images):
        mine = [r for r in predicted if r["image_id"] == position]
        theirs = [r for r in scored if r["image_id"] == int(path.stem)]
        assert len(mine) == len(theirs) == 100  # eval's default protocol (COCO) keeps 100
        width, height = Image.open(path).size
        for a, b in zip(mine, theirs):
            assert a["category_id"] == b["category_id"]
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            assert a["bbox"] == pytest.approx(clip_xywh(b["bbox"], width, height), abs=1e-3)
            x, y, w, h = a["bbox"]
            assert 0 <= x <= x + w <= width + 1e-3 and 0 <= y <= y + h <= height + 1e-3
    # told otherwise, predict keeps that many; a threshold above every score says what to try
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*args, "--max-detections", "7", "--draw", str(draw), "--threshold", "2"]) == 0
    kept = json.loads(results.read_text())
    assert len(kept) == 5 * 7
    best = max(r["score"] for r in kept)
    hint = printed.getvalue().splitlines()[-1]
    assert hint.startswith(f"the best detection scored {best:.3f}: ") and "--threshold 0." in hint
    suggested = float(hint.rsplit("--threshold ", 1)[1])
    assert 0 < suggested < best
    # the run names no category file: labels take the names from its training shards' manifest
    run_config = json.loads((run_dir / "config.json").read_text())
    assert run_config["data"]["categories"] is None
    assert category_names(run_config) == {
        1: "thing",
        2: "kind 2",
        3: "kind 3",
        4: "kind 4",
        5: "kind 5",
    }
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "broken.png"),
                "--checkpoint",
                str(exported),
                "-o",
                str(results),
            ]
        )
        == 2
    )


def test_a_run_folder_is_not_resumed_under_other_run_settings(dataset, tmp_path):
    """A config whose model or optimiser differs from the one a run folder's checkpoints were
    made with is refused on every rank (exit 2, no rank left waiting), naming what changed;
    the folder's config and checkpoints stay as they were. Resuming would have gone on with
    the old run and written the new config over its record."""
    from vastdet.runtime.checkpoints import complete_tags

    out = tmp_path / "run"
    run(config(dataset, out, steps=2, checkpoint_every=2))
    record = (out / "config.json").read_text()
    changed = config(dataset, out, steps=4, optim={"lr": 2e-3, "clip_grad": 1.0})
    procs = start_ranks(
        ["vastdet.cli", "train", "--config", str(changed)], 2,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    codes, errors = finish(procs, timeout=300)
    assert codes == [2, 2], errors[0][-2000:]
    assert "optim.lr: 0.001 -> 0.002" in errors[0] and "Traceback" not in errors[0]
    assert "holds a run started with other settings" in errors[1]
    assert (out / "config.json").read_text() == record
    assert complete_tags(out / "checkpoints") == ["step_00000002"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_train_under_zero(dataset, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    metrics = run(
        config(dataset, out, evaluate=True, zero_stage=stage, steps=20, checkpoint_every=20),
        world=2,
    )
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 20 and all(l == l for l in losses)  # noqa: E741 - finite, no NaN
    # batches differ step to step (half the images are empty) and denoising noise is fresh:
    # compare the means of the first and last quarters
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    shards = sorted(p.name for p in (out / "checkpoints" / "step_00000020").iterdir())
    assert any("zero_pp_rank_1" in name for name in shards), (
        shards
    )  # both ranks hold a ZeRO partition
    # evaluation through the partitioned engine: 4 images on one rank, 1 and 3 fillers on the other
    evaluation = json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluation["images"] == 5 and evaluation["detections"] == 5 * 100
    check_consolidation(out / "checkpoints" / "step_00000020")


def check_consolidation(tag: Path) -> None:
    """Our data-only consolidation of a ZeRO checkpoint equals DeepSpeed's own (run here only
    on files this test wrote), and holds every tensor the model has: at stage 1 DeepSpeed's
    leaves out the frozen backbone parameters, which the module's copy supplies."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vastdet.config import load_config
    from vastdet.models.build import ModelConfig, build_model
    from vastdet.runtime.partitions import consolidated_weights

    ours = consolidated_weights(tag)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its progress
        reference = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    assert set(reference) <= set(ours)
    for name, value in reference.items():
        assert torch.equal(ours[name], value), name
    model, _, _ = build_model(
        load_config("dino_tiny", ModelConfig), [1, 2, 3, 4, 5], restoring=True
    )
    assert set(ours) == set(model.state_dict())
    model.load_state_dict(ours, strict=True)


@pytest.mark.parametrize("selection", ["flat", "beam"])
def test_cq_dino_two_stages_hand_over_and_train_under_zero3(dataset, tmp_path, selection):
    """Stage 1 (selector) on one rank; stage 2 starts from it on two ZeRO-3 ranks, one of whose
    batches can be empty, with the backbone and category module at 1% learning rate; the
    end-of-run evaluation reports AR^C next to AP. Taxonomy-guided selection hands over and
    trains the same way (its tree travels with the weights)."""
    stage1 = tmp_path / "stage1"
    choice = {"selection": selection, "beam_width": 1}
    run(
        config(
            dataset, stage1, model={"preset": "cq_dino_tiny_stage1", **choice},
            steps=4, checkpoint_every=4,
        )
    )  # fmt: skip
    low = {"pattern": r"^(backbone|category_queries|selector)\.", "lr_mult": 0.01}
    stage2 = tmp_path / "stage2"
    metrics = run(
        config(
            dataset,
            stage2,
            evaluate=True,
            model={"preset": "cq_dino_tiny", "init_from": str(stage1), **choice},
            optim={"lr": 1e-3, "clip_grad": 1.0, "param_groups": [low]},
            zero_stage=3,
            steps=6,
            checkpoint_every=6,
        ),
        world=2,
    )
    first = training_rows(stage1)[-1]
    assert set(first) >= {"loss", "loss_sel"} and "loss_bbox" not in first
    assert len(metrics) == 6 and all(m["loss"] == m["loss"] for m in metrics)
    assert {"loss_sel", "loss_ce", "loss_bbox"} <= set(metrics[-1])
    assert any("diag_rho" in m for m in metrics)
    evaluation = json.loads((stage2 / "eval" / "metrics.json").read_text())
    assert evaluation["images"] == 5 and 0 <= evaluation["AR_C"] <= 1 and "AP" in evaluation
    assert 0 <= evaluation["selector_AUC_prior"] <= 1  # beside the selector's AUC


def test_a_single_process_run_opens_no_port_on_every_interface():
    """A world of one needs no rendezvous: its process group opens no store port, and nothing
    it listens on is bound to a wildcard address."""
    code = (
        "import json, psutil, torch\n"
        "from vastdet.runtime.distributed import init_distributed, prepare_deepspeed\n"
        "print(init_distributed(prepare_deepspeed()))\n"
        "torch.distributed.all_reduce(torch.ones(1))\n"
        "print(json.dumps([c.laddr.ip for c in psutil.Process().net_connections('inet')"
        " if c.status == 'LISTEN']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "(0, 1)"
    assert not {"0.0.0.0", "::"} & set(json.loads(lines[-1])), lines[-1]


def test_the_v3det_recipe_presets_load_with_a_users_data(tmp_path):
    """A user's file names the preset and adds data: nested settings merge key by key."""
    from vastdet.engine.config import load_train_config
    from vastdet.engine.train import lr_factor

    path = tmp_path / "stage2.yaml"
    path.write_text(
        "preset: cq_dino_swin_b_v3det_stage2\n"
        "model: {init_from: runs/stage1}\n"
        "data: {train_shards: shards/train}\n"
    )
    cfg = load_train_config(str(path))
    assert cfg.data.train_shards == "shards/train" and cfg.data.transforms.crop_resize == ()
    assert cfg.model.architecture == "cq_dino" and cfg.model.init_from == "runs/stage1"
    assert cfg.model.backbone == "swin_b" and cfg.model.backbone_drop_path == 0.3
    assert not cfg.model.share_heads and cfg.model.selector_layers == 2
    assert [(g.lr_mult, g.weight_decay_mult) for g in cfg.optim.param_groups] == [(0.01, 10.0)] * 2
    assert lr_factor(0, cfg.optim) == pytest.approx(0.1 + 0.9 / 1000)  # LinearLR from 0.1
    assert lr_factor(999, cfg.optim) == 1.0 and lr_factor(137256, cfg.optim) == pytest.approx(0.1)
    stage1 = tmp_path / "stage1.yaml"
    stage1.write_text("preset: cq_dino_swin_b_v3det_stage1\ndata: {train_shards: s}\n")
    first = load_train_config(str(stage1))
    assert first.model.architecture == "cq_selector" and first.optim.param_groups == []
    assert first.steps == 114380 and first.data.transforms.scales[-1] == 800


@pytest.mark.parametrize(
    "stage, model", [(2, "paq_dino_tiny"), (1, "paq_cq_dino_tiny"), (3, "paq_cq_dino_tiny")]
)
def test_paq_models_train_on_two_ranks_under_zero(dataset, tmp_path, stage, model):
    """PaQ-DINO (ZeRO-2) and PaQ-CQ-DINO (ZeRO-1, its category queries through the lean
    encoding and the table's moments in bfloat16; ZeRO-3, through autograd): pattern queries
    and one-to-many losses on two ranks whose single-image batches are often empty (about half
    the images have no object), so every parameter must take part on every rank."""
    out = tmp_path / f"paq{stage}"
    optim = {"lr": 1e-3, "clip_grad": 1.0, "table_moments": "bf16" if stage == 1 else "fp32"}
    metrics = run(
        config(dataset, out, evaluate=True, model=model, zero_stage=stage, steps=6, optim=optim),
        world=2,
    )
    assert len(metrics) == 6 and all(m["loss"] == m["loss"] for m in metrics)
    assert all("loss_o2m" in m and "loss_div" in m for m in metrics)
    if stage == 1:  # ZeRO-1 kept the table's partition of Adam moments in bfloat16
        from vastdet.runtime.partitions import load_checkpoint_file

        optim = load_checkpoint_file(
            next((out / "checkpoints").glob("step_*/zero_pp_rank_0_*optim_states.pt"))
        )
        moments = optim["optimizer_state_dict"]["base_optimizer_state"]["state"].values()
        assert {m["exp_avg"].dtype for m in moments} == {torch.float32, torch.bfloat16}
    evaluation = json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluation["images"] == 5 and 0 <= evaluation["query_gini"] <= 29 / 30
    from vastdet.cli import main

    figures = tmp_path / "figures"
    args = ["patterns", str(out), "--shards", str(dataset / "val"), "-o", str(figures)]
    # the val images hold category 3 only: 2 has nothing to match, so a note instead of a figure
    out_text = io.StringIO()
    with contextlib.redirect_stdout(out_text):
        assert main([*args, "--iou", "0", "--score", "0", "--categories", "2,3"]) == 0
    drawn = sorted(p.name for p in figures.glob("*.png"))
    assert drawn == ["patterns_category_3.png", "patterns_images_map.png"]
    assert all((figures / name).stat().st_size > 5000 for name in drawn)
    assert "kind 2 (#2): no detection with IoU > 0.0 and score > 0.0" in out_text.getvalue()
    # a category without a successful detection gets a note, not an empty figure
    empty = tmp_path / "empty"
    out_text = io.StringIO()
    with contextlib.redirect_stdout(out_text):
        assert main([*args[:-1], str(empty), "--score", "1.01", "--categories", "2"]) == 0
    assert sorted(p.name for p in empty.glob("*.png")) == ["patterns_images_map.png"]
    assert "no detection with IoU > 0.7 and score > 1.01" in out_text.getvalue()


def test_evaluation_every_few_steps_lands_in_the_metrics_and_the_plots(dataset, tmp_path):
    out = tmp_path / "curve"
    rows = run(config(dataset, out, evaluate=True, steps=6, checkpoint_every=6, eval_every=2))
    assert [m["step"] for m in rows] == list(range(1, 7))
    evaluations = evaluation_rows(out)
    assert [e["step"] for e in evaluations] == [2, 4, 6]
    assert all(0 <= e["val_AP"] <= 1 and e["val_images"] == 5 for e in evaluations)
    final = json.loads((out / "eval" / "metrics.json").read_text())
    assert final["AP"] == evaluations[-1]["val_AP"]
    from vastdet.cli import main

    assert main(["plot", str(out)]) == 0
    assert (out / "plots" / "validation_ap.png").stat().st_size > 5000
    # AP by hierarchy depth (0: every kind counts as `thing`) and by training frequency
    args = ["eval", str(out), "--shards", str(dataset / "val"), "-o", str(tmp_path / "lv")]
    assert main([*args, "--levels", "0,1", "--batch-size", "1", "--workers", "1"]) == 0
    levels = json.loads((tmp_path / "lv" / "metrics.json").read_text())
    assert levels["AP_level1"] == pytest.approx(levels["AP"], abs=1e-9)  # depth 1 = the leaves
    assert 0 <= levels["AP_level0"] <= 1 and "APr" in levels
    assert (tmp_path / "lv" / "ap_by_level.png").stat().st_size > 5000
    # TensorBoard's event files beside metrics.jsonl hold the same numbers and a few drawings
    events = tensorboard_events(out)
    assert {("train/loss", s) for s in range(1, 7)} <= set(events["scalars"])
    assert events["scalars"][("val/AP", 6)] == pytest.approx(final["AP"], abs=1e-6)
    assert {("val/detections/0", s) for s in (2, 4, 6)} <= events["images"]
    # ... as TensorBoard itself reads them (the `tensorboard` extra `make setup` installs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out)).Reload()
    assert [e.step for e in board.Scalars("val/AP")] == [2, 4, 6]
    assert board.Scalars("val/AP")[-1].value == pytest.approx(final["AP"], abs=1e-6)
    # a finished run started again has nothing to add: no new event file, the same rows
    files, before = sorted(out.glob("events.out.tfevents.*")), read_metrics(out)
    run(config(dataset, out, evaluate=True, steps=6, checkpoint_every=6, eval_every=2))
    assert sorted(out.glob("events.out.tfevents.*")) == files and read_metrics(out) == before


def tensorboard_events(run_dir: Path) -> dict:
    """{"scalars": {(tag, step): value}, "images": {(tag, step)}} from a run's event files
    (TFRecord framing: length, its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars, images = {}, set()
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    images.add((value.tag, event.step))
                else:
                    scalars[(value.tag, event.step)] = value.simple_value
    return {"scalars": scalars, "images": images}


def test_an_evaluation_made_elsewhere_ends_the_learning_curve(tmp_path):
    """A pipeline's evaluation job adds its numbers to the stage's record at the final step
    (replacing an evaluation already there), and the learning curve draws every depth."""
    from vastdet.runtime.metrics import append_evaluation
    from vastdet.runtime.plot import CHARTS, chart_keys

    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "val_AP": 0.1}, {"step": 4, "val_AP": 0.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    append_evaluation(tmp_path, 4, {"AP": 0.3, "AP_level1": 0.5, "skipped": {}})
    assert evaluation_rows(tmp_path) == [
        {"step": 2, "val_AP": 0.1},
        {"step": 4, "val_AP": 0.3, "val_AP_level1": 0.5},
    ]
    records = [{"val_AP": 0, "val_AP50_level2": 0, "val_AP_level10": 0, "val_AR_C": 0}]
    assert chart_keys(CHARTS["validation_ap.png"], records) == [
        "val_AP", "val_AP50_level2", "val_AP_level10",
    ]  # fmt: skip


def test_a_world_of_one_left_in_the_environment_needs_no_rendezvous_address():
    """A process started by one that ran a world of one inherits WORLD_SIZE=1 and RANK=0 but no
    MASTER_ADDR (nothing rendezvoused): it is a plain single process, not a broken launch."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    code = (
        "from vastdet.runtime.distributed import init_distributed, prepare_deepspeed\n"
        "print(init_distributed(prepare_deepspeed()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("(0, 1)"), done.stderr[-2000:]


def stacks_of(proc: subprocess.Popen) -> str:
    """Every thread's Python stack of a process that does not exit (run with
    PYTHONFAULTHANDLER=1: SIGABRT makes it print them as it dies), then its group killed."""
    proc.send_signal(signal.SIGABRT)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        stderr = "(no stacks within 60 s of SIGABRT)"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return stderr[-6000:]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_training_with_one_line_naming_the_checkpoint_to_resume_from(
    dataset, tmp_path, sig, code
):
    """Ctrl-C (SIGINT to the whole process group, loader workers included) or a scheduler's
    SIGTERM ends `vastdet train` with one line: the newest complete checkpoint and the command
    that resumes; no traceback from the trainer or its workers."""
    import time

    from vastdet.runtime.checkpoints import complete_tags

    out = tmp_path / "stopped"
    cfg = config(dataset, out, steps=400, checkpoint_every=2)
    # As a terminal starts its foreground job: SIGINT not ignored. A suite started in the
    # background by a non-interactive shell (`make test &`) runs with SIGINT ignored, and a
    # child inherits that, as POSIX asks; Python then installs no KeyboardInterrupt handler and
    # Ctrl-C is ignored on purpose. A handler of the test's own is reset to the default on exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vastdet.cli", "train", "--config", str(cfg)],
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "DS_ACCELERATOR": "cpu",
                "PYTHONFAULTHANDLER": "1",  # so that a hang can be shown (`stacks_of`)
            },
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 300
    while not complete_tags(out / "checkpoints"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit within 120 s of {sig.name}; where it waits:\n{stacks_of(proc)}")
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("training stopped")]
    newest = out / "checkpoints" / complete_tags(out / "checkpoints")[-1]
    assert len(lines) == 1 and f"newest complete checkpoint is {newest};" in lines[0]
    assert lines[0].endswith(f"resume with: vastdet train --config {cfg}")

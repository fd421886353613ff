"""Hostile and broken input: files that would run code, streams that would never end, numbers
that would be silently wrong, and the messages a newcomer meets. Each case is a file someone
could hand vastdet; each must end in a clear error or a counted skip."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipelines.annotations import UnusableDataError
from pipelines.loader import eval_loader, train_loader
from pipelines.shards import MANIFEST, ShardSet, write_shards
from pipelines.synthetic import SynthConfig, SyntheticRenderer, make_records
from pipelines.transforms import no_augmentation
from taxonomy import Node, Taxonomy, save_taxonomy
from vastdet.cli import main

MARKER = "vastdet-payload-ran"


class Payload:
    """Unpickling this creates a marker folder: the stand-in for any code a file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def jpeg(width: int, height: int, colour=(200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="JPEG")
    return out.getvalue()


def sample_json(image_id: int, anns: list[dict], width: int = 48, height: int = 32) -> dict:
    return {"image_id": image_id, "width": width, "height": height, "annotations": anns}


def box(bbox, category_id: int = 1) -> dict:
    return {"bbox": bbox, "category_id": category_id, "iscrowd": 0}


def raw_shards(out: Path, samples: list[tuple[bytes, dict]], per_shard: int = 100) -> Path:
    """Shards written byte for byte as given (no checks on the way in) and their manifest,
    listing every sample given."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for start in range(0, len(samples), per_shard):
        name = f"raw-{start // per_shard:06d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for image, meta in samples[start : start + per_shard]:
                key = f"{meta['image_id']:012d}"
                for member, data in ((f"{key}.jpg", image), (f"{key}.json", json.dumps(meta))):
                    data = data.encode() if isinstance(data, str) else data
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        count = len(samples[start : start + per_shard])
        entries.append({"name": name, "samples": count, "bytes": 0, "sha256": ""})
    manifest = {
        "format": "vastdet.shards/1",
        "num_samples": len(samples),
        "num_instances": 0,
        "category_images": {"1": 1},
        "category_instances": {"1": 1},
        "shards": entries,
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """A four-category taxonomy and 8 + 4 synthetic images in real shards."""
    root = tmp_path_factory.mktemp("small")
    tax = Taxonomy(
        [Node("r", "thing", category_id=1)]
        + [Node(f"c{i}", f"kind {i}", ("r",), i) for i in range(2, 5)]
    )
    save_taxonomy(tax, root / "tax.json")
    cfg = SynthConfig(num_train=8, num_val=4, min_side=48, max_side=64, max_objects=2, seed=1)
    renderer = SyntheticRenderer(tax, cfg)
    for split, records in make_records(tax, cfg).items():
        write_shards(
            records, renderer, root / split, categories_file=root / "tax.json", progress=False
        )
    return root


def train_yaml(path: Path, data: Path, out: Path, **overrides) -> Path:
    cfg = {
        "model": "dino_tiny",
        "data": {
            "train_shards": str(data / "train"),
            "batch_size": 2,
            "num_workers": 0,
            "transforms": {"scales": [48], "max_size": 64, "crop_resize": []},
        },
        "steps": 2,
        "steps_per_epoch": 2,
        "zero_stage": 0,
        "output_dir": str(out),
    }
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- no code runs from a data file ------------------------------------------------------------


def crafted_run_folder(root: Path, marker: Path) -> Path:
    """A run folder whose ZeRO checkpoint files carry a pickled payload beside real tensors."""
    tag = root / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    weights = {"module": {"category_ids": torch.tensor([1, 2])}, "buffer_names": []}
    torch.save(
        {**weights, "param_shapes": [], "extra": Payload(marker)},
        tag / "mp_rank_00_model_states.pt",
    )
    optim = {"optimizer_state_dict": {"zero_stage": 2, "partition_count": 1}, "x": Payload(marker)}
    torch.save(optim, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (root / "config.json").write_text(json.dumps({"model": {}, "data": {"transforms": {}}}))
    return root


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_a_crafted_run_folder_runs_no_code_and_is_refused_by_name(
    command, small_data, tmp_path, capsys
):
    marker = tmp_path / MARKER
    run = crafted_run_folder(tmp_path / "run", marker)
    args = {
        "eval": ["eval", str(run), "--shards", str(small_data / "val"), "-o", str(tmp_path / "e")],
        "predict": [
            "predict",
            str(small_data / "x.jpg"),
            "--checkpoint",
            str(run),
            "-o",
            str(tmp_path / "r.json"),
        ],  # fmt: skip
        "export": ["export", str(run), "-o", str(tmp_path / "m.pt")],
    }[command]
    (small_data / "x.jpg").write_bytes(jpeg(32, 32))
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert "refused to load" in error and "model_states.pt" in error and "os.makedirs" in error
    assert len(error.splitlines()) == 1


@pytest.mark.parametrize("how", ["init_from", "resume"])
def test_training_reads_a_crafted_checkpoint_as_data_and_refuses_it(
    how, small_data, tmp_path, capsys
):
    """`init_from: <run folder>` (stage 2 from someone's stage 1) and resuming a run folder
    someone handed over both read DeepSpeed checkpoint files: neither may unpickle them."""
    marker = tmp_path / MARKER
    if how == "init_from":
        run = crafted_run_folder(tmp_path / "given", marker)
        out = tmp_path / "mine"
        model = {"preset": "dino_tiny", "init_from": str(run)}
    else:
        out = crafted_run_folder(tmp_path / "given", marker)
        model = "dino_tiny"
    config = train_yaml(tmp_path / "train.yaml", small_data, out, model=model)
    assert main(["train", "--config", str(config)]) == 2
    assert not marker.exists()
    assert "refused to load" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name",
    ["pipe:mkdir {marker}; cat raw-000000.tar", "/etc/passwd", "../raw-000000.tar", "s3://b/x.tar"],
)
def test_a_manifest_names_only_plain_files_beside_it(name, tmp_path):
    marker = tmp_path / MARKER
    shards = raw_shards(tmp_path / "s", [(jpeg(48, 32), sample_json(1, []))])
    manifest = json.loads((shards / MANIFEST).read_text())
    manifest["shards"][0]["name"] = name.format(marker=marker)
    (shards / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a plain file name inside the manifest's folder"):
        list(eval_loader(ShardSet.open(shards), 1, no_augmentation(), num_workers=0))
    assert not marker.exists()


def test_shard_writing_reads_no_file_outside_the_image_root(tmp_path, capsys):
    secret = b"\xff\xd8\xff" + b"outside the image root"
    (tmp_path / "secret.jpg").write_bytes(secret)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.jpg").write_bytes(jpeg(48, 32))
    annotations = {
        "images": [
            {"id": 1, "file_name": "ok.jpg", "width": 48, "height": 32},
            {"id": 2, "file_name": "../secret.jpg", "width": 48, "height": 32},
            {"id": 3, "file_name": str(tmp_path / "secret.jpg"), "width": 48, "height": 32},
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    base = ["data", "shard", "--annotations", str(tmp_path / "ann.json")]
    base += ["--images", str(tmp_path / "images"), "-o", str(tmp_path / "s")]
    assert main(base) == 2
    assert "file outside image root" in capsys.readouterr().err
    assert main([*base, "--on-error", "skip"]) == 0
    assert "skipped 2 x file outside image root" in capsys.readouterr().out
    shard_bytes = b"".join(p.read_bytes() for p in (tmp_path / "s").glob("*.tar"))
    assert secret not in shard_bytes and ShardSet.open(tmp_path / "s").num_samples == 1


# --- nothing hangs ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1])
def test_training_on_shards_of_corrupt_images_stops_and_names_them(workers, tmp_path):
    broken = b"\xff\xd8\xff\xe0" + bytes(200)  # a JPEG's magic bytes, then nothing decodable
    samples = [(broken, sample_json(i, [box([1, 1, 8, 8])])) for i in range(1, 31)]
    shards = raw_shards(tmp_path / "s", samples, per_shard=10)
    loader = train_loader(
        shards, 2, 5, no_augmentation(), repeat_threshold=None, shuffle_buffer=4,
        num_workers=workers, rank=0, world_size=1,
    )  # fmt: skip
    with pytest.raises(
        UnusableDataError, match=r"samples in a row were unusable \(corrupt image"
    ) as err:
        list(loader)
    assert "raw-00000" in str(err.value) and "Traceback" not in str(err.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("steps_per_epoch", 0),
        ("steps", -5),
        ("data.batch_size", 0),
        ("checkpoint_every", 0),
        ("log_every", 0),
        ("data.num_workers", -1),
        ("grad_accum", 0),
        ("optim.warmup_steps", -1),
    ],
)
def test_every_count_in_a_training_config_is_checked_on_load(key, value, small_data, tmp_path):
    from vastdet.config import ConfigError
    from vastdet.engine.config import load_train_config

    path = train_yaml(tmp_path / "bad.yaml", small_data, tmp_path / "run")
    cfg = yaml.safe_load(path.read_text())
    section, _, name = key.rpartition(".")
    (cfg.setdefault(section, {}) if section else cfg)[name] = value
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=rf"bad\.yaml: {key} must be at least"):
        load_train_config(str(path))


# --- no number is silently wrong -----------------------------------------------------------------


BAD_SAMPLES = {
    "non-finite box": sample_json(11, [box([1, 1, float("nan"), 4])]),
    "zero-area box": sample_json(12, [box([1, 1, 0, 4])]),
    "negative box": sample_json(13, [box([10, 10, -5, 4])]),
    "box outside image": sample_json(14, [box([60, 40, 5, 5])]),
    "unknown category id": sample_json(15, [box([1, 1, 5, 5], category_id=99)]),
    "image size mismatch": sample_json(16, [box([1, 1, 5, 5])], width=64),
}
GOOD_SAMPLES = [
    sample_json(1, [box([2, 3, 10, 8], 2)]),
    sample_json(2, [box([40, 20, 20, 20], 3)]),  # past the right and bottom edges: clipped
]


def mixed_shards(root: Path) -> Path:
    samples = [(jpeg(48, 32), meta) for meta in [*GOOD_SAMPLES, *BAD_SAMPLES.values()]]
    return raw_shards(root, samples, per_shard=3)


def test_bad_ground_truth_in_shards_is_skipped_and_counted_by_kind(tmp_path):
    shards = ShardSet.open(mixed_shards(tmp_path / "s"))
    loader = eval_loader(shards, 2, no_augmentation(), num_workers=1, categories=[1, 2, 3])
    targets = [t for b in loader if not b.empty for t in b.targets]
    assert sorted(t["image_id"] for t in targets) == [1, 2]
    kinds = {"zero-area box": 2, "non-finite box": 1, "box outside image": 1}
    kinds |= {"unknown category id": 1, "image size mismatch": 1}
    assert loader.skipped() == kinds  # the negative width counts as zero area
    clipped = next(t for t in targets if t["image_id"] == 2)["annotations"][0]["bbox"]
    assert clipped == [40.0, 20.0, 8.0, 12.0]
    training = train_loader(
        shards, 2, 4, no_augmentation(), repeat_threshold=None, shuffle_buffer=2,
        num_workers=0, rank=0, world_size=1, categories=[1, 2, 3],
    )  # fmt: skip
    for batch in training:
        for t in batch.targets:
            assert t["image_id"] in (1, 2)
            assert torch.isfinite(t["boxes"]).all() and (t["boxes"][:, 2:] > 0).all()


def test_evaluation_that_reads_fewer_images_than_listed_fails_with_the_counts(tmp_path):
    """Bad samples, and a shard cut short, leave images unevaluated: the metrics say how many,
    and the evaluation fails unless partial evaluation is allowed."""
    from vastdet.config import load_config
    from vastdet.evaluation import IncompleteEvaluationError
    from vastdet.evaluation.runner import EvalConfig, evaluate_model
    from vastdet.models.build import ModelConfig, build_model

    shards = mixed_shards(tmp_path / "s")
    extra = raw_shards(tmp_path / "t", [(jpeg(48, 32), sample_json(30 + i, [])) for i in range(3)])
    truncated = (extra / "raw-000000.tar").read_bytes()
    (shards / "raw-000009.tar").write_bytes(truncated[: len(truncated) // 2])
    manifest = json.loads((shards / MANIFEST).read_text())
    manifest["shards"].append({"name": "raw-000009.tar", "samples": 3, "bytes": 0, "sha256": ""})
    manifest["num_samples"] += 3
    (shards / MANIFEST).write_text(json.dumps(manifest))
    torch.manual_seed(0)
    model, _, post = build_model(load_config("dino_tiny", ModelConfig), [1, 2, 3])
    model.eval()

    def evaluate(cfg: EvalConfig, out: Path):
        return evaluate_model(
            model, post, [1, 2, 3], ShardSet.open(shards), no_augmentation(), cfg, "cpu", None, out
        )

    with pytest.raises(IncompleteEvaluationError, match="evaluated [34] of the 11 images"):
        evaluate(EvalConfig(batch_size=2, num_workers=1), tmp_path / "strict")
    written = json.loads((tmp_path / "strict" / "metrics.json").read_text())
    assert written["images_expected"] == 11 and written["images_evaluated"] < 11
    assert (
        written["skipped"]["zero-area box"] == 2
        and written["skipped"]["unreadable shard data"] == 1
    )
    metrics, _ = evaluate(EvalConfig(batch_size=2, num_workers=1, allow_partial=True), None)
    assert metrics["images_evaluated"] == written["images_evaluated"]


# --- messages and a newcomer's path ----------------------------------------------------------


def test_yaml_1_1_exponent_floats_are_read_as_numbers(small_data, tmp_path):
    from vastdet.config import ConfigError
    from vastdet.engine.config import load_train_config

    path = train_yaml(tmp_path / "t.yaml", small_data, tmp_path / "run")
    path.write_text(path.read_text() + "optim: {lr: 1e-4, weight_decay: 5.0e-2}\n")
    cfg = load_train_config(str(path))
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.05
    path.write_text(path.read_text().replace("steps: 2\n", "steps: 1e3\n"))
    with pytest.raises(ConfigError, match="steps must be int"):
        load_train_config(str(path))


@pytest.mark.parametrize(
    "content, says",
    [
        (b"steps: [1, 2\n", "not valid YAML at line 2"),
        ("steps: 5 # caf\xe9\n".encode("latin-1"), "not a UTF-8 text file"),
    ],
)
def test_an_unreadable_config_is_one_line_naming_the_file(content, says, tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_bytes(content)
    assert main(["train", "--config", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(path) in error and says in error


def test_inspect_draws_around_a_corrupt_image_and_says_so(tmp_path, capsys):
    samples = [(jpeg(48, 32), sample_json(1, [box([2, 2, 9, 9])]))]
    samples.append((b"\xff\xd8\xff" + bytes(64), sample_json(2, [])))
    shards = raw_shards(tmp_path / "s", samples)
    assert main(["data", "inspect", str(shards), "--png", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "unreadable, skipped: unreadable sample 1" in out and (tmp_path / "p.png").is_file()
    only_bad = raw_shards(tmp_path / "b", samples[1:])
    assert main(["data", "inspect", str(only_bad), "--png", str(tmp_path / "q.png")]) == 2
    assert "no readable samples" in capsys.readouterr().err


def test_random_initialisation_is_announced_only_when_it_is_true(caplog):
    from vastdet.config import load_config
    from vastdet.models.build import ModelConfig, build_model

    cfg = load_config("cq_dino_tiny", ModelConfig)
    with caplog.at_level("WARNING"):
        build_model(cfg, [1, 2, 3], restoring=True)
        build_model(cfg, [1, 2, 3], restoring=True, weights_follow=True)
    assert "randomly initialised" not in caplog.text
    with caplog.at_level("WARNING"):
        build_model(load_config("dino_tiny", ModelConfig), [1, 2, 3])  # the shipped weights
    assert "randomly initialised" not in caplog.text
    from vastdet.config import from_dict

    scratch = from_dict(ModelConfig, {"preset": "dino_tiny", "backbone_weights": None})
    with caplog.at_level("WARNING"):
        build_model(scratch, [1, 2, 3])
    assert "backbone resnet18 has no weights file: randomly initialised" in caplog.text


def test_a_shard_folder_moves_with_its_category_file(tmp_path):
    tax = Taxonomy([Node("r", "thing", category_id=1)])
    save_taxonomy(tax, tmp_path / "a" / "tax.json")
    cfg = SynthConfig(num_train=2, num_val=0, min_side=32, max_side=40)
    records = make_records(tax, cfg)["train"]
    write_shards(
        records, SyntheticRenderer(tax, cfg), tmp_path / "a" / "shards", progress=False,
        categories_file=tmp_path / "a" / "tax.json",
    )  # fmt: skip
    assert json.loads((tmp_path / "a" / "shards" / MANIFEST).read_text())["categories_file"] == (
        "../tax.json"
    )
    (tmp_path / "a").rename(tmp_path / "moved")
    found = ShardSet.open(tmp_path / "moved" / "shards").categories_file
    assert found is not None and found.resolve() == (tmp_path / "moved" / "tax.json").resolve()


def test_the_v3det_category_files_ship_inside_the_repository():
    from conftest import V3DET_CAT_INFO, V3DET_NAMES

    repo = Path(__file__).resolve().parents[1]
    for path in (V3DET_NAMES, V3DET_CAT_INFO):
        assert path.is_file() and repo in path.resolve().parents

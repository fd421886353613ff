"""The cluster path's small parts, by hand-worked cases: the driver's progress lines and time
left, where a location points (paths, URLs, pipes), a pipeline config that cannot run, and
which files of a checkpoint each rank reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.progress import StageClock, duration, progress_line
from pipelines import sources


def test_time_left_counts_only_the_steps_seen_by_the_driver():
    clock = StageClock()
    assert clock.eta("stage2", 40, 100, now=10.0) is None  # a resumed run's first row
    assert clock.eta("stage2", 50, 100, now=30.0) == pytest.approx(100.0)  # 10 steps in 20 s
    assert clock.eta("stage1", 5, 10, now=30.0) is None  # each stage has its own clock
    line = progress_line(
        "stage2", {"step": 50, "steps": 100, "loss": 1.23456, "images_per_s": 7.04}, 100.0
    )
    assert line == "stage2  step     50/100  loss 1.2346  7.0 images/s  ETA 1m40s"
    assert duration(3725) == "1h02m" and duration(-3) == "0m00s"


def test_locations_are_paths_urls_or_pipes():
    assert not sources.is_url("/data/shards") and not sources.is_url("file:///data/shards")
    assert sources.is_url("s3://bucket/v3det") and sources.is_url("pipe:cat x.tar")
    assert sources.local_path("file:///data/x.tar") == Path("/data/x.tar")
    assert sources.local_path("https://host/x.tar") is None
    assert sources.join("https://host/v3det/val/", "../tax.json") == "https://host/v3det/tax.json"
    assert sources.join("s3://b/val", "shard-000.tar") == "s3://b/val/shard-000.tar"
    assert sources.parent("gs://b/val/manifest.json") == "gs://b/val"
    with pytest.raises(ValueError, match="pipe"):
        sources.join("pipe:cat manifest.json", "shard.tar")


def test_local_sources_read_and_report_missing_files(tmp_path):
    (tmp_path / "a.json").write_bytes(b"{}")
    assert sources.read_bytes(tmp_path / "a.json") == b"{}"
    assert sources.local_copy(str(tmp_path / "a.json")) == tmp_path / "a.json"
    assert sources.exists(tmp_path / "a.json") and not sources.exists(tmp_path / "b.json")
    with pytest.raises(FileNotFoundError):
        sources.read_bytes(f"file://{tmp_path}/b.json")


def stage(out: Path, preset: str, **extra) -> dict:
    return {"model": preset, "data": {"train_shards": "x"}, "output_dir": str(out), **extra}


def test_pipeline_configs_that_cannot_run_say_why(tmp_path):
    from cluster.pipeline import load_pipeline
    from vastdet.config import ConfigError

    def load(settings):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(settings))
        return load_pipeline(path)

    s1, s2 = stage(tmp_path / "s1", "cq_dino_tiny_stage1"), stage(tmp_path / "s2", "cq_dino_tiny")
    with pytest.raises(ConfigError, match="stage1 must train a cq_selector"):
        load({"stage1": s2, "stage2": s2})
    with pytest.raises(ConfigError, match="evaluation needs val shards"):
        load({"stage1": s1, "stage2": s2})
    cfg = load({"stage1": s1, "stage2": s2, "evaluation": {"enabled": False}})
    assert cfg.run_dir == str(tmp_path) and cfg.name == tmp_path.name
    assert cfg.stage2.eval_at_end  # without the evaluation step stage 2 evaluates itself
    cfg = load({"stage1": s1, "stage2": {**s2, "data": {"train_shards": "x", "val_shards": "v"}}})
    assert not cfg.stage2.eval_at_end  # the pipeline's own step does it


def test_each_rank_reports_the_checkpoint_files_it_wrote(tmp_path):
    from cluster.workers import owned_files

    names = [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero_pp_rank_12_mp_rank_00_optim_states.pt",
    ]
    for name in names:
        (tmp_path / name).touch()
    assert [p.name for p in owned_files(tmp_path, 0)] == names[:2]
    assert [p.name for p in owned_files(tmp_path, 1)] == [names[2]]
    assert [p.name for p in owned_files(tmp_path, 12)] == [names[3]]


def test_the_demo_table_sets_the_selector_beside_what_ignoring_the_image_keeps():
    from cluster.demo import report

    evaluation = {"AP": 0.1, "AR_C": 0.91, "AR_C_prior": 0.64, "selector_AUC": 0.97}
    evaluation["selector_AUC_prior"] = 0.88
    lines = report({**evaluation, "images_evaluated": 100}, {"AP": 0.0002}, 1182, "mammal.n.01")
    table = {line[:30].strip(): line[30:].split() for line in lines[3:]}
    assert table["AP (the categories: leaves)"] == ["0.1000", "0.0002"]
    assert table["AR^C (C' = 30 kept)"] == ["0.9100", "0.6400"]  # beside the frequency prior
    assert table["selector AUC"] == ["0.9700", "0.8800"]  # beside the prior's, not chance


def test_the_demo_writes_full_colour_jpegs_and_feeds_stage_1_eight_images_a_worker(tmp_path):
    """The demo's selector learns from the colour of small objects' textures, which 4:2:0 JPEGs
    blur, and from many images per category: its shards are 4:4:4 (Pillow's sampling code 0)
    and stage 1 takes 8 images a worker and step where stage 2 takes 2."""
    import io
    import tarfile

    from PIL import Image, JpegImagePlugin

    from cluster.demo import BATCH1, pipeline_config, prepare_data

    paths = prepare_data(tmp_path, "canine.n.02", 6, 2, None)
    samplings = set()
    for shard in sorted(paths[2].glob("*.tar")) + sorted(paths[3].glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                    samplings.add(JpegImagePlugin.get_sampling(image))
    assert samplings == {0}
    config = pipeline_config(tmp_path, *paths, 20, 20)
    assert config["stage1"]["data"]["batch_size"] == BATCH1 == 8
    assert config["stage2"]["data"]["batch_size"] == 2

"""The cluster examples are what they claim: Ray's own schema accepts the launcher file, and the
V3Det pipeline loads as a pipeline configuration with the released recipe on GPUs."""

from __future__ import annotations

from pathlib import Path

import yaml

EXAMPLES = Path(__file__).parent.parent / "cluster" / "examples"


def test_launcher_file_passes_rays_cluster_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((EXAMPLES / "aws_gpu_cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on an unknown or ill-typed field
    assert config["available_node_types"]["gpu_worker"]["min_workers"] == 2
    assert any("RAY_AUTH_MODE=token" in o for o in config["docker"]["run_options"])


def test_v3det_pipeline_is_the_released_recipe_on_gpus():
    from cluster.pipeline import load_pipeline

    cfg = load_pipeline(EXAMPLES / "v3det_swin_b.yaml")
    assert cfg.use_gpu and cfg.num_workers * cfg.stage2.data.batch_size == 16  # released batch
    assert cfg.stage1.model.architecture == "cq_selector"
    assert cfg.stage2.model.architecture == "cq_dino" and cfg.stage2.model.num_selected == 100
    assert cfg.stage2.steps == 274512 and cfg.stage2.eval_at_end is False  # the eval step does it
    assert cfg.evaluation.settings.protocol == "v3det"
    assert cfg.storage_path.startswith("s3://") and cfg.per_node_output

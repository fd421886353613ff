"""`train(config)`: one training function for a single process, the `deepspeed` launcher,
`torchrun` and Ray Train workers.

Rank, world size and the process group come from the environment (RANK, WORLD_SIZE,
MASTER_ADDR/PORT or an already initialised process group), never from the caller. Every rank runs
exactly `steps_per_epoch` batches per epoch (resampled shard streams), every parameter takes
part in every step (see the models), and a non-finite loss skips the step on every rank at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vastdet.config import ConfigError
from vastdet.engine.config import OptimConfig, TrainConfig, load_train_config
from vastdet.engine.threads import keep_freed_memory, set_threads
from vastdet.runtime import checkpoints
from vastdet.runtime.distributed import init_distributed, prepare_deepspeed
from vastdet.runtime.metrics import LOGGED_TERMS, RunLog, evaluation_rows, training_rows

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss."""


TABLE = "category_queries.embedding.weight"  # CQ-DINO's [C, D_text] category table


def parameter_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups by name pattern. Every parameter is decayed, as DINO and CQ-DINO's released
    code do, unless `decay_1d` is off (then norms and biases are exempt). The category table
    has a group of its own, updated a slice at a time (`vastdet.engine.optim`), its moments
    fp32 or, with `table_moments: bf16`, bfloat16."""
    patterns = [(re.compile(g.pattern), g) for g in optim.param_groups]
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = next((g for rx, g in patterns if rx.search(name)), None)
        lr_mult = rule.lr_mult if rule else 1.0
        wd_mult = rule.weight_decay_mult if rule else 1.0
        if param.ndim <= 1 and not optim.decay_1d:
            wd_mult = 0.0
        table = name == TABLE
        key = (lr_mult, wd_mult, table)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "lr_mult": lr_mult,
                "weight_decay": optim.weight_decay * wd_mult,
                "lr": optim.lr * lr_mult,
                **({"moments": optim.table_moments} if table else {}),
            },
        )
        group["params"].append(param)
    return list(groups.values())


# The settings that make a run what it is: a run folder whose checkpoints were made under other
# values of these is not resumed. The rest (steps, checkpointing, logging, evaluation, threads,
# loader workers) may change between a run's starts, and so may where files are: the starting
# weights and embeddings are read only by a fresh start (a resumed run has its checkpoint), and
# a cluster worker names local copies of them (`cluster/workers.py`).
RUN_SETTINGS = (
    "model", "optim", "seed", "precision", "grad_accum", "zero_stage", "steps_per_epoch",
    "data.batch_size", "data.transforms", "data.repeat_threshold",
)  # fmt: skip
FILE_SETTINGS = ("model.init_from", "model.backbone_weights", "model.category_embeddings")


def changed_settings(out_dir: Path, cfg: TrainConfig) -> list[str]:
    """'key: before -> now' for each run setting (`RUN_SETTINGS`) that differs between `cfg` and
    the config the run in `out_dir` was started with (its config.json); a key the older file
    does not have is not compared."""
    try:
        saved = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return []
    now = json.loads(json.dumps(cfg.to_dict(), default=str))
    changes: list[str] = []

    def compare(key: str, before, after) -> None:
        if key in FILE_SETTINGS:
            return
        if isinstance(before, dict) and isinstance(after, dict):
            for k in sorted(set(before) & set(after)):
                compare(f"{key}.{k}", before[k], after[k])
        elif before != after:
            changes.append(f"{key}: {before!r} -> {after!r}")

    for name in RUN_SETTINGS:
        before, after = saved, now
        for part in name.split("."):
            before = before.get(part, KeyError) if isinstance(before, dict) else KeyError
            after = after.get(part, KeyError) if isinstance(after, dict) else KeyError
        if before is not KeyError and after is not KeyError:
            compare(name, before, after)
    return changes


def refuse_changed_run(out_dir: Path, cfg: TrainConfig, device) -> None:
    """A ConfigError on every rank (no rank left waiting in a collective) when the checkpoints
    in `out_dir` belong to a run started with other run settings: resuming would continue that
    run under this config's name instead of starting this one."""
    changes = changed_settings(out_dir, cfg)
    refused = torch.tensor([float(bool(changes))], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(refused, op=torch.distributed.ReduceOp.MAX)
    if refused.item() > 0:
        shown = "; ".join(changes[:8]) + (
            f"; and {len(changes) - 8} more" if len(changes) > 8 else ""
        )
        raise ConfigError(
            f"{out_dir / 'checkpoints'} holds a run started with other settings"
            f"{' (' + shown + ')' if shown else ' (seen by another rank)'}: resuming would go on "
            "with that run. Give this config another output_dir, or delete that folder's "
            "checkpoints to start over (to start from its weights, name it in model.init_from)"
        )


def lr_factor(step: int, optim: OptimConfig) -> float:
    """Linear warm-up from `warmup_start` of the rate to all of it over `warmup_steps`
    (mmengine's LinearLR), then x `decay_gamma` at each of `decay_steps`."""
    warm = 1.0
    if optim.warmup_steps > 0:
        ramp = min(1.0, (step + 1) / optim.warmup_steps)
        warm = optim.warmup_start + (1.0 - optim.warmup_start) * ramp
    return warm * optim.decay_gamma ** sum(step >= s for s in optim.decay_steps)


def deepspeed_config(cfg: TrainConfig, world: int, sliced_table: bool = False) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.grad_accum * world,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.zero_stage},
        # torch's AdamW with a sliced update for the table (`vastdet.engine.optim`)
        "zero_allow_untested_optimizer": sliced_table,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _categories(cfg: TrainConfig, shards):
    """The taxonomy whose category ids the model classifies (data.categories, else the file the
    shards' manifest names)."""
    from pipelines.sources import is_url, local_copy
    from taxonomy import load_taxonomy

    source = cfg.data.categories or shards.categories_file
    if source and is_url(source):
        source = local_copy(source)
    if not source or not Path(source).is_file():
        raise FileNotFoundError(
            f"no category file: set data.categories (the shards' manifest names "
            f"{os.fspath(source) if source else 'none'})"
        )
    return load_taxonomy(source)


def _to_device(batch, device):
    targets = [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in batch.targets
    ]
    return batch.images.to(device), batch.masks.to(device), targets


def _gathered_rng_states() -> list[torch.Tensor]:
    """Every rank's torch RNG state, in rank order (the checkpoint's client state is rank 0's)."""
    state = torch.get_rng_state()
    if not torch.distributed.is_initialized():
        return [state]
    states = [torch.empty_like(state) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(states, state)
    return states


DIAGNOSTICS = ("diag_rho", "diag_eta")


def _logged_losses(
    loss: torch.Tensor, losses: dict[str, torch.Tensor], criterion
) -> dict[str, float]:
    """The total, the final layer's terms, the weighted sums of the denoising, encoder and
    one-to-many families, averaged over ranks (every rank calls this at the same steps), and the gradient
    diagnostics averaged over the ranks where they are defined (an image set with no labelled
    match has none)."""
    values = {"loss": loss.detach()}
    values.update(
        {
            k: losses[k].detach()
            for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_sel", "loss_div")
            if k in losses
        }
    )
    for family, marker in (("loss_dn", "_dn_"), ("loss_enc", "_enc"), ("loss_o2m", "_o2m_")):
        part = {k: v.detach() for k, v in losses.items() if marker in k}
        if part:
            values[family] = criterion.weighted_sum(part)
    terms = [float(values.get(k, 0.0)) for k in LOGGED_TERMS]
    diags = [float(losses[k]) if k in losses else float("nan") for k in DIAGNOSTICS]
    finite = [d if math.isfinite(d) else 0.0 for d in diags]
    counts = [float(math.isfinite(d)) for d in diags]
    vector = torch.tensor(terms + finite + counts, device=loss.device, dtype=torch.float64)
    world = 1
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(vector)
        world = torch.distributed.get_world_size()
    n = len(LOGGED_TERMS)
    out = {k: v / world for k, v in zip(LOGGED_TERMS, vector[:n].tolist()) if k in values}
    d = len(DIAGNOSTICS)
    for k, total, count in zip(DIAGNOSTICS, vector[n : n + d].tolist(), vector[n + d :].tolist()):
        if k in losses and count > 0:
            out[k] = total / count
    return out


@dataclass
class TrainHooks:
    """What a launcher may add to a run (Ray Train reports through these). Every rank calls each
    hook at the same points, so a hook may be collective."""

    on_log: Callable[[dict], None] | None = None  # a logged training row (losses over ranks)
    on_checkpoint: Callable[[Path, int, dict], None] | None = None  # a complete checkpoint
    # folder (on this rank's disk), its step and the training row logged at it, if any


def train(config: TrainConfig | str, hooks: TrainHooks | None = None) -> dict:
    """Train; resumes from the newest complete checkpoint in `output_dir/checkpoints`.

    Returns a summary: the final step, the last logged losses, skipped steps and samples."""
    hooks = hooks or TrainHooks()
    cfg = load_train_config(config) if isinstance(config, (str, os.PathLike)) else config
    deepspeed = prepare_deepspeed()
    rank, world = init_distributed(deepspeed)
    set_threads(cfg.threads)
    keep_freed_memory()
    from pipelines.loader import train_loader
    from pipelines.shards import ShardSet
    from pipelines.transforms import build_transforms
    from vastdet.models.build import build_model

    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    shards = ShardSet.open(cfg.data.train_shards)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    taxonomy = _categories(cfg, shards)
    resuming = bool(checkpoints.complete_tags(ckpt_dir))
    if resuming:
        from deepspeed.accelerator import get_accelerator

        refuse_changed_run(out_dir, cfg, get_accelerator().current_device_name())
    model, criterion, post = build_model(
        cfg.model,
        taxonomy.category_ids().tolist(),
        taxonomy,
        weights_follow=resuming or bool(cfg.model.init_from),
    )
    if cfg.model.init_from and not resuming:
        from vastdet.runtime.loading import load_weights_from

        count = load_weights_from(model, cfg.model.init_from)
        log.info("initialised %d tensors from %s", count, cfg.model.init_from)
    groups = parameter_groups(model, cfg.optim)
    if any("moments" in g for g in groups):  # the category table's sliced update
        from vastdet.engine.optim import AdamW

        optimizer = AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), seed=cfg.seed)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    if cfg.zero_stage == 3 and hasattr(model, "category_queries"):
        # the lean encoding and scoring read submodules' weights inside one function, where
        # ZeRO-3's per-module gathering does not reach; ZeRO-3 partitions the table instead
        model.category_queries.lean = model.selector.lean = False
        log.info("ZeRO-3: the category queries are encoded and scored with autograd")
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, world, type(optimizer) is not torch.optim.AdamW),
    )
    # checkpoints read as data, and a full disk on one rank stopping every rank together
    engine.checkpoint_engine = checkpoints.CheckpointEngine(engine.checkpoint_engine)
    if world == 1 and cfg.zero_stage == 0:
        # DeepSpeed still flattens every gradient into buckets and all-reduces them over a world
        # of one after each backward: an identity that cost ~10% of a tiny model's CPU step.
        # (ZeRO stages partition gradients in that same call, so they keep it.)
        engine.enable_backward_allreduce = False
    step = epoch = consumed = 0
    tags = checkpoints.complete_tags(ckpt_dir)
    if tags:
        _, state = engine.load_checkpoint(str(ckpt_dir), tag=tags[-1])
        step, epoch, consumed = state["step"], state["epoch"], state["batches_in_epoch"]
        # the denoising noise continues as it would have without the interruption
        torch.set_rng_state(state["rng"][rank % len(state["rng"])])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", tags[-1], step, epoch, consumed)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
    if step >= cfg.steps and _finished_earlier(cfg, rank):
        log.info("%s finished earlier (step %d, evaluated): nothing to do", out_dir, step)
        return {
            "step": step,
            "last": (training_rows(out_dir) or [{}])[-1] if rank == 0 else {},
            "skipped_steps": 0,
            "rank": rank,
            "world_size": world,
            "eval": _recorded_evaluation(out_dir) if rank == 0 else None,
        }
    run_log = RunLog(out_dir, step, enabled=rank == 0)
    names = taxonomy.category_names()
    known = taxonomy.category_ids().tolist()  # samples with other category ids are skipped
    transforms = build_transforms(cfg.data.transforms, train=True)
    nonfinite = skipped_steps = 0
    last: dict = {}
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", disable=rank != 0)
    engine.train()
    try:  # the bar's line ends before anything a stop prints (an error, a signal)
        while step < cfg.steps:
            loader = train_loader(
                shards,
                cfg.data.batch_size,
                cfg.steps_per_epoch * cfg.grad_accum,
                transforms,
                seed=cfg.seed,
                epoch=epoch,
                shuffle_buffer=cfg.data.shuffle_buffer,
                repeat_threshold=cfg.data.repeat_threshold,
                num_workers=cfg.data.num_workers,
                group_by_aspect=cfg.data.group_by_aspect,
                categories=known,
                worker_nice=cfg.data.worker_nice,
            )
            wait_start, tick = time.perf_counter(), time.perf_counter()
            images_seen, waited = 0, 0.0
            for index, batch in enumerate(loader):
                if index < consumed:  # resuming inside an epoch: the stream is replayed up to here
                    wait_start = time.perf_counter()
                    continue
                waited += time.perf_counter() - wait_start
                for group in optimizer.param_groups:
                    group["lr"] = (
                        cfg.optim.lr * group.get("lr_mult", 1.0) * lr_factor(step, cfg.optim)
                    )
                images, masks, targets = _to_device(batch, engine.device)
                losses = criterion(engine(images, masks, targets), targets)
                loss = criterion.weighted_sum(losses)
                finite = torch.tensor([float(torch.isfinite(loss))], device=engine.device)
                if torch.distributed.is_initialized():
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                consumed = index + 1
                if finite.item() < 1:  # every rank skips together, so collectives stay in step
                    nonfinite += 1
                    skipped_steps += 1
                    log.warning(
                        "non-finite loss at step %d: step skipped (%d in a row)", step, nonfinite
                    )
                    if nonfinite > cfg.max_nonfinite:
                        raise NonFiniteLossError(
                            f"{nonfinite} consecutive non-finite losses at step {step}: lower the learning rate, "
                            "check the data (`vastdet data inspect`) or raise max_nonfinite"
                        )
                    wait_start = time.perf_counter()
                    continue
                nonfinite = 0
                engine.backward(loss)
                engine.step()
                images_seen += len(batch)
                if engine.is_gradient_accumulation_boundary() or cfg.grad_accum == 1:
                    step += 1
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        elapsed = time.perf_counter() - tick
                        last = {
                            "step": step,
                            "epoch": epoch,
                            "world_size": world,
                            **_logged_losses(loss, losses, criterion),
                            "lr": cfg.optim.lr * lr_factor(step - 1, cfg.optim),
                            "images_per_s": images_seen * world / max(elapsed, 1e-9),
                            "data_wait_share": waited / max(elapsed, 1e-9),  # of the wall time
                            "skipped_samples": sum(loader.skipped().values()),
                            "skipped": loader.skipped(),  # this rank's, by kind, this epoch
                            "skipped_steps": skipped_steps,
                        }
                        run_log.training(last)
                        if hooks.on_log is not None:
                            hooks.on_log(last)
                        tick, images_seen, waited = time.perf_counter(), 0, 0.0
                    if cfg.checkpoint_step(step):
                        state = {
                            "step": step,
                            "epoch": epoch,
                            "batches_in_epoch": consumed,
                            "config": cfg.to_dict(),
                            "rng": _gathered_rng_states(),
                        }
                        saved = checkpoints.save(
                            engine, ckpt_dir, step, state, cfg.keep_checkpoints
                        )
                        if hooks.on_checkpoint is not None:
                            hooks.on_checkpoint(
                                saved, step, last if last.get("step") == step else {}
                            )
                    if cfg.data.val_shards and cfg.eval_every and step % cfg.eval_every == 0:
                        if step < cfg.steps:  # the final step's evaluation follows the loop
                            evaluation = _evaluate(engine, post, cfg, rank, criterion, step)
                            if evaluation is not None:
                                run_log.evaluation(step, *evaluation, cfg.data.val_shards, names)
                            tick, images_seen, waited = time.perf_counter(), 0, 0.0
                if step >= cfg.steps:
                    break
                wait_start = time.perf_counter()
            if step < cfg.steps:
                epoch, consumed = epoch + 1, 0
    finally:
        bar.close()
    evaluation = None
    if cfg.data.val_shards and cfg.eval_at_end:
        out = _evaluate(engine, post, cfg, rank, criterion, step)
        if out is not None:
            run_log.evaluation(step, *out, cfg.data.val_shards, names)
            evaluation = out[0]
    run_log.close()
    return {
        "step": step,
        "last": last,
        "skipped_steps": skipped_steps,
        "rank": rank,
        "world_size": world,
        "eval": evaluation,
    }


def _finished_earlier(cfg: TrainConfig, rank: int) -> bool:
    """Whether a run resumed at its last step has nothing left to do: no final evaluation is
    asked for, or rank 0's metrics.jsonl records it (rank 0 decides for every rank)."""
    done = not (cfg.data.val_shards and cfg.eval_at_end)
    if not done and rank == 0:
        done = any(r["step"] >= cfg.steps for r in evaluation_rows(cfg.output_dir))
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        decision = [done]
        torch.distributed.broadcast_object_list(decision, src=0)
        done = decision[0]
    return done


def _recorded_evaluation(out_dir: Path) -> dict | None:
    path = out_dir / "eval" / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _evaluate(
    engine, post, cfg: TrainConfig, rank: int, criterion, step: int
) -> tuple[dict, list[dict]] | None:
    """The val shards through the engine itself (under ZeRO-3 each forward is collective);
    rank 0 writes `eval/metrics.json` and `eval/results.json` and returns (metrics,
    detections)."""
    from pipelines.shards import ShardSet
    from pipelines.transforms import build_transforms
    from vastdet.evaluation.runner import evaluate_model, find_taxonomy, format_metrics

    shards = ShardSet.open(cfg.data.val_shards)
    taxonomy = find_taxonomy(cfg.data.categories, shards.categories_file)
    engine.eval()
    out = evaluate_model(
        engine,
        post,
        engine.module.category_ids.tolist(),
        shards,
        build_transforms(cfg.data.transforms, train=False),
        cfg.eval,
        engine.device,
        taxonomy,
        Path(cfg.output_dir) / "eval",
        getattr(criterion, "matcher", None),
        ShardSet.open(cfg.data.train_shards).category_images(),
    )
    engine.train()
    if rank != 0 or out is None:
        return None
    log.info("evaluation at step %d:\n%s", step, format_metrics(out[0]))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="train a detector (any launcher)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    summary = train(args.config)
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

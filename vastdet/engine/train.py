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
from pathlib import Path

import torch

from vastdet.engine import checkpoints
from vastdet.engine.config import OptimConfig, TrainConfig, load_train_config
from vastdet.engine.partitions import DataOnlyCheckpointEngine

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss."""


def _prepare_deepspeed():
    """Import DeepSpeed for this machine: the CPU accelerator when there is no GPU, and no JIT
    build of the shared-memory communication op (gloo does the work)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def init_distributed(deepspeed) -> tuple[int, int]:
    """Join the process group the environment describes. A plain single process (no
    WORLD_SIZE) makes a world of one over an in-memory store: it opens no rendezvous port."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            store = torch.distributed.HashStore()
            torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def parameter_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups by name pattern. Every parameter is decayed, as DINO and CQ-DINO's released
    code do, unless `decay_1d` is off (then norms and biases are exempt)."""
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
        key = (lr_mult, wd_mult)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "lr_mult": lr_mult,
                "weight_decay": optim.weight_decay * wd_mult,
                "lr": optim.lr * lr_mult,
            },
        )
        group["params"].append(param)
    return list(groups.values())


def lr_factor(step: int, optim: OptimConfig) -> float:
    """Linear warm-up from `warmup_start` of the rate to all of it over `warmup_steps`
    (mmengine's LinearLR), then x `decay_gamma` at each of `decay_steps`."""
    warm = 1.0
    if optim.warmup_steps > 0:
        ramp = min(1.0, (step + 1) / optim.warmup_steps)
        warm = optim.warmup_start + (1.0 - optim.warmup_start) * ramp
    return warm * optim.decay_gamma ** sum(step >= s for s in optim.decay_steps)


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.grad_accum * world,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _categories(cfg: TrainConfig, shards):
    """The taxonomy whose category ids the model classifies (data.categories, else the file the
    shards' manifest names)."""
    from taxonomy import load_taxonomy

    source = cfg.data.categories or shards.categories_file
    if not source or not Path(source).is_file():
        raise FileNotFoundError(
            f"no category file: set data.categories (the shards' manifest names "
            f"{os.fspath(source) if source else 'none'})"
        )
    return load_taxonomy(source)


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep only the metrics lines up to `step` (a resumed run logs the steps after its
    checkpoint again) and drop a line cut short by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    from taxonomy.files import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


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


LOGGED_TERMS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_dn", "loss_enc", "loss_sel")
DIAGNOSTICS = ("diag_rho", "diag_eta")


def _logged_losses(
    loss: torch.Tensor, losses: dict[str, torch.Tensor], criterion
) -> dict[str, float]:
    """The total, the final layer's terms, the weighted sums of the denoising and encoder
    families, averaged over ranks (every rank calls this at the same steps), and the gradient
    diagnostics averaged over the ranks where they are defined (an image set with no labelled
    match has none)."""
    values = {"loss": loss.detach()}
    values.update(
        {
            k: losses[k].detach()
            for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_sel")
            if k in losses
        }
    )
    for family, marker in (("loss_dn", "_dn_"), ("loss_enc", "_enc")):
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


def train(config: TrainConfig | str) -> dict:
    """Train; resumes from the newest complete checkpoint in `output_dir/checkpoints`.

    Returns a summary: the final step, the last logged losses, skipped steps and samples."""
    cfg = load_train_config(config) if isinstance(config, (str, os.PathLike)) else config
    deepspeed = _prepare_deepspeed()
    rank, world = init_distributed(deepspeed)
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
    model, criterion, post = build_model(
        cfg.model,
        taxonomy.category_ids().tolist(),
        taxonomy,
        weights_follow=resuming or bool(cfg.model.init_from),
    )
    if cfg.model.init_from and not resuming:
        from vastdet.engine.export import load_weights_from

        count = load_weights_from(model, cfg.model.init_from)
        log.info("initialised %d tensors from %s", count, cfg.model.init_from)
    groups = parameter_groups(model, cfg.optim)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world)
    )
    # a run folder may have been handed to us: its checkpoint is read as data, never unpickled
    engine.checkpoint_engine = DataOnlyCheckpointEngine(engine.checkpoint_engine)
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
    if rank == 0:
        drop_metrics_after(out_dir / "metrics.jsonl", step)
    metrics = (out_dir / "metrics.jsonl").open("a") if rank == 0 else None
    known = taxonomy.category_ids().tolist()  # samples with other category ids are skipped
    transforms = build_transforms(cfg.data.transforms, train=True)
    nonfinite = skipped_steps = 0
    last: dict = {}
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", disable=rank != 0)
    engine.train()
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
        )
        wait_start, tick = time.perf_counter(), time.perf_counter()
        images_seen = 0
        for index, batch in enumerate(loader):
            if index < consumed:  # resuming inside an epoch: the stream is replayed up to here
                wait_start = time.perf_counter()
                continue
            data_wait = time.perf_counter() - wait_start
            for group in optimizer.param_groups:
                group["lr"] = cfg.optim.lr * group.get("lr_mult", 1.0) * lr_factor(step, cfg.optim)
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
                        "data_wait_s": data_wait,
                        "skipped_samples": sum(loader.skipped().values()),
                        "skipped": loader.skipped(),  # this rank's, by kind, this epoch
                        "skipped_steps": skipped_steps,
                    }
                    if metrics:
                        metrics.write(json.dumps(last) + "\n")
                        metrics.flush()
                    tick, images_seen = time.perf_counter(), 0
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    state = {
                        "step": step,
                        "epoch": epoch,
                        "batches_in_epoch": consumed,
                        "config": cfg.to_dict(),
                        "rng": _gathered_rng_states(),
                    }
                    checkpoints.save(engine, ckpt_dir, step, state, cfg.keep_checkpoints)
            if step >= cfg.steps:
                break
            wait_start = time.perf_counter()
        if step < cfg.steps:
            epoch, consumed = epoch + 1, 0
    bar.close()
    if metrics:
        metrics.close()
    evaluation = _evaluate(engine, post, cfg, rank) if cfg.data.val_shards else None
    return {
        "step": step,
        "last": last,
        "skipped_steps": skipped_steps,
        "rank": rank,
        "world_size": world,
        "eval": evaluation,
    }


def _evaluate(engine, post, cfg: TrainConfig, rank: int) -> dict | None:
    """The val shards through the engine itself (under ZeRO-3 each forward is collective);
    rank 0 writes `eval/metrics.json` and `eval/results.json` and returns the metrics."""
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
    )
    engine.train()
    if rank != 0 or out is None:
        return None
    metrics = out[0]
    log.info("evaluation at step %d:\n%s", cfg.steps, format_metrics(metrics))
    return metrics


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

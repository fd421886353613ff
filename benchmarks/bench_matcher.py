"""Matching at vast vocabularies: class costs at target columns vs over all classes.

    python benchmarks/bench_matcher.py [--classes 13204] [--queries 900] [--batch 2] [--targets 50]

Both variants run in fresh processes on the same seeded inputs and return the same assignment
(checked). After one warm-up call, peak memory is the growth of the process's peak resident memory (VmHWM, reset through
/proc/self/clear_refs once the inputs exist); its resolution is about 1 MiB, so a variant whose
working set fits in memory the process already holds shows as "< 1" and the ratio is then a
lower bound. Time is the median of 5 runs.
- ours: `vastdet.models.matcher.HungarianMatcher` (gathers each image's logits at its target
  classes, then builds the [Q, T] costs);
- all-classes: the focal class cost public DINO code computes, sigmoid and both focal terms over
  [B * Q, C] before indexing the target columns, with the same box costs and assignment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

RUN = textwrap.dedent(
    """
    import json, statistics, sys, time
    import torch
    from scipy.optimize import linear_sum_assignment
    from vastdet.models.box_ops import cxcywh_to_xyxy, generalized_box_iou
    from vastdet.models.matcher import HungarianMatcher
    torch.set_num_threads(2)
    C, Q, B, T = {classes}, {queries}, {batch}, {targets}
    g = torch.Generator().manual_seed(0)
    outputs = {{"pred_logits": torch.randn(B, Q, C, generator=g) - 4,
               "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25}}
    targets = [{{"labels": torch.randint(0, C, (T,), generator=g),
                 "boxes": torch.rand(T, 4, generator=g) * 0.5 + 0.25}} for _ in range(B)]

    def all_classes(outputs, targets, alpha=0.25, gamma=2.0):
        prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
        boxes = outputs["pred_boxes"].flatten(0, 1)
        ids = torch.cat([t["labels"] for t in targets])
        tgt = torch.cat([t["boxes"] for t in targets])
        neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        cost_class = pos[:, ids] - neg[:, ids]
        cost = 5 * torch.cdist(boxes, tgt, p=1) + 2 * cost_class - 2 * generalized_box_iou(
            cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt))
        cost = cost.view(B, Q, -1)
        sizes = [len(t["labels"]) for t in targets]
        return [tuple(torch.as_tensor(x) for x in linear_sum_assignment(c[i].numpy()))
                for i, c in enumerate(cost.split(sizes, -1))]

    fn = HungarianMatcher() if "{variant}" == "ours" else all_classes

    def peak_rss_kib():
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1])

    with torch.no_grad():
        fn(outputs, targets)  # warm-up: lazy initialisation and thread start-up are not per call
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak to the current resident size
        f.write("5")
    base = peak_rss_kib()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        with torch.no_grad():
            result = fn(outputs, targets)
        times.append(time.perf_counter() - t0)
    peak = peak_rss_kib() - base
    print(json.dumps({{"seconds": statistics.median(times), "peak_bytes": peak * 1024,
                      "assignment": [[r.tolist(), c.tolist()] for r, c in result]}}))
    """
)


def measure(variant: str, args) -> dict:
    code = RUN.format(
        variant=variant,
        classes=args.classes,
        queries=args.queries,
        batch=args.batch,
        targets=args.targets,
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=13204)
    parser.add_argument("--queries", type=int, default=900)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--targets", type=int, default=50)
    args = parser.parse_args()
    ours, full = measure("ours", args), measure("all-classes", args)
    same = ours["assignment"] == full["assignment"]
    print(
        f"{args.classes:,} classes, {args.queries} queries, batch {args.batch}, "
        f"{args.targets} targets per image; same assignment: {same}\n"
    )
    print("| matcher | time (s, median of 5) | peak memory growth (MiB) |")
    print("|---|---|---|")
    for name, r in (
        ("all-classes focal cost (public DINO code)", full),
        ("ours: target columns only", ours),
    ):
        mib = r["peak_bytes"] / 2**20
        print(f"| {name} | {r['seconds']:.3f} | {'< 1' if mib < 1 else f'{mib:.1f}'} |")
    ours_mib = ours["peak_bytes"] / 2**20
    bound = ">= " if ours_mib < 1 else ""
    ratio = full["peak_bytes"] / 2**20 / max(ours_mib, 1.0)
    print(
        f"\npeak memory: {bound}{ratio:.0f}x less; time: {full['seconds'] / ours['seconds']:.1f}x faster"
    )
    if not same:
        sys.exit("the two matchers disagree")


if __name__ == "__main__":
    main()

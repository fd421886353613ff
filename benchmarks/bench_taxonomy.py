"""Taxonomy at scale: WordNet's whole noun hierarchy, and a 1,000,000-node file.

    python benchmarks/bench_taxonomy.py [--nodes 1000000] [--skip-wordnet]

Every measurement runs in a fresh Python process (so nltk's load and the peak resident memory
are that step's own). Baselines run the same way in the same invocation:
- WordNet: nltk's own `all_synsets('n')` load, which our build cannot avoid;
- 1M nodes: a bare `json.load` of the same file, the floor for any JSON taxonomy reader.
Targets (issue 2): WordNet <= 30 s; 1M nodes loaded + validated + level-ordered <= 10 s and
<= 2 GB peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

RUNNER = textwrap.dedent(
    """
    import json, resource, sys, time
    t0 = time.perf_counter()
    {body}
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({{"seconds": seconds, "peak_bytes": peak, **extra}}))
    """
)


def measure(body: str) -> dict:
    """Run `body` in a fresh interpreter; it must set a dict `extra`."""
    code = RUNNER.format(body=textwrap.indent(textwrap.dedent(body), "").strip())
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic_taxonomy_file(path: Path, n: int, seed: int = 0, branching: int = 3) -> None:
    """A WordNet-shaped DAG of n nodes: about log_3(n) levels, 3% of nodes with a second parent.

    Node i's parent is drawn near (i - 1) // branching, as in a heap, so depth grows like
    log(n); a second parent comes from the same neighbourhood (WordNet's extra hypernyms sit
    at a similar depth).
    """
    from taxonomy import Taxonomy, save_taxonomy

    rng = np.random.default_rng(seed)
    i = np.arange(n)
    centre = np.maximum(i - 1, 0) // branching

    def near() -> np.ndarray:
        return np.clip(centre + rng.integers(-20, 21, size=n), 0, np.maximum(i - 1, 0))

    first, second = near(), near()
    two = (rng.random(n) < 0.03) & (second != first)
    ids = [f"n{k:08d}" for k in range(n)]
    parents = [
        () if k == 0 else ((ids[first[k]], ids[second[k]]) if two[k] else (ids[first[k]],))
        for k in range(n)
    ]
    tax = Taxonomy.from_columns(
        ids,
        [f"category {k}" for k in range(n)],
        parents,
        list(range(1, n + 1)),
        descriptions=[f"synthetic node {k}" for k in range(n)],
    )
    save_taxonomy(tax, path)


def row(name: str, result: dict, baseline: dict | None, target: str) -> str:
    ratio = f"{result['seconds'] / baseline['seconds']:.2f}x" if baseline else "-"
    return (
        f"| {name} | {result['seconds']:.2f} | {result['peak_bytes'] / 2**30:.2f} | "
        f"{ratio} | {target} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--skip-wordnet", action="store_true")
    args = parser.parse_args()
    lines = ["| step | seconds | peak GiB | time vs baseline | target |", "|---|---|---|---|---|"]

    if not args.skip_wordnet:
        nltk_load = measure("""
            from nltk.corpus import wordnet as wn
            extra = {"synsets": sum(1 for _ in wn.all_synsets("n"))}
        """)
        build = measure("""
            from taxonomy.wordnet import build_wordnet_taxonomy
            tax = build_wordnet_taxonomy()
            extra = {"nodes": len(tax), "edges": tax.num_edges}
        """)
        lines.append(
            row(
                f"baseline: nltk load of {nltk_load['synsets']:,} noun synsets", nltk_load, None, ""
            )
        )
        lines.append(
            row(
                f"WordNet noun hierarchy built ({build['nodes']:,} nodes, {build['edges']:,} edges)",
                build,
                nltk_load,
                "<= 30 s",
            )
        )

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.json"
        synthetic_taxonomy_file(path, args.nodes)
        size = path.stat().st_size
        raw = measure(f"""
            with open({str(path)!r}) as f:
                doc = json.load(f)
            extra = {{"nodes": len(doc["nodes"])}}
        """)
        ours = measure(f"""
            from taxonomy import load_taxonomy
            tax = load_taxonomy({str(path)!r})
            levels = tax.level_order()
            extra = {{"nodes": len(tax), "levels": len(levels), "max_depth": tax.max_depth}}
        """)
        hier = measure(f"""
            from taxonomy import load_taxonomy, CategoryHierarchy
            tax = load_taxonomy({str(path)!r})
            t = time.perf_counter()
            h = CategoryHierarchy.from_taxonomy(tax)
            mask = h.parent_mask([int(h.category_ids[-1])])
            extra = {{"hierarchy_seconds": time.perf_counter() - t, "levels": len(h.levels),
                      "masked": int(mask.sum())}}
        """)
    lines.append(row(f"baseline: json.load of the {size / 2**20:.0f} MiB file", raw, None, ""))
    lines.append(
        row(
            f"{ours['nodes']:,} nodes loaded + validated + level-ordered ({ours['levels']} levels)",
            ours,
            raw,
            "<= 10 s, <= 2 GB",
        )
    )
    hier_row = dict(hier, seconds=hier["hierarchy_seconds"])
    lines.append(
        row(
            f"CategoryHierarchy (eq. 6-7 level arrays) + one parent mask, of {ours['nodes']:,} categories",
            hier_row,
            None,
            "(peak includes the load)",
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

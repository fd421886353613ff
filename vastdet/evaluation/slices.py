"""AP over slices of a vast vocabulary, computed by the same evaluator as the main numbers.

- **By hierarchy level**: ground truths and detections are mapped to their ancestor at depth
  d of the category tree (the taxonomy restricted to its categories, so depth 0 holds the top
  categories) and scored again. A category above depth d keeps its own id. A category with
  several parents takes the ancestor on its primary path (first parent at every step, as the
  synthetic renderer and `taxonomy show` follow it). Two detections that map to the same
  ancestor on one object are a true and a false positive, as they would be for any two
  detections of one category.
- **By frequency**, as LVIS does: rare (1-10 training images), common (11-100) and frequent
  (more than 100), from the training manifest's per-category image counts; categories with no
  training image are in none of them. Under the LVIS protocol the bins are the dataset's own
  `frequency` field when its categories carry one, as LVIS's evaluation takes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

FREQUENCY_BINS = {"r": (1, 10), "c": (11, 100), "f": (101, 10**12)}  # APr, APc, APf


def level_map(taxonomy, depth: int) -> dict[int, int]:
    """category id -> its category ancestor at `depth` (itself when it lies above)."""
    tree = taxonomy.restrict(taxonomy.category_ids())
    mapped = {}
    for cat in tree.category_ids().tolist():
        path = [tree.node_of_category(cat)]
        while parents := tree.parents(path[-1]):
            path.append(parents[0])
        path.reverse()  # root ... category
        node = tree.node(path[depth]) if len(path) > depth else tree.node(path[-1])
        mapped[cat] = int(node.category_id)
    return mapped


def relabel(items: Sequence[dict], mapping: Mapping[int, int]) -> list[dict]:
    """Copies of annotations or detections with their category ids mapped."""
    return [{**item, "category_id": mapping[item["category_id"]]} for item in items]


def frequency_groups(category_images: Mapping[int, int]) -> dict[str, set[int]]:
    """{"r": ids, "c": ids, "f": ids} by training-image count (LVIS's bins)."""
    return {
        name: {int(c) for c, n in category_images.items() if lo <= n <= hi}
        for name, (lo, hi) in FREQUENCY_BINS.items()
    }


def dataset_frequency_groups(taxonomy) -> dict[str, set[int]]:
    """{"r", "c", "f"} from the categories' own `frequency` field (LVIS's category entries
    carry it); empty when no category has one."""
    groups: dict[str, set[int]] = {name: set() for name in FREQUENCY_BINS}
    for cat in taxonomy.category_ids().tolist():
        value = taxonomy.node(taxonomy.node_of_category(cat)).attributes.get("frequency")
        if value in groups:
            groups[value].add(int(cat))
    return groups if any(groups.values()) else {}

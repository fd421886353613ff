"""The packages' import directions (DESIGN.md): taxonomy -> pipelines -> vastdet -> cluster, and
inside vastdet the shared runtime below both the trainer and the evaluator. Read from the
source's import statements, module-level and inside functions alike."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported(folder: str) -> dict[str, set[str]]:
    """module file -> the absolute module names it imports."""
    out = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        out[str(path.relative_to(REPO))] = names
    return out


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("taxonomy", ("pipelines", "vastdet", "cluster")),
        ("pipelines", ("vastdet", "cluster")),
        ("vastdet", ("cluster",)),
        # the evaluator and the shared runtime never reach into the trainer's folder
        ("vastdet/evaluation", ("vastdet.engine",)),
        ("vastdet/runtime", ("vastdet.engine", "vastdet.evaluation")),
    ],
)
def test_imports_go_one_way(folder, forbidden):
    bad = {
        path: sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))
        for path, names in imported(folder).items()
    }
    assert not {path: names for path, names in bad.items() if names}

"""The README's examples run as written, in order, in a fresh folder, and print what it says.

Every ```console and ```python block runs; a ```yaml block whose first line is `# NAME.yaml`
is written to NAME.yaml first, as a reader would save it. A block preceded by
`<!-- not run: REASON -->` needs what a plain clone cannot have (V3Det's images, a GPU
cluster) and is skipped; each one says why. In a console block, the lines after a `$ command`
are what it prints: each must appear in the command's output, in order (other lines may come
between), where `...` stands for any text and a line of `...` alone for any lines. The folder
holds a link to the repository's `tests/` (the README's V3Det examples read
`tests/data/v3det`), and nothing else to begin with.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")


@dataclass
class Block:
    language: str
    text: str
    line: int  # of the opening fence, 1-based
    skip: str | None = None


@dataclass
class Command:
    command: str
    expected: list[str] = field(default_factory=list)


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks in order, each with the reason it is not run, if it says one."""
    blocks, lines, k = [], text.splitlines(), 0
    while k < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[k])
        if not fence:
            k += 1
            continue
        start, body = k, []
        k += 1
        while k < len(lines) and lines[k].rstrip() != "```":
            body.append(lines[k])
            k += 1
        before = [line for line in lines[max(0, start - 3) : start] if line.strip()]
        skip = NOT_RUN.search(before[-1]) if before else None
        blocks.append(Block(fence.group(1), "\n".join(body), start + 1, skip and skip.group(1)))
        k += 1
    return blocks


def console_commands(text: str) -> list[Command]:
    """`$ ` lines (with `\\` continuations) and the output lines shown after each."""
    commands: list[Command] = []
    lines = text.splitlines()
    k = 0
    while k < len(lines):
        line = lines[k]
        if line.startswith("$ "):
            command = line[2:]
            while command.rstrip().endswith("\\") and k + 1 < len(lines):
                k += 1
                command = command.rstrip()[:-1] + " " + lines[k].strip()
            commands.append(Command(command))
        elif commands:
            commands[-1].expected.append(line)
        k += 1
    return commands


def shown_lines_appear(expected: list[str], output: str) -> str | None:
    """None when every shown line appears in `output` in order, else what is missing."""
    actual = [line.rstrip() for line in re.split(r"[\r\n]+", output)]
    position = 0
    for line in expected:
        if not line.strip() or line.strip() == "...":
            continue
        pattern = re.compile(
            ".*".join(re.escape(part) for part in line.rstrip().split("...")) + r"\s*$"
        )
        while position < len(actual) and not pattern.search(actual[position]):
            position += 1
        if position == len(actual):
            return f"not printed (in this order): {line!r}"
        position += 1
    return None


def environment() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "100",
        "PYTHONUNBUFFERED": "1",  # printed and logged lines interleave as on a terminal
    }


def test_readme_blocks_are_found_and_each_skipped_one_says_why():
    blocks = readme_blocks((REPO / "README.md").read_text())
    kinds = {b.language for b in blocks}
    assert {"console", "python", "yaml"} <= kinds
    run = [b for b in blocks if b.language in ("console", "python") and not b.skip]
    assert len(run) >= 10
    assert all(len(b.skip) > 10 for b in blocks if b.skip)


def test_the_shown_output_matcher_on_a_hand_worked_case():
    output = "noise\nTaxonomy(19 nodes, 3 categories) -> a.json\nmore\nlast 12 s\n"
    assert (
        shown_lines_appear(["Taxonomy(19 nodes, ... categories) -> a.json", "..."], output) is None
    )
    assert shown_lines_appear(["last ... s", "Taxonomy(19 nodes, 3 categories) -> a.json"], output)
    assert shown_lines_appear(["Taxonomy(20 nodes, 3 categories) -> a.json"], output)


@pytest.mark.slow
def test_every_readme_example_runs_in_order_and_prints_what_it_shows(tmp_path):
    (tmp_path / "tests").symlink_to(REPO / "tests", target_is_directory=True)
    env = environment()
    for block in readme_blocks((REPO / "README.md").read_text()):
        where = f"README.md line {block.line}"
        if block.skip:
            continue
        if block.language == "yaml":
            first = block.text.splitlines()[0] if block.text else ""
            name = re.match(r"#\s*(\S+\.ya?ml)\s*$", first)
            if name:
                (tmp_path / name.group(1)).write_text(block.text + "\n")
        elif block.language == "python":
            done = subprocess.run(
                [sys.executable, "-c", block.text], cwd=tmp_path, env=env,
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            assert done.returncode == 0, f"{where}: python block failed\n{done.stderr[-3000:]}"
        elif block.language == "console":
            for command in console_commands(block.text):
                done = subprocess.run(  # one stream, in the order a terminal shows it
                    ["bash", "-c", command.command], cwd=tmp_path, env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
                )  # fmt: skip
                output = done.stdout
                assert done.returncode == 0, (
                    f"{where}: `{command.command}` failed\n{output[-3000:]}"
                )
                missing = shown_lines_appear(command.expected, output)
                assert missing is None, f"{where}: `{command.command}`: {missing}\n{output[-3000:]}"

"""The `vastdet` command: one entry point, a command group per package (those above vastdet,
such as the cluster's, through the `vastdet.commands` entry-point group)."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from pipelines.annotations import AnnotationError, UnusableDataError
from pipelines.cli import add_commands as add_data_commands
from taxonomy import TaxonomyError
from taxonomy.cli import add_commands as add_taxonomy_commands
from taxonomy.files import NoSpaceError
from vastdet.config import ConfigError
from vastdet.engine.cli import add_commands as add_engine_commands
from vastdet.evaluation import IncompleteEvaluationError
from vastdet.runtime.distributed import choose_accelerator

# Packages above vastdet add their commands through this entry-point group (vastdet imports
# none of them): `[project.entry-points."vastdet.commands"]` in their pyproject.
PLUGIN_GROUP = "vastdet.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vastdet",
        description="Train and evaluate object detectors over vast, hierarchical vocabularies.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    groups = parser.add_subparsers(dest="command", required=True)
    add_taxonomy_commands(groups)
    add_data_commands(groups)
    add_engine_commands(groups)
    for plugin in entry_points(group=PLUGIN_GROUP):  # e.g. the cluster's `submit` and `jobs`
        plugin.load()(groups)
    return parser


PACKAGES = ("vastdet", "taxonomy", "pipelines", "cluster")


def configure_logging(verbose: bool = False) -> None:
    """Our packages log at INFO (DEBUG when verbose); others only warnings (open_clip is chatty)."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in PACKAGES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    choose_accelerator()
    try:
        return args.handler(args)
    except (
        NoSpaceError,
        TaxonomyError,
        AnnotationError,
        ConfigError,
        FileNotFoundError,
        KeyError,
        ValueError,
        UnusableDataError,
        IncompleteEvaluationError,
    ) as err:
        print(f"vastdet: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Make WordNet 3.0 readable by nltk without a download: `python -m taxonomy.wordnet_data`.

On Debian the packages `wordnet-base` and `wordnet-sense-index` hold WordNet 3.0 in
`/usr/share/wordnet`, but nltk will not read it there: it only reads inside its data path, and
the folder lacks the `lexnames` file. This copies the database files into
`<dest>/corpora/wordnet/` and writes `lexnames`. With `dest` = `<virtualenv>/nltk_data`, nltk
finds it with no environment variable (the prefix's `nltk_data` is on nltk's default path).
When neither the files nor apt are there, it falls back to `nltk.download`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SYSTEM_WORDNET = Path("/usr/share/wordnet")
DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")
REQUIRED = ("data.noun", "index.noun", "noun.exc", "index.sense")
# WordNet 3.0's lexicographer files: number, name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
LEXNAMES = (
    "adj.all 3",
    "adj.pert 3",
    "adv.all 4",
    "noun.Tops 1",
    "noun.act 1",
    "noun.animal 1",
    "noun.artifact 1",
    "noun.attribute 1",
    "noun.body 1",
    "noun.cognition 1",
    "noun.communication 1",
    "noun.event 1",
    "noun.feeling 1",
    "noun.food 1",
    "noun.group 1",
    "noun.location 1",
    "noun.motive 1",
    "noun.object 1",
    "noun.person 1",
    "noun.phenomenon 1",
    "noun.plant 1",
    "noun.possession 1",
    "noun.process 1",
    "noun.quantity 1",
    "noun.relation 1",
    "noun.shape 1",
    "noun.state 1",
    "noun.substance 1",
    "noun.time 1",
    "verb.body 2",
    "verb.change 2",
    "verb.cognition 2",
    "verb.communication 2",
    "verb.competition 2",
    "verb.consumption 2",
    "verb.contact 2",
    "verb.creation 2",
    "verb.emotion 2",
    "verb.motion 2",
    "verb.perception 2",
    "verb.possession 2",
    "verb.social 2",
    "verb.stative 2",
    "verb.weather 2",
    "adj.ppl 3",
)


def lexnames_text() -> str:
    """The 45-line `lexnames` file nltk's reader expects (`NN<TAB>name<TAB>category`)."""
    return "".join(
        f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(e.split() for e in LEXNAMES)
    )


def _apt_install() -> bool:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return False
    log.info("installing %s with apt-get", " ".join(DEBIAN_PACKAGES))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"stdout": subprocess.DEVNULL, "env": env}
    subprocess.run(["apt-get", "update", "-qq"], check=False, **quiet)
    done = subprocess.run(
        ["apt-get", "install", "-y", "-qq", *DEBIAN_PACKAGES], check=False, **quiet
    )
    return done.returncode == 0


def install_wordnet(dest: Path, source: Path = SYSTEM_WORDNET) -> Path:
    """Ensure `<dest>/corpora/wordnet` holds a WordNet nltk can read; returns that folder."""
    target = dest / "corpora" / "wordnet"
    if all((target / f).is_file() for f in (*REQUIRED, "lexnames")):
        return target
    if not all((source / f).is_file() for f in REQUIRED):
        _apt_install()
    if all((source / f).is_file() for f in REQUIRED):
        target.mkdir(parents=True, exist_ok=True)
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, target / item.name)
        (target / "lexnames").write_text(lexnames_text())
        log.info("WordNet copied from %s to %s", source, target)
        return target
    import nltk  # last resort: a machine with internet access

    if not nltk.download("wordnet", download_dir=str(dest), quiet=True):
        raise RuntimeError(
            f"no WordNet found: install the Debian packages {' '.join(DEBIAN_PACKAGES)} "
            f"(files in {source}) or run nltk.download('wordnet', download_dir='{dest}')"
        )
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dest",
        type=Path,
        default=Path(sys.prefix) / "nltk_data",
        help="nltk data folder (default: the running prefix's nltk_data)",
    )
    parser.add_argument("--source", type=Path, default=SYSTEM_WORDNET)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(install_wordnet(args.dest, args.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())

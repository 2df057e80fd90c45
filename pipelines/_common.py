"""What the pipelines' command lines share: --corpus and --work, --fresh, and sptok's errors as one line."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def arguments(work: str, **parser) -> argparse.ArgumentParser:
    """An ArgumentParser (``parser``: its keyword arguments) with --corpus (the shared corpus) and --work
    (out/``work``); the pipeline adds its own options, then calls ``run_cli``."""
    ap = argparse.ArgumentParser(**parser)
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / work)
    return ap


def run_cli(ap: argparse.ArgumentParser, argv, run, fresh: str, overwrite_hint: str = "") -> None:
    """Add --fresh (``fresh``: its help), parse ``argv`` and ``run(args)``: an SptokError ends in its one line,
    followed by ``overwrite_hint`` where the line suggests --overwrite."""
    ap.add_argument("--fresh", action="store_true", help=fresh)
    args = ap.parse_args(argv)
    from sptok.errors import SptokError

    try:
        run(args)
    except SptokError as e:
        sys.exit(f"error: {e.message}{overwrite_hint if '--overwrite' in e.message else ''}")


def start_work(args) -> None:
    """The work directory of a run: deleted first under --fresh, then made."""
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)

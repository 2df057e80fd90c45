"""``sptok build`` and ``sptok merge``: raw multi-source text -> a build directory (see ``sptok/layout.py``).

The pipeline, in the order data flows through it:

  manifest, expand   the sources and their input files (one rule for globs, directories, hidden files, links)
  options            every build option, its default and its check
  tokenizer          train / load / extend a tokenizer with the SP tokens and the delimiter
  encoders           text -> ids with the fastest encoder that gives the reference's ids
  readers            input files -> documents (JSONL, Parquet, text, datasets Arrow); bad records -> rejects
  unit, pack         one work unit: SP decisions (``sptok/sp.py``), layout, packing, its shards and tail
  holdout            the validation split, drawn per document
  writers            MDS / Parquet / Arrow shards
  runner, progress   worker processes and their progress
  finalize           committed units -> per-source shards, stitched tails, stats, indexes, ``sptok.json``
  outdir, remote     the output directory: one writer (lock), --overwrite beside and swap; remote uploads
  driver             ``run_build`` / ``run_merge``: plan, probe, run, finalize
  append             ``run_append``: ``build --append``, new sources built apart, then joined to a complete build

Only ``driver`` is imported here, and only when used: ``sptok --help`` and the readers of a build load nothing
of the pipeline they do not need.
"""

from __future__ import annotations

__all__ = ["BuildResult", "describe_changes", "run_build", "run_merge"]


def __getattr__(name: str):
    if name in __all__:
        from . import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

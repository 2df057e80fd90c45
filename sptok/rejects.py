"""`sptok rejects`: read back the quarantine, ``OUT/rejects/<source>.jsonl.zst``.

Every record a build skipped is there as found (``raw``, or ``raw_b64`` when it is not UTF-8) with its
reason and location, so a bad record can be found, fixed at its source and counted against stats.json.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Iterator

from .errors import SptokError
from .build.readers import REASONS, _Decompressed
from .layout import rejects_path
from .stats import load_stats


def select(out: str, sources=(), reasons=()) -> tuple[list[str], list[str], dict]:
    """Check --source / --reason against the build; returns (sources, reasons, stats.json)."""
    info, stats = load_stats(out)
    names = [e["source"] for e in info["sp_table"]]
    for s in sources:
        if s not in names:
            raise SptokError(f"--source: {out} has no source {s!r}; its sources are: {', '.join(names)}")
    for r in reasons:
        if r not in REASONS:
            raise SptokError(f"--reason: {r!r} is not a reject reason; the reasons are: {', '.join(REASONS)}")
    chosen = [n for n in names if not sources or n in sources]   # build order, whatever the flags' order
    return chosen, list(reasons) or list(REASONS), stats


def expected(stats: dict, sources: list[str], reasons: list[str]) -> int:
    """How many quarantined records stats.json counts for these sources and reasons."""
    return sum(stats["sources"].get(s, {}).get("rejected", {}).get(r, 0) for s in sources for r in reasons)


def iter_rejects(out: str, sources: list[str], reasons: list[str], stats: dict) -> Iterator[dict]:
    """The quarantined records of ``sources`` whose reason is in ``reasons``, in build order. A file that
    holds another number of records than stats.json counts is an error, not a shorter list."""
    for name in sources:
        path = rejects_path(out, name)
        want = sum(stats["sources"].get(name, {}).get("rejected", {}).values())
        if not os.path.exists(path):
            if want:
                raise SptokError(f"{path}: missing, but stats.json counts {want} rejected records of source {name!r}")
            continue
        n = 0
        for rec in read_quarantine(path):
            n += 1
            if rec.get("reason") in reasons:
                yield rec
        if n != want:
            raise SptokError(f"{path}: holds {n} records, but stats.json counts {want} rejected records of source "
                             f"{name!r} (changed after the build)")


def read_quarantine(path: str) -> Iterator[dict]:
    """Every record of one quarantine file (zstd frames of JSON lines). A file cut short or not zstd at all
    raises SptokError naming it: zstandard's stream reader would end quietly at the cut and hide the rest."""
    try:
        with open(path, "rb") as f:
            chunks = _Decompressed(f, f.read(4))
            f.seek(0)
            rest = b""
            for chunk in chunks:
                *lines, rest = (rest + chunk).split(b"\n")
                yield from map(_record, lines)
            if chunks.broken:
                raise ValueError(chunks.broken[1])
            if rest:
                raise ValueError("its last line has no end (truncated)")
    except (ValueError, OSError) as e:
        raise SptokError(f"{path}: unreadable quarantine file ({e})") from None


def _record(line: bytes) -> dict:
    rec = json.loads(line)
    if not isinstance(rec, dict):
        raise ValueError(f"a line holds {type(rec).__name__}, not a quarantined record")
    return rec


def raw_bytes(rec: dict) -> bytes | None:
    """The record's bytes exactly as found in the input (None when it had none, e.g. a Parquet null)."""
    if "raw" in rec:
        return rec["raw"].encode("utf-8")
    if "raw_b64" in rec:
        return base64.b64decode(rec["raw_b64"])
    return None


def format_reject(rec: dict, width: int = 120) -> str:
    """Two lines for a person: where and why, then the raw record shortened to ``width`` characters."""
    head = f"{rec['source']}  {rec['reason']}  {rec['where']}: {rec['detail']}"
    if "raw" in rec:
        shown = _printable(rec["raw"]) or "(empty)"
    elif "raw_b64" in rec:
        shown = "bytes " + repr(base64.b64decode(rec["raw_b64"]))[2:-1]
    else:
        return head
    if len(shown) > width:
        shown = f"{shown[:width]}... ({len(shown) - width:,} more characters)"
    return f"{head}\n    {shown}"


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)

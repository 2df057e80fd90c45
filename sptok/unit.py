"""Process one work unit: read -> SP decisions -> tokenize -> assemble -> pack -> write -> commit.

This is what a worker process runs. A unit's output goes to a temporary directory that is renamed into
``.sptok/units/<uid>`` only when complete: the rename is the journal entry, so a killed build never
leaves a unit that looks committed but is not. Full samples are written as shards; the remainder
(< seq_len tokens) is kept as the unit's *tail*, stitched with the other tails of its source at the end.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .encoders import version
from .errors import SptokError
from .manifest import Unit
from .pack import Layout, Packer, assemble
from .readers import Rejects, read_unit
from .sp import decide, doc_hashes
from .writers import open_writer

HIST_BINS = 32   # document length histogram: bin b holds lengths in [2**(b-1), 2**b)


@dataclass
class UnitContext:
    """Everything a worker needs, built once per process from the plan."""
    work: str                 # .sptok directory
    fmt: str
    dtype: str
    seq_len: int
    shard_size: int
    seed: int
    insert_prob: float
    msp_prob: float
    layout: Layout
    sources: dict             # name -> {"text_field", "id_field"}
    literals: list[str]       # SP / delimiter strings to count when found in text
    strict: bool
    encoder: object           # .encode(texts) -> (flat ids, lengths)


def unit_dir(work: str, unit: Unit) -> str:
    return os.path.join(work, "units", unit.uid)


def is_committed(work: str, unit: Unit) -> bool:
    return os.path.exists(os.path.join(unit_dir(work, unit), "result.json"))


def process_unit(ctx: UnitContext, unit: Unit, progress=None) -> dict:
    """Build one unit and commit it; returns its result (counts, files)."""
    final = unit_dir(ctx.work, unit)
    tmp = os.path.join(ctx.work, "tmp", f"{unit.uid}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        result = _build(ctx, unit, tmp, progress)
        with open(os.path.join(tmp, "result.json"), "w") as f:
            json.dump(result, f, sort_keys=True)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.rename(tmp, final)          # the commit
        except OSError:
            if not os.path.exists(os.path.join(final, "result.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)   # committed meanwhile by another process: same bytes
        return result
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise SptokError(f"disk full while building {unit.relpath} into {ctx.work}: free some space and "
                             f"run the same command again; committed units are kept") from None
        if e.filename and not str(e.filename).startswith(ctx.work):
            raise SptokError(f"cannot read {e.filename}: {e.strerror}") from None
        raise SptokError(f"cannot write {e.filename or ctx.work}: {e.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(ctx: UnitContext, unit: Unit, tmp: str, progress) -> dict:
    src = ctx.sources[unit.source]
    quarantine = _Quarantine(os.path.join(tmp, "rejects.jsonl.zst"))
    rejects = Rejects(source=unit.source, strict=ctx.strict, sink=quarantine.add)
    writer = open_writer(ctx.fmt, tmp, ctx.dtype, ctx.shard_size)
    packer = Packer(ctx.seq_len, emit=lambda s: writer.write(s, unit.source_id))
    counts: Counter = Counter()
    hist = np.zeros(HIST_BINS, np.int64)
    reported = 0   # input bytes reported to progress so far
    for batch in read_unit(unit, src["text_field"], src["id_field"], rejects):
        hashes = doc_hashes(unit.source, batch.keys)
        dec = decide(hashes, ctx.seed, ctx.insert_prob, ctx.msp_prob)
        flat, lens = ctx.encoder.encode(batch.texts)
        stream, c = assemble(flat, lens, unit.source_id, hashes, dec, ctx.layout)
        counts.update(c)
        counts["docs"] += len(batch.texts)
        counts["text_chars"] += sum(map(len, batch.texts))
        if ctx.literals:
            joined = "\x00".join(batch.texts)
            counts["sp_literals"] += sum(joined.count(s) for s in ctx.literals)
        np.add.at(hist, np.minimum(_bit_length(lens), HIST_BINS - 1), 1)
        packer.add(stream)
        if progress is not None:
            done = max(reported, min(batch.nbytes, unit.size))
            progress(len(batch.texts), len(stream), done - reported)
            reported = done
    if progress is not None:
        progress(0, 0, unit.size - reported)
    tail = packer.take_tail()
    np.savez(os.path.join(tmp, "tail.npz"), **tail.to_npz())
    files = writer.finish()
    quarantine.close()
    counts["samples"] = packer.samples
    counts["sample_tokens"] = packer.samples * ctx.seq_len
    return {"unit": unit.to_json(), "encoder": f"{ctx.encoder.name} {version(ctx.encoder.name)}",
            "counts": dict(sorted(counts.items())), "hist": hist.tolist(),
            "rejected": dict(sorted(rejects.counts.items())), "examples": rejects.examples, "files": files,
            "tail_tokens": len(tail)}


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Vectorized int.bit_length: 0 -> 0, 1 -> 1, 2..3 -> 2, 4..7 -> 3."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64)


class _Quarantine:
    """Rejected records, as found, in a zstd JSONL file (opened on the first reject)."""

    def __init__(self, path: str):
        self.path = path
        self.f = None
        self.z = None

    def add(self, rec: dict) -> None:
        if self.z is None:
            import zstandard

            self.f = open(self.path, "wb")
            self.z = zstandard.ZstdCompressor(level=3).stream_writer(self.f, closefd=False)
        self.z.write(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")

    def close(self) -> None:
        if self.z is not None:
            self.z.close()
            self.f.close()
            self.z = self.f = None

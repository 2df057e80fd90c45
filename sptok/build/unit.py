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
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .encoders import version
from ..errors import SptokError
from .manifest import Unit
from .. import layout
from .holdout import DOC_KEYS, Held, UnitHoldout
from .metadata import UnitMetadata
from .pack import Packer, assemble, doc_counts
from .readers import Rejects, read_unit
from ..sp import Decisions, decide, doc_hashes
from ..sp_layout import SPLayout
from ..stats import HIST_BINS
from .writers import open_writer



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
    layout: SPLayout
    sp_ids: np.ndarray        # SP token id by source id
    sources: dict             # name -> {"text_field", "id_field"}
    literals: list[str]       # SP / delimiter strings to count when found in text
    strict: bool
    encoder: object           # .encode(texts) -> (flat ids, lengths)
    holdout: float | None = None        # the validation split: a share of the documents ...
    holdout_docs: int | None = None     # ... or a number per source
    metadata: dict | None = None        # source name -> its metadata options or None; None: no metadata at all

    @cached_property
    def count_literals(self):
        """text -> how many of ``literals`` it holds (``literal_counter``)."""
        return literal_counter(self.literals)


def unit_dir(work: str, unit: Unit) -> str:
    return layout.unit_dir(work, unit.index)


def is_committed(work: str, unit: Unit) -> bool:
    return layout.is_committed(unit_dir(work, unit))


def commit_files(work: str, unit: Unit, files: dict[str, bytes]) -> None:
    """Commit a unit built elsewhere from its files (name -> bytes): those of a remote output's unit that a Ray
    node built and uploaded, all but its shards. result.json last, then the rename, as ``process_unit``."""
    final = unit_dir(work, unit)
    tmp = layout.unit_tmp(work, unit.index, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in sorted(files, key=lambda n: n == layout.RESULT):
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(files[name])
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.rename(tmp, final)


def process_unit(ctx: UnitContext, unit: Unit, progress=None) -> dict:
    """Build one unit and commit it; returns its result (counts, files)."""
    final = unit_dir(ctx.work, unit)
    tmp = layout.unit_tmp(ctx.work, unit.index, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        result = _build(ctx, unit, tmp, progress)
        with open(os.path.join(tmp, layout.RESULT), "w") as f:   # last: what the rename commits
            json.dump(result, f, sort_keys=True)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.rename(tmp, final)          # the commit
        except OSError:
            if not layout.is_committed(final):
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
    quarantine = _Quarantine(os.path.join(tmp, layout.QUARANTINE))
    rejects = Rejects(source=unit.source, strict=ctx.strict, sink=quarantine.add)
    writer = open_writer(ctx.fmt, tmp, ctx.dtype, ctx.shard_size, meta=ctx.metadata is not None)
    packer = Packer(ctx.seq_len, emit=lambda s: writer.write(s, unit.source_id),
                    emit_run=lambda ids, key: writer.write_run(ids, key, unit.source_id))
    counts: Counter = Counter()
    hist = np.zeros(HIST_BINS, np.int64)
    reported = 0   # input bytes reported to progress so far
    holdout = UnitHoldout(ctx.seed, ctx.holdout, ctx.holdout_docs)
    late = Held.empty()          # documents set aside, then evicted from the unit's held-out ones
    ids = []                     # doc keys of a source with id_field, for finalize's count of duplicate ids
    spec = (ctx.metadata or {}).get(unit.source)
    meta = UnitMetadata(spec, ctx.seed, ctx.encoder) if spec else None
    for batch in read_unit(unit, src["text_field"], src["id_field"], rejects,
                           meta_field=spec["field"] if spec else None):
        hashes = doc_hashes(unit.source, batch.keys)
        if src["id_field"]:
            ids.append(hashes)
        dec = decide(hashes, ctx.seed, ctx.insert_prob, ctx.msp_prob)
        flat, lens = ctx.encoder.encode(batch.texts)
        m = None
        if meta:
            m = meta.encode(batch.meta, hashes)
            counts["meta_seen"] += sum(v is not None for v in batch.meta)   # records with the field, both splits
        held, u = holdout.pick(hashes)
        if held.any():
            late += holdout.add(_lay_out_held(ctx, unit, batch.texts, flat, lens, hashes, dec, m, held, u))
            flat, lens, hashes, dec, texts, m = _subset(flat, lens, hashes, dec, batch.texts, m, ~held)
        else:
            texts = batch.texts
        counts["docs"] += len(texts)
        counts["text_chars"] += sum(map(len, texts))
        if ctx.literals:
            counts["sp_literals"] += sum(map(ctx.count_literals, texts))   # no joined copy of the batch
        # a long document is held as text, then as ids, then as the stream, never all three at once
        texts = None
        batch.texts.clear()   # the reader's list too
        stream, c = assemble(flat, lens, int(ctx.sp_ids[unit.source_id]), hashes, dec, ctx.layout,
                             (m.flat, m.lens) if m else None)
        del flat
        counts.update(c)
        if m:
            counts.update(m.totals())
        np.add.at(hist, np.minimum(_bit_length(lens), HIST_BINS - 1), 1)
        packer.add(stream)
        if progress is not None:
            done = max(reported, min(batch.nbytes, unit.size))
            progress(len(batch.keys), len(stream), done - reported)
            reported = done
    if progress is not None:
        progress(0, 0, unit.size - reported)
    if len(late):                # trained on after all: packed at the unit's end, in eviction order
        packer.add(late.stream)
        counts.update(late.totals())
        np.add.at(hist, late.bins, 1)
    if holdout.active:
        holdout.held.save(os.path.join(tmp, layout.HOLDOUT))
    if ids:
        np.save(os.path.join(tmp, layout.ID_HASHES), np.sort(np.concatenate(ids)))
    if meta:
        np.save(os.path.join(tmp, layout.META_HASHES), meta.value_hashes())
    tail = packer.take_tail()
    tail.save(os.path.join(tmp, layout.TAIL))
    files = writer.finish()
    quarantine.close()
    counts["samples"] = packer.samples
    counts["sample_tokens"] = packer.samples * ctx.seq_len
    out = {"unit": unit.to_json(), "encoder": f"{ctx.encoder.name} {version(ctx.encoder.name)}",
           "counts": dict(sorted(counts.items())), "hist": hist.tolist(),
           "rejected": dict(sorted(rejects.counts.items())), "examples": rejects.examples, "files": files,
           "tail_tokens": len(tail)}
    if holdout.active:
        out["held_docs"] = len(holdout.held)
    if meta:
        out["meta_values"] = meta.result()
    return out


def literal_counter(literals: list[str]):
    """text -> the occurrences of the SP and delimiter strings in it, each string's counted as ``str.count``
    counts them (``sp_literals``). Where no two occurrences can overlap (`<NAME>`-shaped strings never do), one
    regex pass finds them all, several times faster than a ``str.count`` per string; else that."""
    if not literals:
        return lambda text: 0
    if not any(a != b and a in b or any(b.startswith(a[k:]) for k in range(1, len(a)))
               for a in literals for b in literals):
        find = re.compile("|".join(map(re.escape, literals))).findall
        return lambda text: len(find(text))
    return lambda text: sum(text.count(s) for s in literals)


def _subset(flat, lens, hashes, dec, texts, meta, keep):
    """The batch's documents where ``keep`` is true (token ids, lengths, hashes, decisions, texts, metadata)."""
    flat = flat[np.repeat(keep, lens)]
    dec = Decisions(dec.inserted[keep], dec.masked_prefix[keep], dec.masked_post[keep])
    return (flat, lens[keep], hashes[keep], dec, [t for t, k in zip(texts, keep) if k],
            meta.take(keep) if meta else None)


def _lay_out_held(ctx, unit, texts, flat, lens, hashes, dec, meta, held, u) -> Held:
    """The documents set aside for the validation split, laid out as training documents are, with the
    counts each adds to whichever split it ends up in."""
    flat, lens, hashes, dec, texts, meta = _subset(flat, lens, hashes, dec, texts, meta, held)
    stream, _ = assemble(flat, lens, int(ctx.sp_ids[unit.source_id]), hashes, dec, ctx.layout,
                         (meta.flat, meta.lens) if meta else None)
    per_doc = {"docs": np.ones(len(lens), np.int64), "text_chars": [len(t) for t in texts],
               "sp_literals": [ctx.count_literals(t) for t in texts],
               **doc_counts(lens, dec, ctx.layout, meta.lens if meta else None), **(meta.counts if meta else {})}
    zeros = np.zeros(len(lens), np.int64)   # a source without metadata
    counts = np.stack([np.asarray(per_doc.get(k, zeros), np.int64) for k in DOC_KEYS], axis=1)
    return Held(stream, u[held], counts, np.minimum(_bit_length(lens), HIST_BINS - 1))


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

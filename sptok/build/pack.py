"""Assemble documents with their SPs and delimiters into one token stream, and cut it into samples.

Pure numpy. A *segment* is the part of one document inside one stream or sample; every sample starts a
segment at position 0 (a document continued from the previous sample starts one there too), so
``doc_offsets[0] == 0`` always and ``doc_keys`` runs parallel to ``doc_offsets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..sp import Decisions
from ..sp_layout import SPLayout

LONG_DOC_TOKENS = 128   # from this many tokens per document on average, assemble copies each one's as a slice
MIN_RUN = 8             # samples inside one document that the packer hands on as one run


@dataclass
class Stream:
    """A run of tokens with the metadata of what lies where. Positions are relative to ``ids[0]``."""
    ids: np.ndarray          # uint32 token ids
    seg_starts: np.ndarray   # int64, sorted, starts of segments (first is 0 when ids is non-empty)
    seg_keys: np.ndarray     # uint64, document hash of each segment
    sp_pos: np.ndarray       # int64, sorted, positions of SP tokens
    sp_masked: np.ndarray    # uint8, 1 = SP marked for MSP, parallel to sp_pos

    @staticmethod
    def empty() -> "Stream":
        return Stream(np.empty(0, np.uint32), np.empty(0, np.int64), np.empty(0, np.uint64),
                      np.empty(0, np.int64), np.empty(0, np.uint8))

    def __len__(self) -> int:
        return len(self.ids)

    def copy(self) -> "Stream":
        return Stream(**{k: v.copy() for k, v in self.to_npz().items()})

    def to_npz(self) -> dict:
        return {k: getattr(self, k) for k in ("ids", "seg_starts", "seg_keys", "sp_pos", "sp_masked")}

    @staticmethod
    def from_npz(z) -> "Stream":
        """The stream saved with ``to_npz`` (in an open ``np.load``, which may hold other arrays too)."""
        return Stream(z["ids"], z["seg_starts"], z["seg_keys"], z["sp_pos"], z["sp_masked"])

    def save(self, path: str) -> None:
        np.savez(path, **self.to_npz())

    @staticmethod
    def load(path: str) -> "Stream":
        with np.load(path) as z:
            return Stream.from_npz(z)


def assemble(flat: np.ndarray, text_len: np.ndarray, sp_id: int, hashes: np.ndarray, dec: Decisions,
             layout: SPLayout) -> tuple[Stream, dict]:
    """Lay out documents as the SP layout says ([SP delim] text [delim SP] EOS), SPs only where inserted.

    ``flat`` holds the text token ids of all documents back to back, ``text_len`` how many each has; ``sp_id``
    is their source's SP. Returns the stream and counts (text tokens, SPs inserted / masked, delimiter
    tokens, EOS tokens).
    """
    n = len(text_len)
    text_len = text_len.astype(np.int64)
    delim = np.array(layout.delimiter_ids, np.uint32)
    d = len(delim)
    ins = dec.inserted
    pre_len = np.where(ins & layout.prefix, 1 + d, 0).astype(np.int64)
    post_len = np.where(ins & layout.post, 1 + d, 0).astype(np.int64)
    doc_len = pre_len + text_len + post_len + 1
    doc_start = np.zeros(n, np.int64)
    np.cumsum(doc_len[:-1], out=doc_start[1:])
    out = np.empty(int(doc_len.sum()), np.uint32)
    # text tokens fill what SPs, delimiters and EOS leave, in order: one slice per document where documents are
    # long (a mask over a 50 MB document's tokens costs 8x its copy), else a mask, which costs one byte per
    # token, where an index array (a shift per token) would cost sixteen
    is_text = np.ones(len(out), bool) if len(flat) < LONG_DOC_TOKENS * n else None
    sp_pos, sp_masked = [], []
    for post, on, masked in ((False, layout.prefix, dec.masked_prefix), (True, layout.post, dec.masked_post)):
        if not on:
            continue
        p = doc_start[ins] + layout.post_sp_offset(text_len[ins]) if post else doc_start[ins]
        out[p] = np.uint32(sp_id)
        out[p[:, None] + layout.delimiter_offsets(post)] = delim
        if is_text is not None:
            is_text[p] = is_text[p[:, None] + layout.delimiter_offsets(post)] = False
        sp_pos.append(p)
        sp_masked.append(masked[ins])
    out[doc_start + doc_len - 1] = layout.eos_id
    if is_text is not None:
        is_text[doc_start + doc_len - 1] = False
        out[is_text] = flat
    else:
        text_start = doc_start + pre_len
        for a, b, k in zip(text_start.tolist(), (np.cumsum(text_len) - text_len).tolist(), text_len.tolist()):
            out[a:a + k] = flat[b:b + k]
    pos = np.concatenate(sp_pos) if sp_pos else np.empty(0, np.int64)
    msk = np.concatenate(sp_masked).astype(np.uint8) if sp_masked else np.empty(0, np.uint8)
    order = np.argsort(pos, kind="stable")
    stream = Stream(out, doc_start, hashes.astype(np.uint64), pos[order].astype(np.int64), msk[order])
    return stream, {k: int(v.sum()) for k, v in doc_counts(text_len, dec, layout).items()}


def doc_counts(text_len: np.ndarray, dec: Decisions, layout: SPLayout) -> dict[str, np.ndarray]:
    """What each document adds to the counts (int64 per document): text tokens, SPs inserted and masked,
    delimiter tokens, EOS tokens."""
    ins = dec.inserted
    n_sp = ins.astype(np.int64) * layout.sites
    masked = (dec.masked_prefix & ins).astype(np.int64) * layout.prefix + (dec.masked_post & ins) * layout.post
    return {"text_tokens": np.asarray(text_len, np.int64),
            "sp_inserted": n_sp,
            "sp_masked": masked.astype(np.int64),
            "delimiter_tokens": n_sp * len(layout.delimiter_ids),
            "eos_tokens": np.ones(len(text_len), np.int64)}


def concat(a: Stream, b: Stream) -> Stream:
    off = len(a.ids)
    return Stream(np.concatenate([a.ids, b.ids]),
                  np.concatenate([a.seg_starts, b.seg_starts + off]),
                  np.concatenate([a.seg_keys, b.seg_keys]),
                  np.concatenate([a.sp_pos, b.sp_pos + off]),
                  np.concatenate([a.sp_masked, b.sp_masked]))


def take_docs(s: Stream, keep: np.ndarray) -> Stream:
    """The segments of ``s`` where ``keep`` (bool per segment) is true, back to back. In an assembled
    stream every segment is one whole document, so this selects documents."""
    keep = np.asarray(keep, bool)
    lens = np.diff(np.append(s.seg_starts, len(s.ids)))
    new_starts = np.zeros(int(keep.sum()), np.int64)
    np.cumsum(lens[keep][:-1], out=new_starts[1:])
    seg = np.searchsorted(s.seg_starts, s.sp_pos, side="right") - 1          # the segment of each SP
    sp_keep = keep[seg]
    rank = np.cumsum(keep) - 1                                              # new index of a kept segment
    sp_pos = s.sp_pos[sp_keep] - s.seg_starts[seg[sp_keep]] + new_starts[rank[seg[sp_keep]]]
    return Stream(s.ids[np.repeat(keep, lens)], new_starts, s.seg_keys[keep], sp_pos.astype(np.int64),
                  s.sp_masked[sp_keep])


def cut(s: Stream, lo: int, hi: int) -> Stream:
    """The part [lo, hi) of a stream, positions re-based to lo; starts a segment at 0."""
    i0 = int(np.searchsorted(s.seg_starts, lo, side="right")) - 1   # segment holding lo
    i1 = int(np.searchsorted(s.seg_starts, hi, side="left"))
    starts = s.seg_starts[i0:i1] - lo
    starts[0] = 0
    j0, j1 = np.searchsorted(s.sp_pos, [lo, hi], side="left")
    return Stream(s.ids[lo:hi], starts, s.seg_keys[i0:i1], s.sp_pos[j0:j1] - lo, s.sp_masked[j0:j1])


class Packer:
    """Cuts a stream into ``seq_len`` samples as it arrives; keeps the remainder (< seq_len) as the tail.

    ``emit_run(ids, key)``, where given, takes a run of samples that lie inside one document and hold no SP
    (``ids``: one row each; ``key``: the document's hash) at once: the middle of a long document, written
    without a Stream per sample."""

    def __init__(self, seq_len: int, emit: Callable[[Stream], None],
                 emit_run: Callable[[np.ndarray, int], None] | None = None):
        self.seq_len = seq_len
        self.emit = emit
        self.emit_run = emit_run
        self.pending = Stream.empty()
        self.samples = 0

    def add(self, s: Stream) -> None:
        if not len(s):
            return
        buf = concat(self.pending, s) if len(self.pending) else s
        full = len(buf) // self.seq_len
        k, n = 0, self.seq_len
        for a, b, key in _runs(buf, full, n) if self.emit_run is not None else ():
            for j in range(k, a):
                self.emit(cut(buf, j * n, (j + 1) * n))
            self.emit_run(buf.ids[a * n:b * n].reshape(b - a, n), key)
            k = b
        for j in range(k, full):
            self.emit(cut(buf, j * n, (j + 1) * n))
        self.samples += full
        rest = full * self.seq_len
        # a copy: a view would keep all of ``s`` (a long document's ids) alive until the next add
        self.pending = cut(buf, rest, len(buf)).copy() if rest < len(buf) else Stream.empty()

    def take_tail(self) -> Stream:
        tail, self.pending = self.pending, Stream.empty()
        return tail


def _runs(s: Stream, full: int, n: int, least: int = MIN_RUN):
    """(first, end, document key) of each run of at least ``least`` consecutive samples of ``s`` (sample j is
    [j * n, (j + 1) * n)) that lie inside one segment and hold no SP."""
    if full < least:
        return
    lo = np.arange(full, dtype=np.int64) * n
    seg = np.searchsorted(s.seg_starts, lo, side="right") - 1
    inside = np.searchsorted(s.seg_starts, lo + n, side="left") - seg == 1
    no_sp = np.searchsorted(s.sp_pos, lo + n) == np.searchsorted(s.sp_pos, lo)
    run = np.where(inside & no_sp, seg, -1)
    bounds = [0, *(np.flatnonzero(np.diff(run)) + 1).tolist(), full]
    for a, b in zip(bounds, bounds[1:]):
        if run[a] >= 0 and b - a >= least:
            yield a, b, int(s.seg_keys[run[a]])


def pad(s: Stream, seq_len: int, pad_id: int) -> Stream:
    """Pad a short final sample to ``seq_len`` with ``pad_id`` (no segment starts in the padding)."""
    ids = np.full(seq_len, pad_id, np.uint32)
    ids[: len(s.ids)] = s.ids
    return Stream(ids, s.seg_starts, s.seg_keys, s.sp_pos, s.sp_masked)

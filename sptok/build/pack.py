"""Assemble documents with their SPs and delimiters into one token stream, and cut it into samples.

Pure numpy. A *segment* is the part of one document inside one stream or sample; every sample starts a
segment at position 0 (a document continued from the previous sample starts one there too), so
``doc_offsets[0] == 0`` always and ``doc_keys`` runs parallel to ``doc_offsets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    # int64 (k, 2), sorted, non-overlapping: [start, end) of each document's metadata tokens
    meta_spans: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.int64))

    @staticmethod
    def empty() -> "Stream":
        return Stream(np.empty(0, np.uint32), np.empty(0, np.int64), np.empty(0, np.uint64),
                      np.empty(0, np.int64), np.empty(0, np.uint8))

    def __len__(self) -> int:
        return len(self.ids)

    def copy(self) -> "Stream":
        return Stream(**{k: v.copy() for k, v in self.to_npz().items()})

    def to_npz(self) -> dict:
        return {k: getattr(self, k) for k in ("ids", "seg_starts", "seg_keys", "sp_pos", "sp_masked", "meta_spans")}

    @staticmethod
    def from_npz(z) -> "Stream":
        """The stream saved with ``to_npz`` (in an open ``np.load``, which may hold other arrays too)."""
        return Stream(z["ids"], z["seg_starts"], z["seg_keys"], z["sp_pos"], z["sp_masked"], z["meta_spans"])

    def save(self, path: str) -> None:
        np.savez(path, **self.to_npz())

    @staticmethod
    def load(path: str) -> "Stream":
        with np.load(path) as z:
            return Stream.from_npz(z)


def assemble(flat: np.ndarray, text_len: np.ndarray, sp_id: int, hashes: np.ndarray, dec: Decisions,
             layout: SPLayout, meta: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Stream, dict]:
    """Lay out documents as the SP layout says ([SP delim] [META] text [delim SP] EOS), SPs only where
    inserted, a document's metadata tokens right before its text.

    ``flat`` holds the text token ids of all documents back to back, ``text_len`` how many each has; ``sp_id``
    is their source's SP; ``meta``, when given, the metadata token ids back to back and how many each
    document has (0: none). Returns the stream and counts (text tokens, SPs inserted / masked, delimiter
    tokens, EOS tokens, and with ``meta`` the documents with metadata and their tokens).
    """
    n = len(text_len)
    text_len = text_len.astype(np.int64)
    meta_flat, meta_len = meta if meta is not None else (None, np.zeros(n, np.int64))
    meta_len = meta_len.astype(np.int64)
    delim = np.array(layout.delimiter_ids, np.uint32)
    d = len(delim)
    ins = dec.inserted
    pre_len = np.where(ins & layout.prefix, 1 + d, 0).astype(np.int64)
    post_len = np.where(ins & layout.post, 1 + d, 0).astype(np.int64)
    doc_len = pre_len + meta_len + text_len + post_len + 1
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
        p = doc_start[ins] + layout.post_sp_offset(meta_len[ins] + text_len[ins]) if post else doc_start[ins]
        out[p] = np.uint32(sp_id)
        out[p[:, None] + layout.delimiter_offsets(post)] = delim
        if is_text is not None:
            is_text[p] = is_text[p[:, None] + layout.delimiter_offsets(post)] = False
        sp_pos.append(p)
        sp_masked.append(masked[ins])
    out[doc_start + doc_len - 1] = layout.eos_id
    spans = np.empty((0, 2), np.int64)
    if meta is not None:
        has = meta_len > 0
        spans = np.stack([doc_start + pre_len, doc_start + pre_len + meta_len], axis=1)[has]
        at = np.repeat(spans[:, 0] - np.cumsum(meta_len[has]) + meta_len[has], meta_len[has]) \
            + np.arange(len(meta_flat))    # each metadata token's position
        out[at] = meta_flat
        if is_text is not None:
            is_text[at] = False
    if is_text is not None:
        is_text[doc_start + doc_len - 1] = False
        out[is_text] = flat
    else:
        text_start = doc_start + pre_len + meta_len
        for a, b, k in zip(text_start.tolist(), (np.cumsum(text_len) - text_len).tolist(), text_len.tolist()):
            out[a:a + k] = flat[b:b + k]
    pos = np.concatenate(sp_pos) if sp_pos else np.empty(0, np.int64)
    msk = np.concatenate(sp_masked).astype(np.uint8) if sp_masked else np.empty(0, np.uint8)
    order = np.argsort(pos, kind="stable")
    stream = Stream(out, doc_start, hashes.astype(np.uint64), pos[order].astype(np.int64), msk[order], spans)
    return stream, {k: int(v.sum()) for k, v in doc_counts(text_len, dec, layout, meta_len if meta else None).items()}


def doc_counts(text_len: np.ndarray, dec: Decisions, layout: SPLayout,
               meta_len: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """What each document adds to the counts (int64 per document): text tokens, SPs inserted and masked,
    delimiter tokens, EOS tokens; with ``meta_len``, whether it carries metadata and how many tokens."""
    ins = dec.inserted
    n_sp = ins.astype(np.int64) * layout.sites
    masked = (dec.masked_prefix & ins).astype(np.int64) * layout.prefix + (dec.masked_post & ins) * layout.post
    out = {"text_tokens": np.asarray(text_len, np.int64),
           "sp_inserted": n_sp,
           "sp_masked": masked.astype(np.int64),
           "delimiter_tokens": n_sp * len(layout.delimiter_ids),
           "eos_tokens": np.ones(len(text_len), np.int64)}
    if meta_len is not None:
        out["meta_docs"] = (np.asarray(meta_len) > 0).astype(np.int64)
        out["meta_tokens"] = np.asarray(meta_len, np.int64)
    return out


def concat(a: Stream, b: Stream) -> Stream:
    off = len(a.ids)
    return Stream(np.concatenate([a.ids, b.ids]),
                  np.concatenate([a.seg_starts, b.seg_starts + off]),
                  np.concatenate([a.seg_keys, b.seg_keys]),
                  np.concatenate([a.sp_pos, b.sp_pos + off]),
                  np.concatenate([a.sp_masked, b.sp_masked]),
                  np.concatenate([a.meta_spans, b.meta_spans + off]))


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
    mseg = np.searchsorted(s.seg_starts, s.meta_spans[:, 0], side="right") - 1   # the segment of each span
    m_keep = keep[mseg]
    shift = new_starts[rank[mseg[m_keep]]] - s.seg_starts[mseg[m_keep]]
    return Stream(s.ids[np.repeat(keep, lens)], new_starts, s.seg_keys[keep], sp_pos.astype(np.int64),
                  s.sp_masked[sp_keep], (s.meta_spans[m_keep] + shift[:, None]).astype(np.int64))


def cut(s: Stream, lo: int, hi: int) -> Stream:
    """The part [lo, hi) of a stream, positions re-based to lo; starts a segment at 0."""
    i0 = int(np.searchsorted(s.seg_starts, lo, side="right")) - 1   # segment holding lo
    i1 = int(np.searchsorted(s.seg_starts, hi, side="left"))
    starts = s.seg_starts[i0:i1] - lo
    starts[0] = 0
    j0, j1 = np.searchsorted(s.sp_pos, [lo, hi], side="left")
    # a span cut by an edge keeps its part inside [lo, hi)
    m0 = int(np.searchsorted(s.meta_spans[:, 1], lo, side="right"))
    m1 = int(np.searchsorted(s.meta_spans[:, 0], hi, side="left"))
    spans = np.clip(s.meta_spans[m0:m1], lo, hi) - lo
    return Stream(s.ids[lo:hi], starts, s.seg_keys[i0:i1], s.sp_pos[j0:j1] - lo, s.sp_masked[j0:j1], spans)


class Packer:
    """Cuts a stream into ``seq_len`` samples as it arrives; keeps the remainder (< seq_len) as the tail.

    ``emit_run(ids, key)``, where given, takes a run of samples that lie inside one document and hold no SP and
    no metadata (``ids``: one row each; ``key``: the document's hash) at once: the middle of a long document, written
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
    [j * n, (j + 1) * n)) that lie inside one segment and hold no SP and no metadata token."""
    if full < least:
        return
    lo = np.arange(full, dtype=np.int64) * n
    seg = np.searchsorted(s.seg_starts, lo, side="right") - 1
    inside = np.searchsorted(s.seg_starts, lo + n, side="left") - seg == 1
    no_sp = np.searchsorted(s.sp_pos, lo + n) == np.searchsorted(s.sp_pos, lo)
    # no metadata token either: no span starts before the sample's end and ends after its start
    no_meta = np.searchsorted(s.meta_spans[:, 0], lo + n) == np.searchsorted(s.meta_spans[:, 1], lo, side="right")
    run = np.where(inside & no_sp & no_meta, seg, -1)
    bounds = [0, *(np.flatnonzero(np.diff(run)) + 1).tolist(), full]
    for a, b in zip(bounds, bounds[1:]):
        if run[a] >= 0 and b - a >= least:
            yield a, b, int(s.seg_keys[run[a]])


def pad(s: Stream, seq_len: int, pad_id: int) -> Stream:
    """Pad a short final sample to ``seq_len`` with ``pad_id`` (no segment starts in the padding)."""
    ids = np.full(seq_len, pad_id, np.uint32)
    ids[: len(s.ids)] = s.ids
    return Stream(ids, s.seg_starts, s.seg_keys, s.sp_pos, s.sp_masked, s.meta_spans)

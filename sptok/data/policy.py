"""Load-time SP and metadata policy: re-decide the SPs and metadata of a built sample without rebuilding.

  keep         as built
  strip        remove every SP and its delimiter (the paper's "none", or an SP-free cooldown)
  msp=p        re-draw the MSP flags: each SP is masked with probability p
  insert=q     keep each SP (and its delimiter) with probability q
  misplaced    each SP replaced by another source's (a seeded derangement of the build's SPs: the control)
  meta=keep    metadata as built (the default)
  meta=strip   remove every metadata span (MeCo's cooldown)
  meta=q       keep each metadata span with probability q
  meta=misplaced   each metadata span replaced by another of the batch with other tokens (the control)

Parts combine with commas (``insert=0.9,msp=0.2,meta=strip``); ``str(policy)`` writes the parsed policy back.

Every draw is keyed by (seed, the sample's content, the SP's or span's rank in the sample): the same sample gets
the same decisions in any order, on any rank or worker, and after a resume (``meta=misplaced`` also depends on
which samples share its batch, the donors). Removed tokens are cut out and the sample is padded back to its
length at the end (one moved in longer is cut there), so shapes stay fixed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from ..build_info import BuildInfo
from ..errors import SptokError
from ..sp import GOLDEN, SLOT_LOAD_INSERT as SLOT_INSERT, SLOT_LOAD_META as SLOT_META, \
    SLOT_LOAD_META_MISPLACED as SLOT_META_MISPLACED, SLOT_LOAD_MLM as SLOT_MLM, SLOT_LOAD_MSP as SLOT_MSP, \
    SLOT_LOAD_T5 as SLOT_T5, derangement, mix64, uniforms

__all__ = ["SPPolicy", "apply_policy", "apply_meta_policy", "draws", "sample_key", "meta_pool", "misplaced_sp_map",
           "SLOT_INSERT", "SLOT_MSP", "SLOT_MLM", "SLOT_T5", "SLOT_META", "SLOT_META_MISPLACED"]

GRAMMAR = ("keep, strip, misplaced, insert=Q, msp=P, meta=keep|strip|misplaced|Q, or parts joined by commas "
           "(insert=0.9,meta=strip)")


@dataclass(frozen=True)
class SPPolicy:
    insert: float | None = None   # probability of keeping each SP; 0 strips them all
    msp: float | None = None      # probability of masking each kept SP for MSP; None keeps the built flags
    misplaced: bool = False       # each SP replaced by another source's
    meta: str | float | None = None   # None: as built; "strip", "misplaced", or the probability of keeping a span

    @classmethod
    def parse(cls, text: "str | SPPolicy") -> "SPPolicy":
        if isinstance(text, SPPolicy):
            return text
        if text is not None and not isinstance(text, str):
            raise SptokError(f"SP policy {text!r}: expected {GRAMMAR}")
        text = (text or "keep").strip()
        if text == "keep":
            return cls()
        kw: dict = {}
        for part in text.split(","):
            name, eq, value = (x.strip() for x in part.partition("="))
            if not eq and name in ("strip", "misplaced"):
                name, value = ("insert", "0") if name == "strip" else ("sp", "misplaced")
            elif not eq or name not in ("insert", "msp", "meta", "sp") or not value:
                raise SptokError(f"SP policy {text!r}: {part.strip()!r} is not a part; expected {GRAMMAR}")
            key = "misplaced" if name == "sp" else name
            if key in kw:
                raise SptokError(f"SP policy {text!r}: {name} is given twice")
            kw[key] = _value(text, name, value)
        if kw.get("misplaced") and kw.get("insert") == 0.0:
            raise SptokError(f"SP policy {text!r}: misplaced with every SP stripped leaves no SP to misplace")
        kw["meta"] = None if kw.get("meta") == "keep" else kw.get("meta")
        return cls(**kw)

    @property
    def is_keep(self) -> bool:
        return self.insert is None and self.msp is None and not self.misplaced and self.meta is None

    @property
    def meta_keep(self) -> float | None:
        """The probability of keeping each metadata span (``meta=strip``: 0), None when not drawn."""
        return 0.0 if self.meta == "strip" else self.meta if isinstance(self.meta, float) else None

    def __str__(self) -> str:
        if self.is_keep:
            return "keep"
        parts = ["misplaced"] if self.misplaced else []
        if self.insert == 0.0 and self.msp is None:
            parts.append("strip")
        else:
            parts += [f"{k}={v}" for k, v in (("insert", self.insert), ("msp", self.msp)) if v is not None]
        if self.meta is not None:
            parts.append(f"meta={self.meta}")
        return ",".join(parts)


def _value(text: str, name: str, value: str):
    """One part's value: a probability, or for ``meta`` also keep / strip / misplaced."""
    if name == "sp":
        if value != "misplaced":
            raise SptokError(f"SP policy {text!r}: sp={value} is not a choice; expected sp=misplaced")
        return True
    if name == "meta" and value in ("keep", "strip", "misplaced"):
        return value
    try:
        p = float(value)
    except ValueError:
        words = " (or keep, strip, misplaced)" if name == "meta" else ""
        raise SptokError(f"SP policy {text!r}: {name}={value}: {value!r} is not a number{words}") from None
    if not 0.0 <= p <= 1.0:
        raise SptokError(f"SP policy {text!r}: {name} must be a probability in [0, 1]")
    return p


def sample_key(ids: np.ndarray, source_id: int, seed: int) -> np.uint64:
    """A 64-bit key of the sample's content, so its random draws do not depend on where it is read."""
    import xxhash

    return np.uint64(xxhash.xxh64_intdigest(np.ascontiguousarray(ids, dtype=np.int64).tobytes(),
                                            seed=(seed * 1_000_003 + source_id) & 0xFFFFFFFFFFFFFFFF))


def draws(key, n: int, slot: int) -> np.ndarray:
    """n uniforms in [0, 1) for the sample with ``key``, one per SP (or token) rank; with an array of keys,
    one row per key."""
    keys = np.asarray(key, np.uint64)
    return uniforms(mix64(keys[..., None] + _RANKS[:n] if n <= len(_RANKS) else
                          keys[..., None] + np.arange(n, dtype=np.uint64) * GOLDEN), 0, slot)


_RANKS = np.arange(1 << 16, dtype=np.uint64) * GOLDEN


def misplaced_sp_map(info: BuildInfo, seed: int) -> np.ndarray:
    """Token id -> token id, every SP sent to the SP of another source (``sptok.sp.derangement`` of the build's
    sources), everything else to itself."""
    if len(info.sp_ids) < 2:
        raise SptokError(f"SP policy misplaced: {info.path} has one source; misplacing its SP needs at least two")
    m = np.arange(max(info.vocab_size, int(info.sp_ids.max()) + 1), dtype=np.int64)
    m[info.sp_ids] = info.sp_ids[derangement(len(info.sp_ids), seed)]
    return m


def meta_pool(samples: list[dict]) -> list[bytes]:
    """The distinct metadata values (token sequences as int64 bytes) of ``samples``, sorted: the donors of
    ``meta=misplaced``, in an order that does not depend on the samples' order."""
    return sorted({a["input_ids"][b:e].tobytes() for a in samples for b, e in a.get("meta_spans", ()).tolist()})


def apply_policy(s: dict, policy: SPPolicy, info: BuildInfo, key: np.uint64, length: int | None = None,
                 u_insert: np.ndarray | None = None, u_msp: np.ndarray | None = None, pool: list[bytes] | None = None,
                 sp_map: np.ndarray | None = None, seed: int = 0) -> dict:
    """The sample with the policy applied; ``length`` (default: its own) is kept by padding with [PAD] (or
    cutting the end, when misplaced metadata made it longer).

    ``u_insert`` / ``u_msp`` are the sample's draws when a caller computed a whole batch's at once
    (``draws(keys, n, slot)`` row by row equals ``draws(key, n, slot)``). ``pool`` is ``meta_pool`` of the
    batch (default: of this sample alone), ``sp_map`` ``misplaced_sp_map(info, seed)``. A sample that was
    edited carries ``origin``: the position in ``s`` each token came from (-1: moved in)."""
    if policy.is_keep:
        return s
    pos = s["sp_positions"]
    out = dict(s)
    n = len(s["input_ids"])
    cut, keep_sp, moved_in = None, np.ones(len(pos), bool), None
    if policy.insert is not None:
        u = u_insert[: len(pos)] if u_insert is not None else draws(key, len(pos), SLOT_INSERT)
        keep_sp = u < policy.insert
        if not keep_sp.all() or (policy.insert == 0.0 and info.delimiter_special):
            cut = _sp_cut(s, ~keep_sp, info)
    spans = s.get("meta_spans", _NO_SPANS)
    if policy.meta is not None and len(spans):
        if policy.meta == "misplaced":
            drop = np.ones(len(spans), bool)
            moved_in = _misplace(s["input_ids"], spans, key, meta_pool([s]) if pool is None else pool)
        else:
            drop = draws(key, len(spans), SLOT_META) >= policy.meta_keep
        if drop.any():
            cut = np.zeros(n, bool) if cut is None else cut
            cut[_span_mask(spans[drop], n)] = True
    if cut is not None:
        out = _edit(s, cut, keep_sp, moved_in, info, length)
    return _sp_draws(out, s, policy, info, key, u_msp, sp_map, seed)


def _sp_draws(out: dict, s: dict, policy: SPPolicy, info: BuildInfo, key, u_msp, sp_map, seed: int) -> dict:
    """``out`` (sample ``s`` edited) with the MSP flags re-drawn and the SPs misplaced, as ``policy`` says."""
    pos, msk = out["sp_positions"], out["msp_mask"]
    if policy.msp is not None:
        if u_msp is not None and len(pos) == len(s["sp_positions"]):
            msk = u_msp[: len(pos)] < policy.msp
        else:   # after removals the kept SPs are re-ranked
            msk = draws(key, len(pos), SLOT_MSP) < policy.msp
    out["msp_mask"] = msk.astype(bool)
    if policy.misplaced and len(pos):
        ids = out["input_ids"].copy()
        ids[pos] = (misplaced_sp_map(info, seed) if sp_map is None else sp_map)[ids[pos]]
        out["input_ids"] = ids
    return out


def apply_meta_policy(arrays: list[dict], policy: SPPolicy, info: BuildInfo, keys: np.ndarray,
                      u_msp: np.ndarray | None = None, sp_map: np.ndarray | None = None, seed: int = 0,
                      with_origin: bool = True) -> list[dict]:
    """``apply_policy`` of every sample of a batch at once, for a policy that moves no SP (``insert`` unset):
    the metadata edits of all samples in a few array operations over the batch, not a few dozen per sample
    (``tests/test_meta_load.py`` holds the two equal). ``with_origin=False`` leaves ``origin`` out (only
    evaluation reads it)."""
    B = len(arrays)
    k = np.array([len(a["meta_spans"]) for a in arrays], np.int64)
    rows = [dict(a) for a in arrays]
    if policy.meta is not None and k.any():
        _edit_batch(arrays, rows, k, policy, info, keys, with_origin)
    u = u_msp if u_msp is not None else [None] * B
    return [_sp_draws(r, a, policy, info, key, u[b], sp_map, seed) for b, (r, a, key) in
            enumerate(zip(rows, arrays, keys))]


def _edit_batch(arrays: list[dict], rows: list[dict], k: np.ndarray, policy: SPPolicy, info: BuildInfo,
                keys: np.ndarray, with_origin: bool) -> None:
    """The metadata edits of ``_edit`` for a whole batch: each sample's row in ``rows`` replaced where one of its
    spans goes (kept to its own length)."""
    B = len(arrays)
    n = np.array([len(a["input_ids"]) for a in arrays], np.int64)
    L = int(n.max())
    spans = np.concatenate([a["meta_spans"] for a in arrays])
    row = np.repeat(np.arange(B), k)
    rank = np.arange(len(spans)) - np.repeat(np.cumsum(k) - k, k)
    if policy.meta == "misplaced":
        drop = np.ones(len(spans), bool)
        pool = meta_pool(arrays)
        u = draws(keys, int(k.max()), SLOT_META_MISPLACED)[row, rank]
        picks = [_donor(a["input_ids"][b:e].tobytes(), x, pool) for a, (b, e), x in
                 zip((arrays[r] for r in row.tolist()), spans.tolist(), u.tolist())]
        moved = np.array([p is not None for p in picks], bool)
        donors = [p for p in picks if p is not None]
        lens = np.array([len(d) for d in donors], np.int64)
        tokens = np.concatenate(donors) if donors else np.zeros(0, np.int64)
    else:
        drop = draws(keys, int(k.max()), SLOT_META)[row, rank] >= policy.meta_keep
        moved, lens, tokens = np.zeros(len(spans), bool), np.zeros(0, np.int64), np.zeros(0, np.int64)
    edited = np.bincount(row[drop], minlength=B) > 0
    if not edited.any():
        return
    col = np.arange(L + 1)[None, :]
    real = col[:, :L] < n[:, None]
    ids = np.zeros((B, L), np.int64)
    ids[real] = np.concatenate([a["input_ids"] for a in arrays])
    edge = np.zeros((B, L + 1), np.int64)
    edge[row[drop], spans[drop, 0]] = 1   # spans do not overlap: no two start (or end) at one place
    edge[row[drop], spans[drop, 1]] -= 1
    keep = real & (np.cumsum(edge[:, :L], axis=1) == 0)
    step = keep.astype(np.int64)
    step[row[moved], spans[moved, 0]] += lens
    at = np.zeros((B, L + 1), np.int64)   # the new index of each position (of the block moved in there)
    np.cumsum(step, axis=1, out=at[:, 1:])
    size = at[np.arange(B), n]
    used = np.minimum(size, n)
    pad = info.pad_id if info.pad_id is not None else info.eos_id
    new = np.full(B * L, pad, np.int64)   # flat: one index per token, not two
    base = np.arange(B)[:, None] * L
    dest = at[:, :L] + base
    src = np.flatnonzero(keep & (at[:, :L] < n[:, None]))   # a token pushed past its row's length goes
    to = dest.ravel()[src]
    new[to] = ids.ravel()[src]
    if with_origin:
        origin = np.full(B * L, -1, np.int64)
        origin[to] = src % L
        origin = origin.reshape(B, L)
    start = at[row[moved], spans[moved, 0]]
    tr = np.repeat(row[moved], lens)
    tc = np.repeat(start - np.cumsum(lens) + lens, lens) + np.arange(len(tokens))
    ok = tc < n[tr]
    new[tr[ok] * L + tc[ok]] = tokens[ok]
    new = new.reshape(B, L)
    # the new spans: those kept, then those moved in, by row and start; cut to each row's length
    kept = ~drop
    s_row = np.concatenate([row[kept], row[moved]])
    s_new = np.concatenate([np.stack([at[row[kept], spans[kept, 0]], at[row[kept], spans[kept, 1] - 1] + 1], 1),
                            np.stack([start, start + lens], 1)])
    s_new = np.minimum(s_new, used[s_row][:, None])
    order = np.lexsort((s_new[:, 0], s_row))
    s_row, s_new = s_row[order], s_new[order]
    fine = s_new[:, 1] > s_new[:, 0]
    per_row = np.split(s_new[fine], np.cumsum(np.bincount(s_row[fine], minlength=B))[:-1])
    for b in np.flatnonzero(edited).tolist():
        a, atb, m = arrays[b], at[b], int(used[b])
        starts = a["doc_offsets"]
        ends = np.empty_like(starts)
        ends[:-1], ends[-1:] = starts[1:], n[b]
        new_starts, new_ends = atb[starts], np.minimum(atb[ends], m)
        keep_seg = new_ends > new_starts
        new_pos = atb[a["sp_positions"]]
        inside = new_pos < m
        out = {"input_ids": new[b, : n[b]], "source_id": a["source_id"],
               "doc_offsets": new_starts[keep_seg] if keep_seg.any() else np.zeros(1, np.int64),
               "sp_positions": new_pos[inside], "msp_mask": a["msp_mask"][inside], "length": m,
               "meta_spans": per_row[b]}
        if with_origin:
            out["origin"] = origin[b, :m]
        if "doc_keys" in a:
            out["doc_keys"] = a["doc_keys"][keep_seg] if keep_seg.any() else a["doc_keys"][:1]
        rows[b] = out


def _donor(own: bytes, x: float, pool: list[bytes]) -> np.ndarray | None:
    """The value of ``pool`` other than ``own`` that the uniform ``x`` picks; None when there is none."""
    i = bisect.bisect_left(pool, own)
    mine = i < len(pool) and pool[i] == own
    others = len(pool) - mine
    if not others:
        return None
    k = int(x * others)
    return np.frombuffer(pool[k + (mine and k >= i)], np.int64)


_NO_SPANS = np.zeros((0, 2), np.int64)


def _span_mask(spans: np.ndarray, n: int) -> np.ndarray:
    """bool[n]: the tokens inside ``spans``."""
    edge = np.zeros(n + 1, np.int64)
    edge[spans[:, 0]] = 1   # spans do not overlap: no two start (or end) at one place
    edge[spans[:, 1]] -= 1
    return np.cumsum(edge[:n]) > 0


def _misplace(ids: np.ndarray, spans: np.ndarray, key: np.uint64, pool: list[bytes]) -> tuple | None:
    """(positions, lengths, tokens) moved in: for each span a value of ``pool`` other than its own, by a keyed
    draw, at the span's start. A span with no other value in the pool gets nothing (it is removed: there is no
    wrong value to give it)."""
    u = draws(key, len(spans), SLOT_META_MISPLACED)
    picks = [(b, _donor(ids[b:e].tobytes(), x, pool)) for (b, e), x in zip(spans.tolist(), u.tolist())]
    picks = [(b, d) for b, d in picks if d is not None]
    if not picks:
        return None
    return (np.array([b for b, _ in picks], np.int64), np.array([len(d) for _, d in picks], np.int64),
            np.concatenate([d for _, d in picks]))


def _sp_cut(s: dict, drop: np.ndarray, info: BuildInfo) -> np.ndarray:
    """bool per token: the SPs in ``drop``, each with its delimiter (and every special delimiter when all go)."""
    ids, pos = s["input_ids"], s["sp_positions"]
    cut = np.zeros(len(ids), bool)
    gone = pos[drop]
    cut[gone] = True
    lay = info.layout   # each removed SP takes its delimiter
    cut[lay.delimiter_positions(ids, gone, lay.is_post(s)[drop])] = True
    if drop.all():
        cut |= lay.stray_delimiters(ids)   # a special delimiter is only ever a delimiter: orphans go too
    return cut


def _edit(s: dict, cut: np.ndarray, keep_sp: np.ndarray, moved_in: tuple | None, info: BuildInfo,
          length: int | None) -> dict:
    """``s`` with the ``cut`` tokens removed and the blocks of ``moved_in`` (positions, lengths, their tokens one
    after another) each put where the cut token at its position was; documents, SPs and metadata spans follow,
    and the result is padded or cut to ``length``."""
    ids, pos = s["input_ids"], s["sp_positions"]
    n = len(ids)
    keep = ~cut
    kept = np.flatnonzero(keep)
    at = np.zeros(n + 1, np.int64)   # the new index of the token at p (of the block moved in there, if one is)
    if moved_in is None:
        np.cumsum(keep, out=at[1:])
        new, origin = ids[kept], kept
    else:
        where, lens, tokens = moved_in
        step = keep.astype(np.int64)
        step[where] += lens   # one block a position
        np.cumsum(step, out=at[1:])
        start, to = at[where], at[kept]
        new, origin = np.empty(at[n], np.int64), np.full(at[n], -1, np.int64)
        new[to], origin[to] = ids[kept], kept
        new[np.repeat(start - np.cumsum(lens) + lens, lens) + np.arange(len(tokens))] = tokens
    size = int(at[n])
    spans = s.get("meta_spans", _NO_SPANS)
    if len(spans):
        whole = spans[keep[spans[:, 0]]]   # spans are cut whole or not at all
        spans = np.empty_like(whole)
        spans[:, 0], spans[:, 1] = at[whole[:, 0]], at[whole[:, 1] - 1] + 1
    if moved_in is not None:
        spans = np.concatenate([spans, np.stack([start, start + lens], axis=1)])
        spans = spans[np.argsort(spans[:, 0], kind="stable")]

    length = n if length is None else length
    used = min(size, length)
    starts = s["doc_offsets"]
    ends = np.empty_like(starts)
    ends[:-1], ends[-1:] = starts[1:], n
    new_starts, new_ends = at[starts], np.minimum(at[ends], used)
    keep_seg = new_ends > new_starts                  # a segment whose every token went is gone
    offsets = new_starts[keep_seg] if keep_seg.any() else np.zeros(1, np.int64)
    new_pos = at[pos[keep_sp]]
    inside = new_pos < used
    if used < size:
        spans = np.minimum(spans, used)
        spans = spans[spans[:, 1] > spans[:, 0]]
    if used == length:
        padded = new[:used]
    else:
        padded = np.full(length, info.pad_id if info.pad_id is not None else info.eos_id, np.int64)
        padded[:used] = new
    out = {"input_ids": padded, "source_id": s["source_id"], "doc_offsets": offsets,
           "sp_positions": new_pos[inside], "msp_mask": s["msp_mask"][keep_sp][inside], "length": used,
           "meta_spans": spans, "origin": origin[:used]}
    if "doc_keys" in s:
        out["doc_keys"] = s["doc_keys"][keep_seg] if keep_seg.any() else s["doc_keys"][:1]
    return out

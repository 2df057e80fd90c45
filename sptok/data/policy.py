"""Load-time SP policy: re-decide the SPs of a built sample without rebuilding the shards.

  keep         as built
  strip        remove every SP and its delimiter (the paper's "none", or a metadata-free cooldown)
  msp=p        re-draw the MSP flags: each SP is masked with probability p
  insert=q     keep each SP (and its delimiter) with probability q
  insert=q,msp=p   both

Every draw is keyed by (seed, the sample's content, the SP's rank in the sample): the same sample gets the
same decisions in any order, on any rank or worker, and after a resume. Removed tokens are cut out and the
sample is padded back to its length at the end, so shapes stay fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..build_info import BuildInfo
from ..errors import SptokError
from ..sp import GOLDEN, SLOT_LOAD_INSERT as SLOT_INSERT, SLOT_LOAD_MLM as SLOT_MLM, SLOT_LOAD_MSP as SLOT_MSP, \
    mix64, uniforms

__all__ = ["SPPolicy", "apply_policy", "draws", "sample_key", "SLOT_INSERT", "SLOT_MSP", "SLOT_MLM"]


@dataclass(frozen=True)
class SPPolicy:
    insert: float | None = None   # probability of keeping each SP; 0 strips them all
    msp: float | None = None      # probability of masking each kept SP for MSP; None keeps the built flags

    @classmethod
    def parse(cls, text: "str | SPPolicy") -> "SPPolicy":
        if isinstance(text, SPPolicy):
            return text
        text = (text or "keep").strip()
        if text == "keep":
            return cls()
        if text == "strip":
            return cls(insert=0.0)
        kw = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in ("insert", "msp") or not value:
                raise SptokError(f"SP policy {text!r}: expected keep, strip, msp=P, insert=Q or insert=Q,msp=P")
            try:
                p = float(value)
            except ValueError:
                raise SptokError(f"SP policy {text!r}: {value!r} is not a number") from None
            if not 0.0 <= p <= 1.0:
                raise SptokError(f"SP policy {text!r}: {name} must be a probability in [0, 1]")
            kw[name] = p
        return cls(**kw)

    @property
    def is_keep(self) -> bool:
        return self.insert is None and self.msp is None

    def __str__(self) -> str:
        if self.is_keep:
            return "keep"
        if self.insert == 0.0 and self.msp is None:
            return "strip"
        return ",".join(f"{k}={v}" for k, v in (("insert", self.insert), ("msp", self.msp)) if v is not None)


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


def apply_policy(s: dict, policy: SPPolicy, info: BuildInfo, key: np.uint64, length: int | None = None,
                 u_insert: np.ndarray | None = None, u_msp: np.ndarray | None = None) -> dict:
    """The sample with the policy applied; ``length`` (default: its own) is kept by padding with [PAD].

    ``u_insert`` / ``u_msp`` are the sample's draws when a caller computed a whole batch's at once
    (``draws(keys, n, slot)`` row by row equals ``draws(key, n, slot)``)."""
    if policy.is_keep:
        return s
    pos, msk = s["sp_positions"], s["msp_mask"]
    out = dict(s)
    if policy.insert is not None:
        u = u_insert[: len(pos)] if u_insert is not None else draws(key, len(pos), SLOT_INSERT)
        keep_sp = u < policy.insert
        if not keep_sp.all() or (policy.insert == 0.0 and info.delimiter_special):
            out = _remove(s, ~keep_sp, info, length)
            pos, msk = out["sp_positions"], out["msp_mask"]
    if policy.msp is not None:
        if u_msp is not None and len(pos) == len(s["sp_positions"]):
            msk = u_msp[: len(pos)] < policy.msp
        else:   # after removals the kept SPs are re-ranked
            msk = draws(key, len(pos), SLOT_MSP) < policy.msp
    out["msp_mask"] = msk.astype(bool)
    return out


def _remove(s: dict, drop: np.ndarray, info: BuildInfo, length: int | None) -> dict:
    ids, pos = s["input_ids"], s["sp_positions"]
    n = len(ids)
    cut = np.zeros(n, bool)
    gone = pos[drop]
    cut[gone] = True
    lay = info.layout   # each removed SP takes its delimiter
    cut[lay.delimiter_positions(ids, gone, lay.is_post(s)[drop])] = True
    if drop.all():
        cut |= lay.stray_delimiters(ids)   # a special delimiter is only ever a delimiter: orphans go too
    before = np.concatenate([[0], np.cumsum(cut)])   # removed tokens before each index
    kept_ids = ids[~cut]
    starts = s["doc_offsets"]
    ends = np.append(starts[1:], n)
    new_starts, new_ends = starts - before[starts], ends - before[ends]
    keep_seg = new_ends > new_starts                  # a segment whose every token went is gone
    offsets = new_starts[keep_seg] if keep_seg.any() else np.zeros(1, np.int64)
    keep_sp = ~drop
    new_pos = pos[keep_sp] - before[pos[keep_sp]]
    length = n if length is None else length
    pad = info.pad_id if info.pad_id is not None else info.eos_id
    padded = np.full(length, pad, np.int64)
    padded[: len(kept_ids)] = kept_ids
    out = {"input_ids": padded, "source_id": s["source_id"], "doc_offsets": offsets, "sp_positions": new_pos,
           "msp_mask": s["msp_mask"][keep_sp], "length": len(kept_ids)}
    if "doc_keys" in s:
        out["doc_keys"] = s["doc_keys"][keep_seg] if keep_seg.any() else s["doc_keys"][:1]
    return out

"""The validation split: documents held out of the training samples, decided at build time.

A document is held out by a uniform draw keyed by (seed, source, document key), the same kind of draw as
every SP decision, so the split does not depend on reading order, workers or partitions:

  --holdout p         every document whose draw is below p;
  --holdout-docs N    the N documents of each source with the smallest draws. Each unit sets its own N
                      smallest aside (a document it evicts from them is trained on at the unit's end);
                      finalize keeps the source's N smallest of those and trains on the others.

Held-out documents are laid out exactly as training documents (SPs, delimiters, EOS, MSP flags) and packed
into ``OUT/validation`` (``layout.SPLIT_DIR``), a build of its own that ``open_dataset``, ``verify`` and ``stats`` read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metadata import META_KEYS
from .pack import Stream, concat, take_docs
from ..sp import SLOT_HOLDOUT, uniforms

# per-document counts kept with each held-out document, so either split's stats.json adds up
DOC_KEYS = ("docs", "text_chars", "text_tokens", "sp_inserted", "sp_masked", "delimiter_tokens", "eos_tokens",
            "sp_literals") + META_KEYS


@dataclass
class Held:
    """Held-out documents: one segment each in ``stream``, in the order they were read."""
    stream: Stream
    u: np.ndarray        # float64: each document's draw
    counts: np.ndarray   # int64 (n, len(DOC_KEYS))
    bins: np.ndarray     # int64: each document's length-histogram bin

    @staticmethod
    def empty() -> "Held":
        return Held(Stream.empty(), np.empty(0), np.empty((0, len(DOC_KEYS)), np.int64), np.empty(0, np.int64))

    def __len__(self) -> int:
        return len(self.u)

    def __add__(self, other: "Held") -> "Held":
        return Held(concat(self.stream, other.stream), np.concatenate([self.u, other.u]),
                    np.concatenate([self.counts, other.counts]), np.concatenate([self.bins, other.bins]))

    def take(self, keep: np.ndarray) -> "Held":
        return Held(take_docs(self.stream, keep), self.u[keep], self.counts[keep], self.bins[keep])

    def totals(self) -> dict:
        return dict(zip(DOC_KEYS, self.counts.sum(0).tolist()))

    def save(self, path: str) -> None:
        np.savez(path, u=self.u, counts=self.counts, bins=self.bins, **self.stream.to_npz())

    @staticmethod
    def load(path: str) -> "Held":
        with np.load(path) as z:
            return Held(Stream.from_npz(z), z["u"], z["counts"], z["bins"])


def smallest(helds: list[Held], n: int) -> list[np.ndarray]:
    """Which documents of each Held are among the ``n`` smallest draws of them all (ties by document key)."""
    u = np.concatenate([h.u for h in helds]) if helds else np.empty(0)
    keys = np.concatenate([h.stream.seg_keys for h in helds]) if helds else np.empty(0, np.uint64)
    chosen = np.zeros(len(u), bool)
    chosen[np.lexsort((keys, u))[:n]] = True
    return np.split(chosen, np.cumsum([len(h) for h in helds])[:-1])


class UnitHoldout:
    """What one unit holds out: ``pick`` the documents of a batch to set aside, ``add`` them once laid
    out; with a per-source count, ``add`` returns the documents no longer among the unit's smallest."""

    def __init__(self, seed: int, fraction: float | None, docs: int | None):
        self.seed, self.fraction, self.docs = seed, fraction, docs
        self.held = Held.empty()

    @property
    def active(self) -> bool:
        return self.fraction is not None or self.docs is not None

    def pick(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(set aside?, draw) for each document of a batch."""
        u = uniforms(hashes, self.seed, SLOT_HOLDOUT)
        if self.fraction is not None:
            return u < self.fraction, u
        if self.docs is None:
            return np.zeros(len(u), bool), u
        if len(self.held) < self.docs:
            return np.ones(len(u), bool), u
        return u <= self.held.u.max(), u

    def add(self, held: Held) -> Held:
        self.held = self.held + held
        if self.docs is None or len(self.held) <= self.docs:
            return Held.empty()
        keep = smallest([self.held], self.docs)[0]
        evicted = self.held.take(~keep)
        self.held = self.held.take(keep)
        return evicted

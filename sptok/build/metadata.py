"""Metadata conditioning at build time: each document's own metadata (a URL, a topic) before its text.

A document's value (a record field, ``readers.Batch.meta``) is *formed* (``value`` | ``host`` | ``url``),
filled into the template, tokenized as ordinary text on its own by the encoder that tokenizes the texts, and
cut to ``max_tokens``. Whether a document with a value gets it is a keyed draw (``sp.SLOT_META``), so the
bytes are the same for any workers, partitions, resume and encoder. ``pack.assemble`` lays the tokens out
right before the text; their positions are the shard column ``meta_spans``.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from ..sp import SLOT_META, uniforms

CACHE_VALUES = 1 << 16    # formed values whose tokens a unit keeps (hosts repeat a lot); then it starts over
TOP_VALUES = 64           # most frequent values a unit keeps with their counts, for `sptok report`
# per-document counts of a source with metadata (unit results, Held documents, stats.json's "metadata")
META_KEYS = ("meta_docs", "meta_tokens", "meta_missing", "meta_empty", "meta_undrawn")


@functools.lru_cache(maxsize=CACHE_VALUES)   # documents of one page or file share their value
def form_value(value: str, form: str) -> str:
    """`https://www.docs.python.org/3/x.html` -> host `docs.python.org`, url `www.docs.python.org/3/x.html`;
    ``value`` is the string as is. "" when the form finds nothing (a value that is no URL has no host)."""
    if form == "value":
        return value.strip()
    if form == "url":
        return value.strip().split("://", 1)[-1]
    v = value.strip()
    try:
        host = urlsplit(v if "://" in v else "//" + v).hostname or ""
    except ValueError:   # a malformed IPv6 literal, say
        return ""
    return host[4:] if host.startswith("www.") else host


@dataclass
class DocMeta:
    """The metadata of a batch's documents: token ids back to back, how many each has (0: none), and the
    per-document counts of those without (``meta_missing``, ``meta_empty``, ``meta_undrawn``)."""
    flat: np.ndarray    # uint32
    lens: np.ndarray    # int64 per document
    counts: dict        # name -> int64 per document

    def take(self, keep: np.ndarray) -> "DocMeta":
        return DocMeta(self.flat[np.repeat(keep, self.lens)], self.lens[keep],
                       {k: v[keep] for k, v in self.counts.items()})

    def totals(self) -> dict:
        return {k: int(v.sum()) for k, v in self.counts.items()}


class UnitMetadata:
    """One unit's metadata: per batch, the tokens of each document's metadata (``encode``); across the unit,
    what stats.json reports (counts by ``why``, value hashes for the distinct count, the top values)."""

    def __init__(self, spec: dict, seed: int, encoder):
        self.form, self.prob, self.max_tokens = spec["form"], spec["prob"], spec["max_tokens"]
        self.before, self.after = spec["template"].split("{}")
        self.seed, self.encoder = seed, encoder
        self.cache: dict[str, np.ndarray] = {}
        self.values: Counter = Counter()   # formed value -> documents (trimmed to the top as it grows)
        self.hashes: set[int] = set()

    def encode(self, values: list[str | None], hashes: np.ndarray) -> DocMeta:
        """The metadata of the documents of a batch (``values`` as the reader found them, ``hashes`` their
        keys)."""
        n = len(values)
        formed = [form_value(v, self.form) if v else "" for v in values]
        drawn = uniforms(hashes, self.seed, SLOT_META) < self.prob
        has = np.fromiter((bool(f) for f in formed), bool, count=n)
        counts = {"meta_missing": np.fromiter((v is None for v in values), bool, count=n).astype(np.int64),
                  "meta_empty": (~has).astype(np.int64),
                  "meta_undrawn": (has & ~drawn).astype(np.int64)}
        counts["meta_empty"] -= counts["meta_missing"]
        chosen = [f for f, d in zip(formed, has & drawn) if d]
        self._note(f for f, h in zip(formed, has) if h)
        self._tokenize(chosen)
        parts = [self.cache[f] for f in chosen]
        lens = np.zeros(n, np.int64)
        lens[has & drawn] = [len(p) for p in parts]
        flat = np.concatenate(parts).astype(np.uint32) if parts else np.empty(0, np.uint32)
        return DocMeta(flat, lens, counts)

    def _tokenize(self, chosen: list[str]) -> None:
        """Tokenize the values not yet cached, in one encoder call."""
        new = list(dict.fromkeys(f for f in chosen if f not in self.cache))
        if not new:
            return
        if len(self.cache) + len(new) > CACHE_VALUES:
            self.cache = {}
        flat, lens = self.encoder.encode([self.before + f + self.after for f in new])
        ends = np.cumsum(lens)
        for f, e, k in zip(new, ends, lens):
            self.cache[f] = np.asarray(flat[e - k:e - k + min(int(k), self.max_tokens)], np.uint32)

    def _note(self, formed) -> None:
        """Count the documents of each value, and hash each value for finalize's distinct count (both splits:
        the values a source has, not where its documents went)."""
        import xxhash

        for f in formed:
            if f not in self.values:
                self.hashes.add(xxhash.xxh64_intdigest(f.encode("utf-8", "surrogatepass")))
            self.values[f] += 1
        if len(self.values) > 4 * CACHE_VALUES:   # memory stays bounded: keep the most frequent
            self.values = Counter(dict(self.values.most_common(CACHE_VALUES)))

    def value_hashes(self) -> np.ndarray:
        return np.sort(np.fromiter(self.hashes, np.uint64, count=len(self.hashes)))

    def result(self) -> list:
        """[value, documents] of the unit's most frequent values (finalize sums them over units)."""
        return [[v, c] for v, c in self.values.most_common(TOP_VALUES)]

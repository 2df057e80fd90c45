"""Source prompts: naming policies, the SP table, and per-document decisions.

Pure functions of (names, options, seed) with numpy arrays in and out. Every random decision about a
document comes from a counter-based RNG keyed by (seed, source, document key): a document gets the same
SP decisions whichever worker reads it, in whatever order, on a resumed or partitioned run. The same
counter-based draws serve the load-time SP policy and ``sptok label`` (``mix64``, ``uniforms``), each in its
own slot, all listed here so that no two decisions share one.

Adding a naming policy: a function ``names -> SP strings`` in ``POLICIES``, its name in ``build/options.py``
(where the CLI reads the choices) and in the schemas' ``policy`` enums (``tests/test_cli.py`` holds the three
equal).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

import numpy as np

from .errors import SptokError

# Decision slots: each draws an independent uniform for the same key.
SLOT_INSERT, SLOT_MSP_PREFIX, SLOT_MSP_POST, SLOT_HOLDOUT = 0, 1, 2, 3   # the build, keyed by document
SLOT_META = 4                                                             # the build: metadata drawn (prob)
SLOT_LOAD_INSERT, SLOT_LOAD_MSP, SLOT_LOAD_MLM = 10, 11, 12               # load time (data/), keyed by sample
SLOT_LOAD_T5 = 13                                                         # T5 noise spans
SLOT_LOAD_META, SLOT_LOAD_META_MISPLACED = 14, 15                         # meta=Q keeps, meta=misplaced donors
SLOT_LABEL_RANDOM = 30                                                    # sptok label --mode random, by row


# ------------------------------------------------------------------------------------------------ naming

def abbreviation(name: str) -> str:
    """`pydocs` -> `<PYDOCS>`, `web-en` -> `<WEB_EN>`."""
    core = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")
    return f"<{core or 'SRC'}>"


def alphabet(i: int) -> str:
    """0 -> `<A>`, 25 -> `<Z>`, 26 -> `<AA>` (bijective base 26)."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return f"<{s}>"


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) with no fixed point (the paper's misplaced control)."""
    if n < 2:
        raise SptokError("--policy misplaced needs at least two sources: with one, no source can take "
                         "another's name")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm.tolist()


def _misplaced(names: list[str], seed: int, custom) -> list[str]:
    own = [abbreviation(n) for n in names]
    return [own[j] for j in derangement(len(names), seed)]


def _custom(names: list[str], seed: int, custom) -> list[str]:
    custom = custom or [None] * len(names)
    missing = [n for n, c in zip(names, custom) if not c]
    if missing:
        raise SptokError(f"--policy custom: source {missing[0]!r} has no `sp:` in the manifest; give every "
                         f"source one (e.g. sp: \"<NEWS>\") or choose another --policy")
    return list(custom)


# naming policy -> (source names, seed, the manifest's `sp:` values) -> SP strings in manifest order
POLICIES = {
    "abbreviation": lambda names, seed, custom: [abbreviation(n) for n in names],
    "alphabet": lambda names, seed, custom: [alphabet(i) for i in range(len(names))],
    "misplaced": _misplaced,
    "custom": _custom,
}


def sp_strings(names: list[str], policy: str, seed: int, custom: list[str | None] | None = None) -> list[str]:
    """The SP string of every source, in manifest order; two sources never share one."""
    if policy not in POLICIES:
        raise SptokError(f"--policy: unknown naming policy {policy!r}; expected one of {', '.join(POLICIES)}")
    sps = POLICIES[policy](names, seed, custom)
    seen: dict[str, str] = {}
    for n, s in zip(names, sps):
        if s in seen:
            raise SptokError(f"SP token clash: sources {seen[s]!r} and {n!r} would both use {s}; give them "
                             f"distinct `sp:` values or use --policy alphabet")
        seen[s] = n
    return sps


@dataclass(frozen=True)
class SPEntry:
    source: str
    source_id: int
    sp: str
    token_id: int

    def to_json(self) -> dict:
        return {"source": self.source, "source_id": self.source_id, "sp": self.sp, "token_id": self.token_id}


# ----------------------------------------------------------------------------------------------- decisions

GOLDEN = np.uint64(0x9E3779B97F4A7C15)   # 2**64 / phi: spreads consecutive counters over the 64 bits


def doc_hashes(source: str, keys: list[str]) -> np.ndarray:
    """Stable 64-bit hash of each document key within its source (also written as `doc_keys`)."""
    prefix = source.encode("utf-8") + b"\x00"
    out = np.empty(len(keys), dtype=np.uint64)
    for i, k in enumerate(keys):
        out[i] = int.from_bytes(hashlib.blake2b(prefix + k.encode("utf-8", "surrogatepass"),
                                                digest_size=8).digest(), "little")
    return out


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed map of uint64. Arrays wrap on overflow silently."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=256)
def _slot_key(seed: int, slot: int) -> np.uint64:
    return mix64(np.array([seed], dtype=np.uint64) * GOLDEN + np.uint64(slot + 1))[0]


def uniforms(hashes: np.ndarray, seed: int, slot: int) -> np.ndarray:
    """One uniform float in [0, 1) per document for decision ``slot``: a pure function of its inputs."""
    bits = mix64(np.asarray(hashes, dtype=np.uint64) ^ _slot_key(seed, slot))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class Decisions:
    inserted: np.ndarray      # bool[n]: the document carries its SP
    masked_prefix: np.ndarray  # bool[n]: its prefix SP is marked for MSP (only where inserted)
    masked_post: np.ndarray    # bool[n]: its post SP is marked for MSP (only where inserted)


def decide(hashes: np.ndarray, seed: int, insert_prob: float, msp_prob: float) -> Decisions:
    inserted = uniforms(hashes, seed, SLOT_INSERT) < insert_prob
    return Decisions(
        inserted=inserted,
        masked_prefix=inserted & (uniforms(hashes, seed, SLOT_MSP_PREFIX) < msp_prob),
        masked_post=inserted & (uniforms(hashes, seed, SLOT_MSP_POST) < msp_prob),
    )

"""The encoder layer: text -> token ids with the fastest exact encoder available for the build's tokenizer.

Candidates, fastest first (one core, 32k byte-level BPE, ``benchmarks/RESULTS.md``):

- ``gigatoken`` builds straight from ``tokenizer.json``: byte-level BPE, a split regex + byte-level (GPT-4 /
  Llama-3 style) and SentencePiece-style BPE with byte fallback (Llama-2 family);
- ``riptoken``, a faster tiktoken core, and ``tiktoken``: a byte-level BPE re-expressed as tiktoken ranks;
- ``hf``, the Hugging Face tokenizer: the reference, and the only one that runs every tokenizer.

The reference defines the ids. A candidate is used only after it gave the reference's ids on a sample of
every source, and during the build about ``1 / SPOT_SHARE`` of the text is encoded again by the reference.
A mismatch raises ``EncoderMismatch``: with ``--encoder auto`` the build then falls back to the reference
(``driver.py``), otherwise it stops with that one line.
"""

from __future__ import annotations

import functools
import itertools
import json
import os

import numpy as np

from ..errors import SptokError
from .options import FAST_ENCODERS as FAST
from .tokenizer import as_text_encoder

SPOT_SHARE = 1024           # re-encode about 1/1024 of the text with the reference (~8% of gigatoken's time)
SPOT_FIRST = 1 << 16        # characters of credit at start: the first batch is always checked
SPOT_CHARS = 32 << 10       # a spot check encodes at most this prefix of a document with the reference
PIECE_CHARS = 1 << 20       # a longer document is encoded in pieces of about this size, where the tokenizer allows
GIGATOKEN_CACHE = 256 << 20  # bytes a gigatoken instance may grow by: 0.10.0 caches every pretoken it saw
GIGATOKEN_CHARS = 1 << 26    # where RSS cannot be read (not Linux): characters per gigatoken instance
# documents a process encodes with gigatoken's `encode` (one call each, a numpy array) before it switches to
# `encode_batch`, ~1 us a document cheaper but returning an awkward Array: importing awkward costs ~0.15 s
# (and ~50 MB), as much as ~100K documents' calls. Small builds and long documents never import it.
GIGATOKEN_BATCH_AFTER = 100_000
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Split regexes in which whitespace is only ever a pretoken's one leading character or all of a pretoken, and
# whose only lookahead is (?!\S): a pretoken always starts at a space that follows a non-space character, and
# the text before it pre-tokenizes alike whether the rest follows or not. Documents are cut there only.
CUT_BEFORE_SPACE = (GPT2_PATTERN, LLAMA3_PATTERN)
INSTALL_HINT = "pip install 'sptok[fast]'"


class NotExpressible(Exception):
    """Why a candidate cannot run a tokenizer."""


class EncoderMismatch(SptokError):
    """A fast encoder gave other ids than the reference during the build."""

    def __reduce__(self):  # picklable across worker processes
        return (EncoderMismatch, (self.message,))


@functools.cache
def version(name: str) -> str:
    """The installed version of encoder ``name``'s package, as each unit records it (looked up once: a lookup
    scans the installed distributions)."""
    from importlib import metadata   # ~15 ms (it imports the email package): only once a unit is done

    return metadata.version("tokenizers" if name == "hf" else name)


# ------------------------------------------------------------------------------------------ candidates

def _text_spec(tok) -> dict:
    """tokenizer.json of ``tok`` as text encoding sees it: special added tokens are ordinary text."""
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise NotExpressible(f"its model is {model.get('type')}, not BPE")
    if model.get("dropout"):
        raise NotExpressible("its BPE sets dropout (random segmentation)")
    spec["added_tokens"] = [a for a in spec.get("added_tokens", []) if not a["special"]]
    spec.update(truncation=None, padding=None, post_processor=None)   # add_special_tokens=False, whole documents
    return spec


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise NotExpressible(f"{name} is not installed ({INSTALL_HINT})") from None


class _Gigatoken:
    """gigatoken on one thread. 0.10.0 caches every pretoken it has seen, without bound (fixed upstream after
    that release): a fresh instance replaces one whose process grew by GIGATOKEN_CACHE, which keeps memory flat."""

    def __init__(self, spec: dict):
        self.gt = _import("gigatoken")
        self.spec = json.dumps(spec)
        self.bounded = hasattr(self.gt, "set_max_cache_bytes")   # releases with a cache budget
        self.docs = 0
        if self.bounded:
            self.gt.set_max_cache_bytes(GIGATOKEN_CACHE)
        self.enc = self._new()

    def _new(self):
        self.enc = None   # the old cache goes before the new instance is built
        try:
            enc = self.gt.Tokenizer.from_json(self.spec)
        except Exception as e:  # gigatoken raises RuntimeError naming the unsupported part
            raise NotExpressible(f"gigatoken refused it ({str(e).splitlines()[0]})") from None
        self.rss, self.chars = _rss(), 0
        return enc

    def _grown(self) -> bool:
        rss = _rss()
        return rss - self.rss > GIGATOKEN_CACHE if rss else self.chars > GIGATOKEN_CHARS

    def __call__(self, texts: list[str]):
        if not self.bounded and self._grown():
            self.enc = self._new()
        self.chars += sum(map(len, texts))
        self.docs += len(texts)
        if self.docs <= GIGATOKEN_BATCH_AFTER:
            parts = list(map(self.enc.encode, texts))
            lens = np.fromiter(map(len, parts), np.int64, count=len(parts))
            return _join(parts), lens
        arr = self.enc.encode_batch(texts, parallel=False)
        off = np.asarray(arr.layout.offsets.data)          # awkward ListOffsetArray: no per-token Python ints
        return np.asarray(arr.layout.content.data)[off[0]:off[-1]], np.diff(off)


def _rss() -> int:
    """Resident bytes of this process (Linux), else 0."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def _tiktoken_ranks(spec: dict) -> tuple[str, dict[bytes, int]]:
    """(split pattern, mergeable ranks) of a byte-level BPE, as tiktoken and riptoken take them."""
    if spec.get("normalizer"):
        raise NotExpressible(f"it has a normalizer ({spec['normalizer'].get('type')})")
    model = spec["model"]
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise NotExpressible(f"its BPE sets {key}")
    if spec["added_tokens"]:
        raise NotExpressible("it has non-special added tokens")
    pattern = _pattern(spec.get("pre_tokenizer"))
    dec = _byte_decoder()
    ranks = {}
    for token, i in model["vocab"].items():
        try:
            ranks[bytes(dec[c] for c in token)] = i
        except KeyError:
            raise NotExpressible(f"vocabulary entry {token!r} is not in byte-level form") from None
    if any(bytes([b]) not in ranks for b in range(256)):
        raise NotExpressible("its vocabulary lacks some of the 256 single bytes")
    return pattern, ranks


def _pattern(pre: dict | None) -> str:
    if pre is None:
        raise NotExpressible("it has no pre-tokenizer")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise NotExpressible("its ByteLevel pre-tokenizer adds a prefix space")
        if not pre.get("use_regex", True):
            raise NotExpressible("its ByteLevel pre-tokenizer splits on no regex")
        return GPT2_PATTERN
    if pre.get("type") == "Sequence":   # Split(regex, Isolated) + ByteLevel(use_regex=False): GPT-4 / Llama-3 style
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
                and not steps[0].get("invert") and "Regex" in steps[0].get("pattern", {})
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
                and not steps[1].get("add_prefix_space")):
            return steps[0]["pattern"]["Regex"]
    raise NotExpressible(f"its pre-tokenizer ({pre.get('type')}) is not byte-level BPE's")


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode, which byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _tiktoken(spec: dict):
    pattern, ranks = _tiktoken_ranks(spec)
    tiktoken = _import("tiktoken")
    try:
        enc = tiktoken.Encoding("sptok", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception as e:  # tiktoken raises ValueError / pyo3 errors for odd vocabularies
        raise NotExpressible(f"tiktoken refused it ({e})") from None
    return lambda texts: flatten_ids([enc.encode_ordinary(t) for t in texts])


def _riptoken(spec: dict):
    pattern, ranks = _tiktoken_ranks(spec)
    riptoken = _import("riptoken")
    try:
        core = riptoken.CoreBPE(ranks, {}, pattern)
    except Exception as e:
        raise NotExpressible(f"riptoken refused it ({e})") from None
    return lambda texts: flatten_ids([core.encode_ordinary(t) for t in texts])


BUILDERS = {"gigatoken": _Gigatoken, "riptoken": _riptoken, "tiktoken": _tiktoken}


def fast_encoder(tok, name: str, spec: dict | None = None):
    """texts -> (flat uint32 ids, int64 lengths) with candidate ``name``, or NotExpressible. ``spec``: ``tok``'s
    ``_text_spec`` where already made (the reference's), read as it is."""
    spec = spec or _text_spec(tok)
    return in_pieces(BUILDERS[name](spec), cuts_before_space(spec))


# ------------------------------------------------------------------------------------------ long documents

def cuts_before_space(spec: dict | None) -> bool:
    """Whether a text of tokenizer ``spec`` (as ``_text_spec`` gives it) has the same ids as the ids of its
    parts when it is cut before a space that follows a non-space: byte-level BPE with a split regex of
    ``CUT_BEFORE_SPACE``, and nothing that reads across pretokens (a normalizer, non-special added tokens)."""
    if spec is None or spec.get("normalizer") or spec["added_tokens"]:
        return False
    try:
        return _pattern(spec.get("pre_tokenizer")) in CUT_BEFORE_SPACE
    except NotExpressible:
        return False


def cut_points(text: str, size: int = PIECE_CHARS) -> list[int]:
    """Where to cut ``text`` into pieces of at least ``size`` characters: before a space whose previous character
    is not whitespace (``str.isspace`` holds for every character the tokenizers' ``\\s`` matches, and more)."""
    cuts, at = [], size
    while at < len(text):
        j = text.find(" ", at)
        while j > 0 and text[j - 1].isspace():
            j = text.find(" ", j + 1)
        if j < 0:
            break
        cuts.append(j)
        at = j + size
    return cuts


def in_pieces(encode, cuttable: bool, size: int = PIECE_CHARS):
    """``encode`` (texts -> flat ids, lengths), with a document longer than ``size`` encoded piece by piece when
    ``cuttable``: the same ids, in a fraction of the memory and time (an encoder's working set grows with the
    text it is given at once)."""
    if not cuttable:
        return encode

    def run(texts: list[str]):
        if all(len(t) <= size for t in texts):
            return encode(texts)
        parts, lens = [], []
        for long, group in itertools.groupby(texts, key=lambda t: len(t) > size):
            group = list(group)
            if not long:
                flat, n = encode(group)
                parts.append(flat)
                lens.append(n)
                continue
            for t in group:
                bounds, n = [0, *cut_points(t, size), len(t)], 0
                for a, b in zip(bounds, bounds[1:]):
                    parts.append(encode([t[a:b]])[0])
                    n += len(parts[-1])
                lens.append(np.array([n], np.int64))
        return _join(parts), np.concatenate(lens)   # no other list may hold the parts: _join frees each
    return run


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """np.concatenate(parts), releasing each part once copied: the peak is the result plus one part."""
    out = np.empty(sum(map(len, parts)), parts[0].dtype if parts else np.uint32)
    at = 0
    for i, p in enumerate(parts):
        out[at:at + len(p)] = p
        at += len(p)
        parts[i] = None
    return out


# ------------------------------------------------------------------------------------------ encoders

class HFEncoder:
    """The reference: the Hugging Face tokenizer, special-token strings encoded as text."""

    name = "hf"

    def __init__(self, tok):
        """Takes ``tok`` over: it is set to encode special-token strings as text."""
        self.tok = as_text_encoder(tok)
        self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        try:
            self.spec = _text_spec(tok)
        except NotExpressible:
            self.spec = None
        self.encode = in_pieces(self._encode_whole, cuts_before_space(self.spec))

    def _encode_whole(self, texts: list[str]):
        return flatten_ids([e.ids for e in self._encode(texts, add_special_tokens=False)])

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


class CheckedEncoder:
    """A fast encoder whose output is spot-checked against the reference on about 1/SPOT_SHARE of the text:
    one document per batch (rotating), its first SPOT_CHARS characters, whenever the accumulated credit covers
    them. A longer document's prefix is encoded again by the fast encoder: the reference's memory grows with
    the text it is given (~100 bytes per byte), so it never sees a whole long document."""

    def __init__(self, name: str, fast, ref: HFEncoder):
        """``fast``: ``fast_encoder(tok, name)``; ``ref``: the reference on the same tokenizer."""
        self.name, self.fast, self.ref = name, fast, ref
        self.credit, self.batches = SPOT_FIRST, 0

    def encode(self, texts: list[str]):
        flat, lens = self.fast(texts)
        if not texts:
            return flat, lens
        self.credit += sum(map(len, texts)) / SPOT_SHARE
        k = self.batches % len(texts)
        self.batches += 1
        text = texts[k][:SPOT_CHARS]
        if len(text) <= self.credit:
            self.credit -= len(text)
            start = int(lens[:k].sum())
            got = flat[start:start + lens[k]] if len(text) == len(texts[k]) else self.fast([text])[0]
            if not np.array_equal(got, self.ref.ids(text)):
                raise EncoderMismatch(f"the {self.name} encoder gave other ids than the Hugging Face tokenizer on a "
                                      f"document starting {texts[k][:40]!r}; run with --encoder hf to use the "
                                      f"Hugging Face tokenizer")
        return flat, lens


def make_encoder(tok, name: str):
    """The encoder a worker runs: ``name`` as chosen by ``choose_encoder``. Takes ``tok`` over (see HFEncoder)."""
    ref = HFEncoder(tok)
    return ref if name == "hf" else CheckedEncoder(name, fast_encoder(tok, name, ref.spec), ref)


def choose_encoder(tok, kind: str, sample: list[str]) -> tuple[str, str, object]:
    """(encoder name, why, the encoder): the first candidate allowed by ``kind`` that runs the tokenizer and gives
    the reference's ids on ``sample``; the reference under ``auto`` when none does, else one clear error. The
    encoder is ``make_encoder(tok, name)``'s, built once for the check and the build. Takes ``tok`` over (see
    HFEncoder)."""
    ref = HFEncoder(tok)
    if kind == "hf":
        return "hf", "asked for with --encoder hf", ref
    candidates = FAST if kind in ("auto", "fast") else (kind,)
    why_not = []
    want = ref.encode(sample)
    for name in candidates:
        try:
            fast = fast_encoder(tok, name, ref.spec)
            got = fast(sample)
        except NotExpressible as e:
            why_not.append(f"{name}: {e}")
            continue
        bad = _first_difference(got, want)
        if bad is None:
            why = f"identical ids to the Hugging Face tokenizer on a sample of {len(sample)} documents"
            return name, why, CheckedEncoder(name, fast, ref)
        why_not.append(f"{name}: other ids than the Hugging Face tokenizer on a document starting {sample[bad][:40]!r}")
    if kind == "auto":
        return "hf", "; ".join(why_not), ref
    raise SptokError(f"--encoder {kind}: no fast encoder runs this tokenizer exactly ({'; '.join(why_not)}); use "
                     f"--encoder hf or auto")


def _first_difference(got: tuple, want: tuple) -> int | None:
    """Index of the first document whose (flat ids, lengths) differ, or None."""
    (flat, lens), (want_flat, want_lens) = got, want
    if np.array_equal(lens, want_lens) and np.array_equal(flat, want_flat):
        return None
    starts, want_starts = np.cumsum(lens) - lens, np.cumsum(want_lens) - want_lens
    return next(i for i in range(len(lens)) if lens[i] != want_lens[i] or not np.array_equal(
        flat[starts[i]:starts[i] + lens[i]], want_flat[want_starts[i]:want_starts[i] + lens[i]]))


def describe(record: dict) -> str:
    """sptok.json's ``encoder`` record ({"gigatoken 0.10.0": units}) as the summary line shows it."""
    if len(record) == 1:
        return next(iter(record))
    return ", ".join(f"{k} ({n} units)" for k, n in sorted(record.items(), key=lambda kv: -kv[1]))


def flatten_ids(ids: list[list[int]]):
    """Per-document id lists -> (flat uint32 array, int64 lengths)."""
    lens = np.fromiter(map(len, ids), np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.uint32, count=int(lens.sum()))
    return flat, lens

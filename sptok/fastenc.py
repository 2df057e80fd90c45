"""The fast encoder: a byte-level BPE expressed as a tiktoken ``Encoding`` (about 6x the Hugging Face
tokenizer's single-thread speed here), used only where it gives the same ids.

Whether a tokenizer can be expressed is decided from its tokenizer.json (byte-level BPE, no normalizer,
no dropout / byte fallback / subword affixes); whether it *is* exact is checked on a sample of the corpus
at start, and spot-checked on one document of every batch during the build. Anything else falls back
to the Hugging Face tokenizer (``--encoder auto``) or is an error (``--encoder fast``).
"""

from __future__ import annotations

import json

from .errors import SptokError
from .tokenizer import HFEncoder, flatten_ids, literal_specials

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class NotExpressible(Exception):
    """Why a tokenizer cannot be run by tiktoken exactly."""


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


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


def tiktoken_encoding(tok):
    """A tiktoken Encoding with the same ordinary-text behaviour as ``tok``, or NotExpressible."""
    try:
        import tiktoken
    except ImportError:
        raise NotExpressible("tiktoken is not installed (a dependency of sptok: pip install tiktoken)") from None
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise NotExpressible(f"its model is {model.get('type')}, not BPE")
    if spec.get("normalizer"):
        raise NotExpressible(f"it has a normalizer ({spec['normalizer'].get('type')})")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise NotExpressible(f"its BPE sets {key}")
    if model.get("byte_fallback"):
        raise NotExpressible("its BPE uses byte fallback")
    pattern = _pattern(spec.get("pre_tokenizer"))
    dec = _byte_decoder()
    added = {a["content"] for a in spec.get("added_tokens", [])}
    ranks = {}
    for token, i in model["vocab"].items():
        if token in added:
            continue
        try:
            ranks[bytes(dec[c] for c in token)] = i
        except KeyError:
            raise NotExpressible(f"vocabulary entry {token!r} is not in byte-level form") from None
    if any(bytes([b]) not in ranks for b in range(256)):
        raise NotExpressible("its vocabulary lacks some of the 256 single bytes")
    try:
        return tiktoken.Encoding("sptok", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception as e:  # tiktoken raises ValueError / pyo3 errors for odd vocabularies
        raise NotExpressible(f"tiktoken refused it ({e})") from None


class FastEncoder:
    """Text -> (flat uint32 ids, lengths) with tiktoken, one thread (one worker process per core)."""

    name = "fast"

    def __init__(self, tok, enc=None):
        """Takes ``tok`` over (see HFEncoder)."""
        self.enc = enc or tiktoken_encoding(tok)
        self.hf = HFEncoder(tok)
        self._batches = 0

    def encode(self, texts: list[str]):
        encode = self.enc.encode_ordinary
        ids = [encode(t) for t in texts]
        if texts:   # spot check: one document per batch, rotating, against the Hugging Face tokenizer
            k = self._batches % len(texts)
            self._batches += 1
            want = self.hf.tok.encode(texts[k], add_special_tokens=False).ids
            if ids[k] != want:
                raise SptokError("the fast encoder (tiktoken) gave other ids than the Hugging Face tokenizer on a "
                                 f"document starting {texts[k][:40]!r}; run again with --encoder hf")
        return flatten_ids(ids)


ENCODER_LIBRARY = {"fast": "tiktoken", "hf": "hf"}   # --encoder kind -> what the build summary names


def choose_encoder(tok, kind: str, sample: list[str]) -> tuple[str, str]:
    """('fast' or 'hf', why), after checking the fast encoder on ``sample`` when it may be used."""
    if kind == "hf":
        return "hf", "asked for with --encoder hf"
    try:
        enc = tiktoken_encoding(tok)
    except NotExpressible as e:
        if kind == "fast":
            raise SptokError(f"--encoder fast: the tokenizer cannot be run by tiktoken exactly: {e}; use --encoder "
                             f"hf or auto") from None
        return "hf", f"the fast encoder does not apply: {e}"
    with literal_specials(tok) as ref:
        for text in sample:
            if enc.encode_ordinary(text) != ref.encode(text, add_special_tokens=False).ids:
                if kind == "fast":
                    raise SptokError(f"--encoder fast: tiktoken and the Hugging Face tokenizer disagree on a "
                                     f"document starting {text[:40]!r}; use --encoder hf or auto")
                return "hf", "tiktoken disagreed with the Hugging Face tokenizer on the corpus sample"
    return "fast", f"tiktoken gave identical ids on a sample of {len(sample)} documents"


def make_encoder(tok, kind: str):
    return FastEncoder(tok) if kind == "fast" else HFEncoder(tok)

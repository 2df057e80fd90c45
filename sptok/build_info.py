"""What a reader needs to know about a build: its SP table, special ids and layout, from sptok.json.

Core (numpy and tokenizers only): ``sptok show`` and ``report`` use it as much as ``sptok.data`` does. What
sptok.json says is read once, by ``BuildSpec``; this adds what only the tokenizer knows (its vocabulary and
special tokens)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from . import layout as build_dir
from .errors import SptokError
from .sp_layout import SPLayout
from .spec import BuildSpec


@dataclass
class BuildInfo:
    path: str
    format: str                 # mds | parquet | arrow
    fingerprint: str
    seq_len: int
    position: str               # prefix | post | both
    sources: list[str]          # by source id
    sps: list[str]              # SP string by source id
    weights: list[float]        # manifest weights, by source id
    sp_ids: np.ndarray          # SP token id by source id
    delimiter_ids: np.ndarray   # delimiter token ids (may be empty)
    delimiter_special: bool
    eos_id: int
    pad_id: int | None
    mask_id: int | None
    vocab_size: int             # tokenizer vocabulary, added tokens included
    special_ids: np.ndarray     # every special token (SPs, delimiter, [PAD], [MASK], EOS...): never MLM material
    ordinary_ids: np.ndarray = field(repr=False, default=None)   # the rest: what MLM may draw at random
    is_special: np.ndarray = field(repr=False, default=None)     # bool by token id: a one-gather lookup
    is_sp: np.ndarray = field(repr=False, default=None)          # bool by token id: an SP
    tokenizer_dir: str = ""
    raw: dict = field(repr=False, default_factory=dict)
    layout: SPLayout = field(repr=False, default=None)           # where SPs, the delimiter and EOS sit
    has_metadata: bool = False   # the shards have meta_spans (a build with metadata, options.metadata)

    @classmethod
    def load(cls, out: str) -> "BuildInfo":
        from tokenizers import Tokenizer

        spec = BuildSpec.parse(build_dir.load_build(out), os.path.join(out, build_dir.MARKER))
        tdir = os.path.join(out, build_dir.TOKENIZER)
        try:
            tok = Tokenizer.from_file(os.path.join(tdir, build_dir.TOKENIZER_JSON))
        except Exception as e:  # tokenizers raises a bare Exception
            raise SptokError(f"{tdir}/tokenizer.json: cannot load the build's tokenizer ({e})") from None
        vocab = tok.get_vocab_size(with_added_tokens=True)
        sp_ids = spec.sp_ids
        special = sorted({i for i, t in tok.get_added_tokens_decoder().items() if t.special} | set(sp_ids.tolist()))
        special_ids = np.array(special, np.int64)
        is_special = np.zeros(vocab, bool)
        is_special[special_ids] = True
        is_sp = np.zeros(vocab, bool)
        is_sp[sp_ids] = True
        mask = spec.roles.get("mask_token")
        lay = spec.layout
        return cls(path=out, format=spec.format, fingerprint=spec.fingerprint, seq_len=spec.seq_len,
                   position=lay.position, sources=spec.sources, sps=spec.sps, weights=spec.weights, sp_ids=sp_ids,
                   delimiter_ids=np.array(lay.delimiter_ids, np.int64), delimiter_special=lay.delimiter_special,
                   eos_id=lay.eos_id, pad_id=spec.pad_id, mask_id=tok.token_to_id(mask) if mask else None,
                   vocab_size=vocab, special_ids=special_ids,
                   ordinary_ids=np.setdiff1d(np.arange(vocab, dtype=np.int64), special_ids), is_special=is_special,
                   is_sp=is_sp, tokenizer_dir=tdir, raw=spec.raw, layout=lay,
                   has_metadata=bool(spec.options.get("metadata")))

    def is_post(self, s: dict) -> np.ndarray:
        """Which SPs of sample ``s`` are post SPs rather than prefix SPs (``SPLayout.is_post``)."""
        return self.layout.is_post(s)

"""What a reader needs to know about a build: its SP table, special ids and layout, from sptok.json.

Core (numpy and tokenizers only): ``sptok show`` and ``report`` use it as much as ``sptok.data`` does."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import SptokError
from .finalize import load_build


@dataclass
class BuildInfo:
    path: str
    format: str                 # mds | parquet | arrow
    fingerprint: str
    seq_len: int
    position: str               # prefix | post | both
    sources: list[str]          # by source id
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

    @classmethod
    def load(cls, out: str) -> "BuildInfo":
        from tokenizers import Tokenizer

        info = load_build(out)
        tdir = os.path.join(out, "tokenizer")
        try:
            tok = Tokenizer.from_file(os.path.join(tdir, "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception
            raise SptokError(f"{tdir}/tokenizer.json: cannot load the build's tokenizer ({e})") from None
        roles = info["tokenizer"].get("roles", {})
        n = len(info["sp_table"])
        sp_ids = np.zeros(n, np.int64)
        for e in info["sp_table"]:
            sp_ids[e["source_id"]] = e["token_id"]
        vocab = tok.get_vocab_size(with_added_tokens=True)
        special = sorted({i for i, t in tok.get_added_tokens_decoder().items() if t.special} | set(sp_ids.tolist()))
        special_ids = np.array(special, np.int64)
        ordinary = np.setdiff1d(np.arange(vocab, dtype=np.int64), special_ids)
        is_special = np.zeros(vocab, bool)
        is_special[special_ids] = True
        is_sp = np.zeros(vocab, bool)
        is_sp[sp_ids] = True
        sources = sorted(info["manifest"]["sources"], key=lambda s: s["source_id"])

        def role(name):
            tokstr = roles.get(name)
            return tok.token_to_id(tokstr) if tokstr else None

        return cls(path=out, format=info["format"], fingerprint=info["fingerprint"],
                   seq_len=info["options"]["seq_len"], position=info["options"]["position"],
                   sources=[s["name"] for s in sources], weights=[float(s.get("weight", 1.0)) for s in sources],
                   sp_ids=sp_ids, delimiter_ids=np.array(info["delimiter"]["ids"], np.int64),
                   delimiter_special=bool(info["delimiter"]["special"]), eos_id=int(info["eos"]["id"]),
                   pad_id=info["pad"]["id"], mask_id=role("mask_token"), vocab_size=vocab,
                   special_ids=special_ids, ordinary_ids=ordinary, is_special=is_special, is_sp=is_sp, tokenizer_dir=tdir,
                   raw=info)

    def is_post(self, s: dict) -> np.ndarray:
        """Which SPs of sample ``s`` are post SPs (text, delim, SP, EOS) rather than prefix SPs (SP, delim, text)."""
        pos = s["sp_positions"]
        if self.position != "both":
            return np.full(len(pos), self.position == "post")
        ids = s["input_ids"]
        starts_doc = np.isin(pos, s["doc_offsets"][1:])       # a prefix SP begins its document's segment
        next_is_eos = (pos + 1 < len(ids)) & (ids[np.minimum(pos + 1, len(ids) - 1)] == self.eos_id)
        return ~starts_doc & ((pos > 0) | next_is_eos)        # at 0 (a continued segment) only EOS tells

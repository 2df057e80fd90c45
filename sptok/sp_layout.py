"""Where a document's SP, its delimiter and EOS sit: the one model of it, for building and for reading.

A document that carries its SP is laid out as

    prefix   SP delim text EOS
    post     text delim SP EOS
    both     SP delim text delim SP EOS

with ``delim`` one special token (``<SPSEP>``), the token ids of plain text (``": "``), or nothing. So an SP's
delimiter is right after a prefix SP and right before a post SP. The build lays documents out with it
(``pack.assemble``), the load-time policy removes SPs with it (``data/policy.py``), ``sptok show`` marks them with
it, and ``sptok label`` places SPs and SP slots in new text with it.

One rule finds an SP's delimiter in a sample: the delimiter's tokens at their places beside the SP, taken only
when every one of them that lies inside the sample is the delimiter's (a delimiter cut off by the sample's edge
keeps the part inside). A token that merely looks like part of a delimiter is text. A special delimiter is only
ever a delimiter, so each occurrence is one, even the half of a pair cut off from its SP by a sample boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SPLayout:
    position: str                    # prefix | post | both
    delimiter_ids: tuple[int, ...]   # the delimiter's token ids (one special token, plain text's ids, or none)
    delimiter_special: bool          # a special token: never text
    eos_id: int
    delimiter: str = ""              # the delimiter as text ('' for none)

    @property
    def prefix(self) -> bool:
        """An SP goes before the text (prefix or both)."""
        return self.position in ("prefix", "both")

    @property
    def post(self) -> bool:
        """An SP goes after the text (post or both)."""
        return self.position in ("post", "both")

    @property
    def sites(self) -> int:
        """SPs a document that carries its SP holds: 2 for both, else 1."""
        return int(self.prefix) + int(self.post)

    def blocks(self, sp, delim):
        """(what goes before the text, what goes after it) in a document carrying ``sp``: ``sp + delim`` before,
        ``delim + sp`` after, each where the position puts an SP. ``sp`` and ``delim`` are sequences of one kind:
        strings, or lists of token ids."""
        return (sp + delim if self.prefix else delim[:0]), (delim + sp if self.post else delim[:0])

    def sp_offsets(self, text_len: int) -> list[int]:
        """Where the SPs of a document with ``text_len`` text tokens sit, from its first token."""
        return ([0] if self.prefix else []) + ([self.post_sp_offset(text_len)] if self.post else [])

    def post_sp_offset(self, text_len):
        """Where the post SP of a document with ``text_len`` text tokens sits (``text_len`` may be an array)."""
        d = len(self.delimiter_ids)
        return (1 + d if self.prefix else 0) + text_len + d

    def delimiter_offsets(self, post) -> np.ndarray:
        """Where an SP's delimiter tokens sit relative to the SP: after a prefix SP, before a post SP. ``post``
        may be an array (one row of offsets per SP)."""
        d = len(self.delimiter_ids)
        return np.where(np.asarray(post, bool)[..., None], np.arange(d) - d, np.arange(d) + 1)

    def delimiter_positions(self, ids: np.ndarray, sp_pos: np.ndarray, post: np.ndarray,
                            limit: int | None = None) -> np.ndarray:
        """The positions in ``ids[:limit]`` of the delimiters of the SPs at ``sp_pos`` (``post``: which are post
        SPs), by the module's rule: a delimiter is taken whole (its part inside the sample) or not at all."""
        d = len(self.delimiter_ids)
        if not d or not len(sp_pos):
            return np.empty(0, np.int64)
        n = len(ids) if limit is None else limit
        idx = np.asarray(sp_pos)[:, None] + self.delimiter_offsets(post)
        inside = (idx >= 0) & (idx < n)
        same = ids[np.clip(idx, 0, max(n - 1, 0))] == np.asarray(self.delimiter_ids)[None, :]
        whole = (same | ~inside).all(axis=1, keepdims=True)
        return idx[inside & same & whole]

    def stray_delimiters(self, ids: np.ndarray) -> np.ndarray:
        """bool per token: a special delimiter, wherever it is (never text); all False for a text delimiter."""
        if not self.delimiter_special or not self.delimiter_ids:
            return np.zeros(len(ids), bool)
        return ids == self.delimiter_ids[0]

    def is_post(self, s: dict) -> np.ndarray:
        """Which SPs of sample ``s`` are post SPs (text, delim, SP, EOS) rather than prefix SPs (SP, delim, text)."""
        pos = s["sp_positions"]
        if self.position != "both":
            return np.full(len(pos), self.position == "post")
        ids = s["input_ids"]
        starts_doc = np.isin(pos, s["doc_offsets"][1:])       # a prefix SP begins its document's segment
        next_is_eos = (pos + 1 < len(ids)) & (ids[np.minimum(pos + 1, len(ids) - 1)] == self.eos_id)
        return ~starts_doc & ((pos > 0) | next_is_eos)        # at 0 (a continued segment) only EOS tells

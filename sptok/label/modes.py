"""Fine-tuning inputs the way the paper compares them: which SP each row gets, and where it goes.

  manual   the SP of the row's own source (--source-field)
  auto     the SP the model predicts
  random   a uniformly drawn SP, keyed by (--seed, row index): the same file and seed give the same SPs
           whatever the batch size
  none     no SP: the text as it is

The SP string is placed as the build places it (``SPLayout``): prefix ``SP delim text``, post ``text delim SP``,
both ``SP delim text delim SP``. With a pair of fields, the prefix SP goes before the first field (``sp_input``)
and the post SP after the second (``sp_input_pair``), so a pair tokenizer still sees two segments.
"""

from __future__ import annotations

import numpy as np

from ..sp import SLOT_LABEL_RANDOM, uniforms
from ..sp_layout import SPLayout

MODES = ("manual", "auto", "random", "none")


def random_sources(seed: int, start: int, n: int, k: int) -> np.ndarray:
    """A source id in [0, k) for rows start .. start + n - 1, a pure function of (seed, row index)."""
    u = uniforms(np.arange(start, start + n, dtype=np.uint64), seed, SLOT_LABEL_RANDOM)
    return np.minimum((u * k).astype(np.int64), k - 1)


def place(layout: SPLayout, sp: str | None, text: str, pair: str | None) -> tuple[str, str | None]:
    """(first field with its SP, second field with its SP or None) as strings; ``sp`` None leaves them bare."""
    if sp is None:
        return text, pair
    before, after = layout.blocks(sp, layout.delimiter)
    if pair is None:
        return before + text + after, None
    return before + text, pair + after


def place_ids(layout: SPLayout, sp_id: int | None, text: list[int],
              pair: list[int] | None) -> tuple[list[int], list[int] | None]:
    """The same with token ids, laid out as a build lays out a document: the SP's own id and the
    delimiter's ids around text ids encoded as a build encodes them (a literal SP string in the text stays
    text), and the build's EOS at the end (after the second field of a pair), as in pre-training."""
    before, after = layout.blocks([sp_id], list(layout.delimiter_ids)) if sp_id is not None else ([], [])
    if pair is None:
        return before + list(text) + after + [layout.eos_id], None
    return before + list(text), list(pair) + after + [layout.eos_id]

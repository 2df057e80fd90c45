"""What ``sptok.json`` says about a build, typed and without a tokenizer: the one reading of it.

``.sptok/plan.json`` has the same keys (finalize copies them into ``sptok.json``), so a build worker reads its
plan with it too. ``BuildInfo`` (reading a build), the label's ``SPTable`` (an exported model, which carries a
copy of its build's ``sptok.json``) and the worker's ``UnitContext`` are built on a ``BuildSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import SptokError
from .sp_layout import SPLayout

SHORT_FINGERPRINT = 12   # the characters of a fingerprint that commands print; the fewest that pin a build


@dataclass(frozen=True)
class BuildSpec:
    sources: list[str]          # source names, by source id
    sps: list[str]              # SP string, by source id
    sp_ids: np.ndarray          # int64: SP token id, by source id
    weights: list[float]        # manifest weights, by source id
    layout: SPLayout            # where SPs, the delimiter and EOS go
    pad_id: int | None
    seq_len: int
    format: str                 # mds | parquet | arrow
    fingerprint: str
    options: dict               # the build's options as recorded
    roles: dict                 # the tokenizer's special-token roles (mask_token, ...)
    raw: dict = field(repr=False, default_factory=dict)   # the whole document

    @classmethod
    def parse(cls, info: dict, where: str) -> "BuildSpec":
        """The spec of a build description (``sptok.json`` or ``plan.json``); ``where`` names it in errors."""
        try:
            table = sorted(info["sp_table"], key=lambda e: e["source_id"])
            options = info["options"]
            delim = info.get("delimiter") or {"text": "", "ids": [], "special": False}
            weights = {s["name"]: float(s.get("weight", 1.0)) for s in (info.get("manifest") or {}).get("sources", [])}
            lay = SPLayout(position=options["position"], delimiter_ids=tuple(int(i) for i in delim.get("ids") or []),
                           delimiter_special=bool(delim.get("special")), eos_id=int(info["eos"]["id"]),
                           delimiter=delim.get("text") or "")
            spec = cls(sources=[e["source"] for e in table], sps=[e["sp"] for e in table],
                       sp_ids=np.array([int(e["token_id"]) for e in table], np.int64),
                       weights=[weights.get(e["source"], 1.0) for e in table], layout=lay,
                       pad_id=(info.get("pad") or {}).get("id"), seq_len=int(options["seq_len"]),
                       format=options.get("format", "mds"), fingerprint=info.get("fingerprint", ""),
                       options=options, roles=(info.get("tokenizer") or {}).get("roles", {}), raw=info)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SptokError(f"{where}: not an sptok build description (missing or malformed {e})") from None
        if not spec.sources:
            raise SptokError(f"{where}: the SP table is empty")
        return spec

    @property
    def position(self) -> str:
        return self.layout.position

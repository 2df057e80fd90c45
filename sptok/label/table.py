"""What `sptok label` reads from an exported model directory besides the weights: the SP table and layout
(``sptok.json``, the build's identity) and how the model was trained (``sptok_train.json``). No torch here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import SptokError
from ..layout import MARKER, STATS, TRAIN_CONFIG
from ..sp_layout import SPLayout
from ..spec import BuildSpec

# transformers model_type -> how the SP is scored
KINDS = {"bert": "encoder", "t5": "seq2seq", "llama": "decoder"}


@dataclass
class SPTable:
    model_dir: str
    spec: BuildSpec             # what the build's sptok.json says: SP table, layout, options
    train: dict | None          # the training config (sptok_train.json), when the export recorded it
    model_type: str | None      # config.json's model_type

    @property
    def sources(self) -> list[str]:        # by source id
        return self.spec.sources

    @property
    def sps(self) -> list[str]:            # SP string by source id
        return self.spec.sps

    @property
    def sp_ids(self) -> list[int]:         # SP token id by source id
        return self.spec.sp_ids.tolist()

    @property
    def layout(self) -> SPLayout:
        return self.spec.layout

    @property
    def position(self) -> str:             # prefix | post | both
        return self.spec.layout.position

    @property
    def delimiter(self) -> str:            # as text ('' for none)
        return self.spec.layout.delimiter

    @property
    def delimiter_ids(self) -> list[int]:
        return list(self.spec.layout.delimiter_ids)

    @property
    def eos_id(self) -> int:
        return self.spec.layout.eos_id

    @property
    def pad_id(self) -> int | None:
        return self.spec.pad_id

    @property
    def mask_token(self) -> str | None:
        return self.spec.roles.get("mask_token")

    @property
    def seq_len(self) -> int:
        return self.spec.seq_len

    @property
    def options(self) -> dict:             # the build's options (msp_prob, insert_prob, ...)
        return self.spec.options

    @property
    def kind(self) -> str:
        if self.model_type is None:
            raise SptokError(f"--model {self.model_dir}: no config.json with a model_type: the directory holds no "
                             f"model exported by `sptok export`")
        if self.model_type not in KINDS:
            raise SptokError(f"--model {self.model_dir}: model type {self.model_type!r} is not one sptok labels with "
                             f"(it trains and exports {', '.join(KINDS)})")
        return KINDS[self.model_type]

    def source_index(self, value) -> int | None:
        """A source id from a source name or its SP string; None when the model does not know it."""
        if not isinstance(value, str):
            return None
        if value in self._by_name:
            return self._by_name[value]
        return self._by_sp.get(value)

    def __post_init__(self):
        self._by_name = {n: i for i, n in enumerate(self.sources)}
        self._by_sp = {s: i for i, s in enumerate(self.sps)}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except ValueError as e:
        raise SptokError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise SptokError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(doc, dict):
        raise SptokError(f"{path}: expected a JSON object")
    return doc


def _not_a_model(d: str) -> str | None:
    """What to pass instead when ``d`` is one of the other sptok directories a user may mistake for a model:
    a build (its ``sptok.json`` beside ``stats.json``), or a checkpoint root or step directory of
    ``sptok pretrain`` (the root keeps the copy of its build in ``build/``)."""
    if os.path.exists(os.path.join(d, MARKER)) and os.path.exists(os.path.join(d, STATS)):
        return (f"--model {d}: this is an sptok build, not a model: pre-train on it (sptok pretrain), export the "
                f"checkpoint with `sptok export CHECKPOINT --out DIR` and give DIR")
    root = os.path.dirname(os.path.normpath(d)) if os.path.basename(os.path.normpath(d)).startswith("step-") else d
    if os.path.exists(os.path.join(root, "build", MARKER)):
        return (f"--model {d}: this is a training checkpoint, not a model: export it with `sptok export {d} --out "
                f"DIR` and give DIR")
    return None


def load_table(model_dir: str) -> SPTable:
    if not os.path.isdir(model_dir):
        raise SptokError(f"--model {model_dir}: no such directory (give a directory written by `sptok export`)")
    instead = _not_a_model(model_dir)
    if instead:
        raise SptokError(instead)
    path = os.path.join(model_dir, MARKER)
    if not os.path.exists(path):
        raise SptokError(f"--model {model_dir}: no {MARKER}, so this is not a model exported by sptok: labelling "
                         f"needs the SP table and layout of the build it was trained on. Export the checkpoint with "
                         f"`sptok export CHECKPOINT --out DIR`")
    spec = BuildSpec.parse(_read_json(path), path)
    train = None
    tpath = os.path.join(model_dir, TRAIN_CONFIG)
    if os.path.exists(tpath):
        train = _read_json(tpath).get("config")
        if not isinstance(train, (dict, type(None))):
            raise SptokError(f"{tpath}: its config is not a mapping (what `sptok export` writes), got {train!r:.60}")
    model_type = None
    cpath = os.path.join(model_dir, "config.json")
    if os.path.exists(cpath):
        model_type = _read_json(cpath).get("model_type")
    return SPTable(model_dir=model_dir, spec=spec, train=train, model_type=model_type)


def _policies(table: SPTable) -> list[str] | None:
    """Every load-time SP policy the training used (its policy, the schedule's, its phases'), if recorded."""
    if table.train is None:
        return None
    data = table.train.get("data") or {}
    return ([data.get("sp_policy") or "keep"] + [p for _, p in data.get("sp_schedule") or []]
            + [p["sp_policy"] for p in data.get("phases") or [] if p.get("sp_policy")])


def training_warning(table: SPTable) -> str | None:
    """Why this model's SP predictions would mean nothing, or None when it learned to predict the SP.

    Encoders (bert, t5) learn it only from masked source prediction: some SP was masked at some step when the
    build's ``msp_prob`` (or a load-time ``msp=p``) was above 0 and SPs were kept. Decoders learn it from the
    post SP, an ordinary next-token target, when SPs were kept."""
    from ..data.policy import SPPolicy

    o = table.options
    insert, msp = float(o.get("insert_prob", 1.0)), float(o.get("msp_prob", 0.0))
    policies = _policies(table)
    recorded = policies is not None
    parsed = [SPPolicy.parse(p) for p in policies] if recorded else [SPPolicy()]

    def kept(p):
        return (p.insert if p.insert is not None else insert) > 0

    unknown = "" if recorded else " (the export has no sptok_train.json, so any load-time SP policy is unknown)"
    if table.kind == "decoder":
        if not any(kept(p) for p in parsed):
            return (f"{table.model_dir} was trained with every SP stripped (load-time policy "
                    f"{', '.join(policies)}): it never saw a post SP, so its predictions are not meaningful")
        return None
    if any(kept(p) and (p.msp if p.msp is not None else msp) > 0 for p in parsed):
        return None
    how = f"build msp_prob {msp:g}" + (f", load-time SP policy {', '.join(policies)}" if recorded else "")
    return (f"{table.model_dir} was trained without masked source prediction ({how}){unknown}: it never learned "
            f"to fill the SP slot, so its source predictions are not meaningful")

"""`sptok export`: a checkpoint -> a `save_pretrained` model directory with the build's tokenizer, which
`transformers` loads offline (AutoModel*.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)).
The checkpoint's files are checked against the hashes in its ``meta.json`` before torch opens any of them."""

from __future__ import annotations

import json
import os
import shutil

from .. import layout
from ..errors import SptokError


def export(checkpoint: str, out: str) -> str:
    from . import checkpoint as ckpt
    from .config import load_config
    from .losses import LossModel
    from .model import build_model

    path = checkpoint
    if not os.path.exists(os.path.join(path, ckpt.META)):
        path = ckpt.latest(checkpoint)
        if path is None:
            raise SptokError(f"{checkpoint}: no complete checkpoint (a step-NNNNNNNN directory with {ckpt.META})")
    root = os.path.dirname(path)
    _check(path, root)
    _check_out(out)
    meta = ckpt.load_meta(path)
    info = ckpt.kept_build(path, meta)
    build_dir = info.path
    cfg = load_config(None, base={k: v for k, v in meta["config"].items()})
    model = build_model(cfg.model, info)
    ckpt.load_model_only(path, LossModel(model, cfg.model.family, info.sp_ids.tolist()))
    model.save_pretrained(out)
    for f in os.listdir(info.tokenizer_dir):
        shutil.copyfile(os.path.join(info.tokenizer_dir, f), os.path.join(out, f))
    shutil.copyfile(os.path.join(build_dir, layout.MARKER), os.path.join(out, layout.MARKER))
    # how it was trained (load-time SP policy and schedule included): `sptok label` tells an MSP model from one
    # that never learned to fill the SP slot
    with open(os.path.join(out, layout.TRAIN_CONFIG), "w") as f:
        json.dump({"checkpoint": os.path.basename(path), "fingerprint": meta["fingerprint"],
                   "config": meta["config"]}, f, indent=1, sort_keys=True)
    return out


def _check_out(out: str) -> None:
    """``out`` is new, empty or an earlier export: a model written into a build, a checkpoint directory or any
    other directory would replace its files (a build's sptok.json) or mix with them (a checkpoint root with a
    model's files is read as an export by train.init_from)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SptokError(f"--out {out}: a file; export into a new or empty directory")
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if held and not os.path.exists(os.path.join(out, layout.TRAIN_CONFIG)):
        raise SptokError(f"--out {out}: holds other files ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''})"
                         f", which the export would replace or mix with; export into a new or empty directory, "
                         f"or over an earlier export")


def _check(path: str, root: str) -> None:
    """Refuse a damaged checkpoint before torch reads it, naming the newest intact one to export instead."""
    from . import checkpoint as ckpt

    why = ckpt.damage(path)
    if why is None:
        return
    older = [p for p in ckpt.complete(root) if ckpt.step_of(p) < ckpt.step_of(path) and ckpt.damage(p) is None]
    offer = f"; the newest intact one is {older[-1]}: export it by name" if older else ""
    raise SptokError(f"checkpoint {path} is damaged: {why}; it was changed after it was written{offer}")

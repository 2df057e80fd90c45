"""`train.init_from`: start a new run from a trained model's weights (continual pre-training).

The source is a checkpoint directory (its files hash-checked before torch opens one) or an `sptok export`
directory (safetensors only: no pickle). The new run's build must use a tokenizer that extends the old one:
every old id names the same token, new ids come after. The embeddings and the output layer grow for the new
tokens; the rows of SPs the old build did not have start from the mean of the old SP rows (a new source's
SP starts as "some source", not as noise); T5's sentinels, which sit just past the vocabulary, move with it.
Everything else is copied as is and must have the same shape. The optimizer and the step start afresh.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .. import layout
from ..errors import SptokError
from ..spec import BuildSpec
from .model import T5_SENTINELS

EXPORT_META = layout.TRAIN_CONFIG


@dataclass
class Origin:
    """The trained model a run starts from, and what it was trained on."""
    path: str             # the checkpoint's step directory, or the export directory
    kind: str             # checkpoint | export
    step: int
    fingerprint: str      # its build's
    model_config: dict    # its config's model section
    tokens: list[str]     # its tokenizer's tokens, by id (added tokens included)
    sps: list[str]        # its build's SP strings
    sp_ids: list[int]
    model: object         # the transformers model, weights loaded

    def lineage(self) -> dict:
        return {"path": self.path, "kind": self.kind, "step": self.step, "fingerprint": self.fingerprint}


def load_origin(path: str, say) -> Origin:
    """The trained model at ``path`` (a checkpoint directory, one of its steps, or an export directory)."""
    from . import checkpoint as ckpt

    if os.path.exists(os.path.join(path, EXPORT_META)):
        return _from_export(path)
    step_dir = path if os.path.exists(os.path.join(path, ckpt.META)) else ckpt.newest_intact(path, say)
    if step_dir is None:
        raise SptokError(f"train.init_from: {path} is neither an sptok checkpoint (a step-NNNNNNNN directory with "
                         f"{ckpt.META}, or the checkpoint.dir holding them) nor an `sptok export` directory")
    why = ckpt.damage(step_dir)
    if why is not None:
        raise SptokError(f"train.init_from: checkpoint {step_dir} is damaged: {why}")
    return _from_checkpoint(step_dir)


def _from_checkpoint(step_dir: str) -> Origin:
    from . import checkpoint as ckpt
    from .config import ModelConfig
    from .losses import LossModel
    from .model import build_model

    meta = ckpt.load_meta(step_dir)
    try:
        info = ckpt.kept_build(step_dir, meta)
    except SptokError as e:
        raise SptokError(f"train.init_from: {e.message}") from None
    build = info.path
    model = build_model(ModelConfig(**meta["config"]["model"]), info)
    ckpt.load_model_only(step_dir, LossModel(model, meta["config"]["model"]["family"], info.sp_ids.tolist()))
    return Origin(step_dir, "checkpoint", ckpt.step_of(step_dir), meta["fingerprint"], meta["config"]["model"],
                  _tokens(os.path.join(build, layout.TOKENIZER, layout.TOKENIZER_JSON)), info.sps,
                  info.sp_ids.tolist(), model)


def _from_export(path: str) -> Origin:
    import transformers as tf
    from safetensors import SafetensorError

    classes = {"bert": tf.BertForMaskedLM, "t5": tf.T5ForConditionalGeneration, "llama": tf.LlamaForCausalLM}
    try:
        trained = layout.read_json(os.path.join(path, EXPORT_META))
        cls = classes[trained["config"]["model"]["family"]]
        marker = layout.read_json(os.path.join(path, layout.MARKER))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SptokError(f"train.init_from: {path} is not a whole `sptok export` directory "
                         f"({type(e).__name__}: {e})") from None
    spec = BuildSpec.parse(marker, os.path.join(path, layout.MARKER))
    try:
        model = cls.from_pretrained(path, use_safetensors=True)   # safetensors: loading runs no code
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:   # RuntimeError: weights of another shape
        raise SptokError(f"train.init_from: cannot load the exported model in {path} "
                         f"({' '.join(str(e).split())[:300]})") from None
    step = int(str(trained.get("checkpoint", "step-0")).removeprefix("step-") or 0)
    return Origin(path, "export", step, trained["fingerprint"], trained["config"]["model"],
                  _tokens(os.path.join(path, layout.TOKENIZER_JSON)), spec.sps, spec.sp_ids.tolist(), model)


def _tokens(tokenizer_json: str) -> list[str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    return [tok.id_to_token(i) for i in range(tok.get_vocab_size(with_added_tokens=True))]


# model settings that may differ from the origin's: the weights do not depend on them
_MODEL_FREE = ("dropout", "attn_implementation")


def check_extends(origin: Origin, info) -> None:
    """Refuse a build whose tokenizer is not the origin's with tokens added after its ids: name the first id
    that differs."""
    new = _tokens(os.path.join(info.tokenizer_dir, layout.TOKENIZER_JSON))
    for i, old in enumerate(origin.tokens):
        if i >= len(new) or new[i] != old:
            here = f"is {new[i]!r}" if i < len(new) else "does not exist"
            raise SptokError(f"train.init_from: the tokenizer of {info.path} does not extend the one {origin.path} "
                             f"was trained with: id {i} is {old!r} there and {here} here; continue on a build whose "
                             f"tokenizer only adds tokens after id {len(origin.tokens) - 1}")


def check_same_model(origin: Origin, model_cfg) -> None:
    """Refuse another model shape than the origin's (the vocabulary aside), naming the settings."""
    import dataclasses

    was, now = origin.model_config, json.loads(json.dumps(dataclasses.asdict(model_cfg)))
    keys = sorted((set(was) | set(now)) - set(_MODEL_FREE))
    changed = [f"model.{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in keys if was.get(k) != now.get(k)]
    if changed:
        raise SptokError(f"train.init_from: {origin.path} holds another model ({', '.join(changed)}); give the "
                         f"model settings it was trained with")


@torch.no_grad()
def apply_init_from(model, family: str, origin: Origin, info) -> None:
    """The origin's weights into ``model`` (built for ``info``): vocabulary rows by id, rows of new SPs from the
    mean of the old SP rows, T5's sentinels moved past the grown vocabulary, the rest copied."""
    old_model = origin.model
    vocab_params = {id(p) for p in _vocab_params(model)}
    old_params = dict(old_model.named_parameters())
    n_old, n_new = len(origin.tokens), info.vocab_size
    new_sps = [int(i) for s, i in zip(info.sps, info.sp_ids.tolist()) if s not in set(origin.sps)]
    for name, p in model.named_parameters():
        old = old_params.get(name)
        if old is None:
            raise SptokError(f"train.init_from: {origin.path} has no parameter {name}: another model")
        if id(p) in vocab_params:
            p[:n_old] = old[:n_old]
            if family == "t5":   # sentinels are the ids just past the vocabulary
                p[n_new:n_new + T5_SENTINELS] = old[n_old:n_old + T5_SENTINELS]
            if new_sps:
                p[new_sps] = old[origin.sp_ids].mean(0)
        elif p.shape != old.shape:
            raise SptokError(f"train.init_from: {name} is {tuple(old.shape)} in {origin.path} and "
                             f"{tuple(p.shape)} here; give the model settings it was trained with")
        else:
            p.copy_(old)
    old_buffers = dict(old_model.named_buffers())
    for name, b in model.named_buffers():
        if name in old_buffers and old_buffers[name].shape == b.shape:
            b.copy_(old_buffers[name])


def _vocab_params(model) -> list:
    """The parameters with a row per token id: input embeddings, output layer (and its bias)."""
    out = model.get_output_embeddings()
    return [p for p in (model.get_input_embeddings().weight, out.weight, getattr(out, "bias", None))
            if p is not None]


def init_model(cfg, model, info, say) -> dict:
    """``train.init_from`` into the freshly built ``model``; returns the lineage that ``run.json`` records."""
    origin = load_origin(cfg.train.init_from, say)
    if origin.model_config.get("family") != cfg.model.family:
        raise SptokError(f"train.init_from: {origin.path} is a {origin.model_config.get('family')} model, "
                         f"model.family is {cfg.model.family}")
    check_same_model(origin, cfg.model)
    check_extends(origin, info)
    apply_init_from(model, cfg.model.family, origin, info)
    say(f"initialised from {origin.path} (step {origin.step}, build {origin.fingerprint[:12]}); "
        f"{len(info.sps) - len(set(info.sps) & set(origin.sps))} new SP row(s) from the mean of "
        f"{len(origin.sp_ids)} old one(s)")
    return origin.lineage()

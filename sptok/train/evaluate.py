"""In-loop evaluation on a validation build: loss per source, and MSP (encoders) or post-SP (decoders) accuracy.

Deterministic: every evaluation scores the same samples (the first ``eval.samples`` of each source, in build
order) collated the same way (the collators' draws are keyed by the seed and each sample's content), so two
evaluations differ only by the model. Any number of ranks: rank r scores samples r, r + world, ... and the
sums are all-reduced; every rank runs the same number of forward passes, which FSDP needs.
"""

from __future__ import annotations

import math
import os

import torch

from .. import layout
from ..data import IGNORE
from ..errors import SptokError


def validation_build(cfg) -> str | None:
    """The validation build to evaluate on: ``eval.build``, else the training build's own split."""
    if cfg.eval.build:
        return cfg.eval.build
    own = os.path.join(cfg.data.build, "validation")
    return own if os.path.exists(os.path.join(own, layout.MARKER)) else None


def check_held_out(val, info, path: str, build: str) -> None:
    """The validation samples are not training documents: they are the training build's own split, or a build
    that reads none of its input files. The training build itself, another build of its inputs, or a split
    held out of another build of them (another seed, another share) holds documents the run trains on, and
    their loss would read as a validation loss."""
    if val.raw.get("split") and val.raw.get("parent") == info.fingerprint:
        return
    if val.fingerprint == info.fingerprint:
        raise SptokError(f"eval.build: {path} is the training build itself ({build}): its loss would be a "
                         f"training loss; evaluate on its validation split (sptok build --holdout)")
    shared = sorted(_input_files(val.raw) & _input_files(info.raw))
    if shared:
        raise SptokError(f"eval.build: {path} reads input files {build} trains on ({shared[0]}, {len(shared)} in "
                         f"all): its samples may be training documents; evaluate on the validation split of "
                         f"{build} itself (sptok build --holdout)")


def _input_files(raw: dict) -> set[str]:
    """The absolute paths of the input files a build read."""
    root = (raw.get("manifest") or {}).get("root") or ""
    return {os.path.normpath(os.path.join(root, row[0])) for row in raw.get("inputs") or ()}


class Evaluator:
    """Collates the validation samples once, then scores a model on them: ``evaluator(model) -> dict``."""

    def __init__(self, cfg, info, collator, rank: int, world: int, device):
        from ..data import open_dataset

        path = validation_build(cfg)
        if path is None:
            raise SptokError(f"eval: no validation build: set eval.build, or build {cfg.data.build} with --holdout "
                             f"or --holdout-docs (its split goes to {cfg.data.build}/validation)")
        ds = open_dataset(path, weights=False, shuffle=False, batch_size=1)
        val = ds.build
        if val.sources != info.sources or val.raw["sp_table"] != info.raw["sp_table"] or \
                val.raw["tokenizer"]["sha256"] != info.raw["tokenizer"]["sha256"]:
            raise SptokError(f"eval.build: {path} is not tokenized like {cfg.data.build} (its sources, SP table or "
                             f"tokenizer differ): evaluate on the validation split of the same build")
        check_held_out(val, info, path, cfg.data.build)
        counts = [int(val.raw["counts"][n]["samples"]) for n in val.sources]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        n = cfg.eval.samples
        ids = [i for s, c in zip(starts, counts) for i in range(s, s + (min(c, n) if n else c))]
        mine = [ds[i] for i in ids[rank::world]]
        if hasattr(ds, "close"):   # an MDS build: give its shared memory back now
            ds.close()
        bs = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
        if cfg.eval.conditions:
            self.conditions = condition_batches(collator, mine, cfg.eval.conditions, bs)
        else:
            self.conditions = [(None, [collator(mine[j:j + bs]) for j in range(0, len(mine), bs)])]
        # every rank runs as many forward passes as the rank with the most samples
        self.steps = math.ceil(math.ceil(len(ids) / world) / bs)
        self.n_sources, self.device, self.path, self.samples = len(info.sources), device, path, len(ids)

    @property
    def batches(self) -> list[dict]:
        """The batches of the first condition (the only one without ``eval.conditions``)."""
        return self.conditions[0][1]

    def records(self, model, autocast=None) -> list[dict]:
        """One record per condition: ``val_*`` numbers, and ``condition`` (the policy) with ``eval.conditions``."""
        return [{**({"condition": name} if name is not None else {}), **self._score(batches, model, autocast)}
                for name, batches in self.conditions]

    def __call__(self, model, autocast=None) -> dict:
        """The first condition's numbers."""
        return self._score(self.batches, model, autocast)

    @torch.no_grad()
    def _score(self, batches: list[dict], model, autocast=None) -> dict:
        from contextlib import nullcontext

        from .losses import label_positions
        from .meters import LossSums

        sums = LossSums(self.n_sources, self.device)
        was_training = model.training
        model.eval()
        for k in range(self.steps):
            real = k < len(batches)
            batch = batches[k if real else 0]          # a pass that counts nothing keeps ranks in step
            batch = {key: v.to(self.device, non_blocking=True) for key, v in batch.items()}
            batch["target_index"] = label_positions(batch["labels"])
            with autocast or nullcontext():
                out = model(batch)
            if real:
                sums.add(out)
        model.train(was_training)
        return {f"val_{k}": v for k, v in sums.read().items()}


def condition_batches(collator, samples: list, conditions: list[str], bs: int) -> list[tuple[str, list[dict]]]:
    """(condition, its batches) for each load-time policy in ``conditions``: the same samples, in batches that
    mix the sources (so ``meta=misplaced`` finds other values), scored on the same target tokens — the text and
    EOS tokens that are targets under every condition (a first text token is one only while something precedes
    it; a token a longer misplaced value pushed out of the sample is one in none)."""
    import numpy as np

    from ..data.policy import SPPolicy

    by_source: dict = {}
    for s in samples:
        by_source.setdefault(int(s["source_id"]), []).append(s)
    queues = list(by_source.values())
    mixed = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    was = collator.policy, collator.eval_targets
    collator.eval_targets = True
    out = []
    try:
        for text in conditions:
            collator.set_sp_policy(text)
            out.append((str(SPPolicy.parse(text)), [collator(mixed[j:j + bs]) for j in range(0, len(mixed), bs)]))
    finally:
        collator.policy, collator.eval_targets = was
    for k in range(len(out[0][1]) if out else 0):
        origins = [batches[k].pop("eval_origin").numpy() for _, batches in out]
        width = max(int(o.max(initial=0)) for o in origins) + 2
        common = np.ones((origins[0].shape[0], width), bool)
        for o in origins:
            seen = np.zeros_like(common)
            np.put_along_axis(seen, np.where(o >= 0, o, width - 1), True, axis=1)
            seen[:, width - 1] = False
            common &= seen
        for (_, batches), o in zip(out, origins):
            drop = torch.from_numpy(~np.take_along_axis(common, np.where(o >= 0, o, width - 1), axis=1))
            b = batches[k]
            b["labels"][drop] = IGNORE
            for key in ("sp_target", "msp_target"):
                if key in b:
                    b[key] &= b["labels"] != IGNORE
    return out

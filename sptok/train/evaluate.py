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
from ..errors import SptokError


def validation_build(cfg) -> str | None:
    """The validation build to evaluate on: ``eval.build``, else the training build's own split."""
    if cfg.eval.build:
        return cfg.eval.build
    own = os.path.join(cfg.data.build, "validation")
    return own if os.path.exists(os.path.join(own, layout.MARKER)) else None


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
        counts = [int(val.raw["counts"][n]["samples"]) for n in val.sources]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        n = cfg.eval.samples
        ids = [i for s, c in zip(starts, counts) for i in range(s, s + (min(c, n) if n else c))]
        mine = [ds[i] for i in ids[rank::world]]
        if hasattr(ds, "close"):   # an MDS build: give its shared memory back now
            ds.close()
        bs = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
        self.batches = [collator(mine[j:j + bs]) for j in range(0, len(mine), bs)]
        # every rank runs as many forward passes as the rank with the most samples
        self.steps = math.ceil(math.ceil(len(ids) / world) / bs)
        self.n_sources, self.device, self.path, self.samples = len(info.sources), device, path, len(ids)

    @torch.no_grad()
    def __call__(self, model, autocast=None) -> dict:
        from contextlib import nullcontext

        from .losses import label_positions
        from .meters import LossSums

        sums = LossSums(self.n_sources, self.device)
        was_training = model.training
        model.eval()
        for k in range(self.steps):
            real = k < len(self.batches)
            batch = self.batches[k if real else 0]          # a pass that counts nothing keeps ranks in step
            batch = {key: v.to(self.device, non_blocking=True) for key, v in batch.items()}
            batch["target_index"] = label_positions(batch["labels"])
            with autocast or nullcontext():
                out = model(batch)
            if real:
                sums.add(out)
        model.train(was_training)
        return {f"val_{k}": v for k, v in sums.read().items()}

"""What a training run measures: loss sums per source and for SPs (training and in-loop evaluation alike),
and the samples and tokens of each source delivered.

Nothing here reads the device while a step runs: sums accumulate on it and are read when a line is logged;
token counts come from the host batch."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class LossSums:
    """Per-target loss sums in one device vector, so that one all-reduce sums them all: per source
    (``source_loss``, ``source_targets``), then SCALARS. ``fields`` names its parts."""

    SCALARS = ("loss", "targets", "sp_loss", "sp_targets", "sp_correct")

    def __init__(self, n_sources: int, device):
        self.n, self.device = n_sources, device
        self.sums = torch.zeros(2 * n_sources + len(self.SCALARS), dtype=torch.float64, device=device)

    def fields(self, sums) -> dict:
        """The named parts of ``sums`` (a tensor: views into it; a list: its values)."""
        n = self.n
        return {"source_loss": sums[:n], "source_targets": sums[n:2 * n],
                **{k: sums[2 * n + i] for i, k in enumerate(self.SCALARS)}}

    @torch.no_grad()
    def add(self, out: dict) -> None:
        """The per-target losses of LossModel's output (device tensors), by source and for SP targets."""
        loss = out["loss"].detach().double()
        f = self.fields(self.sums)
        src = out["source"].clamp(min=0)
        f["source_loss"].index_add_(0, src, loss)             # index_add_, not bincount: no device read
        f["source_targets"].index_add_(0, src, torch.ones_like(loss))
        sp = out["sp"]
        scalars = {"loss": loss.sum(), "targets": loss.new_full((), float(loss.numel())),
                   "sp_loss": (loss * sp).sum(), "sp_targets": sp.sum(), "sp_correct": (out["sp_correct"] & sp).sum()}
        self.sums[2 * self.n:] += torch.stack([scalars[k].double() for k in self.SCALARS])

    def read(self) -> dict:
        """Mean losses and SP accuracy, summed over ranks (one all-reduce, one device read), then zeroed."""
        s = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(s)
        self.sums.zero_()
        f = self.fields(s.tolist())
        sp_n = f["sp_targets"]
        return {"loss": f["loss"] / max(f["targets"], 1),
                "loss_by_source": [(a / c) if c > 0 else None for a, c in zip(f["source_loss"], f["source_targets"])],
                "targets_by_source": f["source_targets"],
                "sp_loss": f["sp_loss"] / sp_n if sp_n > 0 else None,
                "sp_acc": f["sp_correct"] / sp_n if sp_n > 0 else None,
                "sp_targets": int(sp_n)}


class Meter:
    """A training run's numbers between two log lines (``LossSums``, tokens per second), and the samples and
    tokens of each source delivered since the start of training (``delivered``, saved in checkpoints), in
    total and per phase of ``data.phases`` (``by_phase``; ``phase`` is the one running)."""

    def __init__(self, n_sources: int, device, n_phases: int = 0):
        self.n, self.device = n_sources, device
        self.delivered = torch.zeros(2, n_sources, dtype=torch.float64)   # samples, tokens (this rank)
        self.by_phase = torch.zeros(n_phases, 2, n_sources, dtype=torch.float64)   # the same, per data.phases entry
        self.phase = 0
        self.losses = LossSums(n_sources, device)
        self.tokens, self.t0 = 0, time.perf_counter()

    def count(self, batch: dict) -> None:
        """Delivered samples and tokens per source, from a host batch."""
        n = self.n
        tok_src = batch["input_source"] if "input_source" in batch else batch["token_source"]
        real = tok_src >= 0
        self.tokens += int(real.sum())
        counts = torch.stack([torch.bincount(tok_src[:, 0].clamp(min=0), minlength=n)[:n].double(),
                              torch.bincount(tok_src[real], minlength=n)[:n].double()])
        self.delivered += counts
        if len(self.by_phase):
            self.by_phase[self.phase] += counts

    def add(self, out: dict) -> None:
        self.losses.add(out)

    def report(self, world: int) -> dict:
        """The log line's numbers, over all ranks; starts the next interval."""
        tokens = torch.tensor([self.tokens], dtype=torch.float64, device=self.device)
        # copies: on CPU .to() returns the tensor itself, and the all-reduce would add the other ranks' counts
        # into this rank's own at every log step
        delivered, by_phase = (t.to(self.device, copy=True) for t in (self.delivered, self.by_phase))
        if dist.is_initialized():
            for t in (tokens, delivered, by_phase):
                dist.all_reduce(t)
        seconds = time.perf_counter() - self.t0
        out = {**self.losses.read(), "tokens_per_s": tokens.item() / max(seconds, 1e-9),
               "delivered_samples": delivered[0].tolist(), "delivered_tokens": delivered[1].tolist()}
        if len(by_phase):
            out.update(phase=self.phase, delivered_samples_by_phase=by_phase[:, 0].tolist(),
                       delivered_tokens_by_phase=by_phase[:, 1].tolist())
        self.tokens, self.t0 = 0, time.perf_counter()
        return out

"""`sptok pretrain`: one readable training loop over an sptok build.

Launched as one process, or by `torchrun` (many): DDP or FSDP2, bf16 on CUDA, fp32 + gloo on CPU. The loss of
a step is the sum of per-token losses divided by the number of target tokens of the whole global batch
(all ranks, all micro-batches), so the gradients do not depend on how the batch is split.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.distributed as dist

from ..errors import SptokError
from .config import FAMILIES, Config


# ------------------------------------------------------------------------------------------------ setup

def init_distributed(device_kind: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_kind != "cpu"
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise SptokError("train.device: cuda was asked for, but no GPU is visible")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world, device


def ensure_build(cfg: Config, rank: int, log) -> None:
    """Build the data first when the config names a manifest and the build is not there yet; then check
    it is a build the trainer reads."""
    from ..layout import MARKER, load_build

    if not os.path.exists(os.path.join(cfg.data.build, MARKER)) and cfg.data.manifest:
        if rank == 0:
            from ..build import run_build

            log(f"building {cfg.data.build} from {cfg.data.manifest}")
            run_build(cfg.data.manifest, cfg.data.build, dict(cfg.data.build_args, quiet=True), log=log)
        if dist.is_initialized():
            dist.barrier()
    fmt = load_build(cfg.data.build)["format"]   # the clear error: missing / incomplete / not a build
    if fmt != "mds":
        raise SptokError(f"data.build: {cfg.data.build} is a build in {fmt} format; sptok pretrain reads MDS builds "
                         f"(streaming shards them over ranks and workers and resumes mid-epoch): build it with "
                         f"--format mds, or train on this one with the Hugging Face Trainer")


def lr_lambda(cfg: Config):
    o, steps = cfg.optim, cfg.train.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        frac = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
        decay = 1.0 - frac if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay
    return f


def sp_policy_at(cfg: Config, step: int) -> str:
    """The load-time SP policy in force at ``step``: the schedule's last entry that has begun."""
    policy = cfg.data.sp_policy
    for frac, p in sorted(cfg.data.sp_schedule, key=lambda x: float(x[0])):
        if step >= float(frac) * cfg.train.steps:
            policy = p
    return policy


def make_collator(cfg: Config, info):
    from ..data import CausalLMCollator, MLMCollator, SpanCorruptionCollator

    kind = FAMILIES[cfg.model.family]
    kw = {"sp_policy": sp_policy_at(cfg, 0), "seed": cfg.train.seed}
    if kind == "mlm":
        return MLMCollator(info, mlm_prob=cfg.data.mlm_prob, **kw)
    if kind == "causal":
        return CausalLMCollator(info, **kw)
    return SpanCorruptionCollator(info, **kw)


# ------------------------------------------------------------------------------------------------ metrics

class Meter:
    """Sums over the steps since the last log line (reduced over ranks when logged), and delivered
    per-source counts since the start of training (saved in checkpoints).

    Nothing here reads the device: per-target sums accumulate on it (``add``) and are read at log steps only
    (``report``); token counts come from the host batch (``count``)."""

    def __init__(self, n_sources: int, device):
        self.n, self.device = n_sources, device
        self.delivered = torch.zeros(2, n_sources, dtype=torch.float64)   # samples, tokens (this rank)
        self.reset()

    def reset(self):
        self.sums = torch.zeros(2 * self.n + 5, dtype=torch.float64, device=self.device)
        self.tokens, self.t0 = 0, time.perf_counter()

    def count(self, batch: dict) -> None:
        """Delivered samples and tokens per source, from a host batch."""
        n = self.n
        tok_src = batch["input_source"] if "input_source" in batch else batch["token_source"]
        real = tok_src >= 0
        self.tokens += int(real.sum())
        self.delivered[1] += torch.bincount(tok_src[real], minlength=n)[:n].double()
        self.delivered[0] += torch.bincount(tok_src[:, 0].clamp(min=0), minlength=n)[:n].double()

    def add(self, out: dict) -> None:
        """Per-target loss, per source and for SPs, from LossModel's output (device tensors)."""
        with torch.no_grad():
            loss = out["loss"].detach().double()
            by_source = torch.zeros(2, self.n, dtype=torch.float64, device=loss.device)
            src = out["source"].clamp(min=0)
            by_source[0].index_add_(0, src, loss)              # index_add_, not bincount: no device read
            by_source[1].index_add_(0, src, torch.ones_like(loss))
            sp = out["sp"]
            rest = torch.stack([(loss * sp).sum(), sp.sum(), (out["sp_correct"] & sp).sum(), loss.sum(),
                                loss.new_full((), float(loss.numel()))]).double()
            self.sums += torch.cat([by_source.flatten(), rest])

    def report(self, world: int) -> dict:
        s = self.sums.clone()
        tokens = torch.tensor([self.tokens], dtype=torch.float64, device=self.device)
        delivered = self.delivered.to(self.device)
        if dist.is_initialized():
            for t in (s, tokens, delivered):
                dist.all_reduce(t)
        n = self.n
        seconds = time.perf_counter() - self.t0
        out = {"loss": (s[2 * n + 3] / s[2 * n + 4].clamp(min=1)).item(),
               "loss_by_source": [(a / c) if c > 0 else None for a, c in zip(s[:n].tolist(), s[n:2 * n].tolist())],
               "targets_by_source": s[n:2 * n].tolist(),
               "sp_loss": (s[2 * n] / s[2 * n + 1].clamp(min=1)).item() if s[2 * n + 1] > 0 else None,
               "sp_acc": (s[2 * n + 2] / s[2 * n + 1]).item() if s[2 * n + 1] > 0 else None,
               "sp_targets": int(s[2 * n + 1].item()),
               "tokens_per_s": tokens.item() / max(seconds, 1e-9),
               "delivered_samples": delivered[0].tolist(), "delivered_tokens": delivered[1].tolist()}
        self.reset()
        return out


def mfu(tokens_per_s: float, model, seq_len: int) -> float:
    """Model FLOPs utilisation against H100/H200 dense bf16 peak (989.4 TFLOP/s)."""
    from .model import non_embedding_params

    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "num_layers", 0)
    hidden = getattr(c, "hidden_size", None) or getattr(c, "d_model", 0)
    flops_per_token = 6 * non_embedding_params(model) + 12 * layers * hidden * seq_len
    return tokens_per_s * flops_per_token / 989.4e12


# ------------------------------------------------------------------------------------------------ loop

def pretrain(cfg: Config, log=print) -> list[dict]:
    """Train; return the logged records (also written to ``log.dir/metrics.jsonl``)."""
    from ..build import describe_changes
    from ..data import Loader, open_dataset
    from . import checkpoint as ckpt
    from .losses import LossModel
    from .model import build_model
    from .parallelize import parallelize

    rank, world, device = init_distributed(cfg.train.device)
    say = log if rank == 0 else (lambda *a, **k: None)
    ensure_build(cfg, rank, say)
    ds = open_dataset(cfg.data.build, batch_size=cfg.train.micro_batch_size, shuffle=cfg.data.shuffle,
                      shuffle_seed=cfg.train.seed, proportion=cfg.data.proportion, repeat=cfg.data.repeat,
                      weights=cfg.data.weights, expected_fingerprint=cfg.data.expected_fingerprint)
    info = ds.build
    per_step = cfg.train.micro_batch_size * world
    if cfg.train.global_batch_size % per_step:
        raise SptokError(f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
                         f"train.micro_batch_size x processes ({per_step})")
    accum = cfg.train.global_batch_size // per_step
    bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
    parallel = cfg.train.parallel if cfg.train.parallel != "auto" else ("ddp" if world > 1 else "none")
    if parallel in ("ddp", "fsdp") and world == 1:
        parallel = "none"

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, info)
    loss_model = LossModel(model, cfg.model.family, info.sp_ids.tolist()).to(device)
    # bf16: FSDP2 casts parameters itself (MixedPrecisionPolicy); DDP / one process use autocast
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and parallel != "fsdp")
    trained = parallelize(loss_model, parallel, device, bf16, cfg.train.activation_checkpointing, cfg.train.compile)
    decay = [p for n, p in trained.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in trained.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    collator = make_collator(cfg, info)
    loader = Loader(ds, collator, batch_size=cfg.train.micro_batch_size, num_workers=cfg.data.num_workers)
    meter = Meter(len(info.sources), device)
    evaluator = _evaluator(cfg, info, rank, world, device) if cfg.eval.every else None
    build_desc = {k: info.raw[k] for k in ("options", "manifest", "tokenizer", "inputs", "sptok_version")}
    meta = {"config": cfg.to_dict(), "fingerprint": info.fingerprint, "build": build_desc, "world_size": world}

    start = 0
    resume_from = ckpt.latest(cfg.checkpoint.dir) if cfg.checkpoint.dir and cfg.checkpoint.resume else None
    if resume_from:
        old = ckpt.load_meta(resume_from)
        if old["fingerprint"] != info.fingerprint:
            raise SptokError(f"cannot resume {resume_from}: it trained on build {old['fingerprint'][:12]}, "
                             f"{cfg.data.build} is build {info.fingerprint[:12]} "
                             f"({describe_changes(old.get('build', {}), build_desc) or 'they differ'}); use "
                             f"another checkpoint.dir or the original build")
        extra = ckpt.load(resume_from, trained, optimizer)
        scheduler.load_state_dict(extra["scheduler"])
        ckpt.set_rng_state(extra["rng"])
        loader.load_state_dict(extra["loader"])
        meter.delivered = extra["delivered"].clone()
        start = int(extra["step"])
        say(f"resumed from {resume_from} at step {start}")

    os.makedirs(cfg.log.dir, exist_ok=True)
    if rank == 0:   # what `sptok stats BUILD --run LOGDIR` compares the delivered counts with
        from ..data import source_weights

        requested = source_weights(info, cfg.data.proportion, cfg.data.repeat, cfg.data.weights)
        with open(os.path.join(cfg.log.dir, "run.json"), "w") as f:
            json.dump({"config": cfg.to_dict(), "fingerprint": info.fingerprint, "sources": info.sources,
                       "requested": requested, "world_size": world}, f, indent=1, sort_keys=True)
    records: list[dict] = []
    writer = _tensorboard(cfg, rank)
    logfile = open(os.path.join(cfg.log.dir, "metrics.jsonl"), "a") if rank == 0 else None
    batches = _endless(loader)
    say(f"training {cfg.model.family} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) on "
        f"{cfg.data.build}: {world} process(es), {parallel}, {'bf16' if bf16 else 'fp32'}, {accum} micro-batch(es) "
        f"of {cfg.train.micro_batch_size} per step")
    def emit(rec: dict) -> None:
        """A record: returned, in metrics.jsonl, printed and in TensorBoard (rank 0)."""
        records.append(rec)
        if rank == 0:
            logfile.write(json.dumps(rec) + "\n")
            logfile.flush()
            _print(rec, cfg, say)
            if writer:
                _tb(writer, rec)

    def save(step: int) -> None:
        extra = {"step": step, "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(),
                 "loader": loader.state_dict(), "delivered": meter.delivered}
        ckpt.save(cfg.checkpoint.dir, step, trained, optimizer, extra, meta)
        if rank == 0:
            ckpt.keep_build(cfg.checkpoint.dir, cfg.data.build)

    end = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
    deadline = time.time() + 60 * cfg.train.max_minutes if cfg.train.max_minutes else None
    try:
        for step in range(start, end):
            if deadline is not None and _out_of_time(deadline, step, cfg.log.every):
                say(f"train.max_minutes ({cfg.train.max_minutes}) spent: stopping after step {step}")
                end = step
                break
            collator.set_sp_policy(sp_policy_at(cfg, step))
            forward_backward(trained, [next(batches) for _ in range(accum)], world, device, meter, autocast)
            grad_norm = _clip(trained, cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % cfg.log.every == 0 or step + 1 == end:   # the only place the device is read
                rec = {"step": step + 1, **meter.report(world), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": _value(grad_norm), "sp_policy": str(collator.policy), "sources": info.sources}
                if device.type == "cuda":
                    rec["mfu"] = mfu(rec["tokens_per_s"], model, info.seq_len)
                emit(rec)
            if evaluator and ((step + 1) % cfg.eval.every == 0 or step + 1 == end):
                emit({"step": step + 1, "split": "validation", **evaluator(trained, autocast), "sources": info.sources})
            if cfg.checkpoint.dir and ((cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0)
                                       or step + 1 == end):
                save(step + 1)
        if end > start and cfg.checkpoint.dir and not os.path.exists(ckpt.step_dir(cfg.checkpoint.dir, end)):
            save(end)   # stopped by the time budget: keep what was trained
    finally:
        if logfile:
            logfile.close()
        if writer:
            writer.close()
    return records


def forward_backward(trained, micro: list[dict], world: int, device, meter: Meter | None = None,
                     autocast=None) -> None:
    """Accumulate the gradients of one global batch's share on this rank: every token's loss divided by
    the number of target tokens of the whole global batch (all ranks, all micro-batches). ``micro`` are host
    batches: the target count and positions come from them, so nothing here waits for the device."""
    from contextlib import nullcontext

    from .losses import label_positions
    from .parallelize import set_grad_sync

    targets = [label_positions(mb["labels"]) for mb in micro]
    n_targets = torch.tensor(float(sum(len(t) for t in targets)), device=device)
    if dist.is_initialized():
        dist.all_reduce(n_targets)
    for i, (mb, at) in enumerate(zip(micro, targets)):
        if meter is not None:
            meter.count(mb)
        set_grad_sync(trained, i == len(micro) - 1)
        with autocast or nullcontext():
            out = trained(_to(dict(mb, target_index=at), device))
        # x world: DDP and FSDP average gradients over ranks, and each rank already divides by the global count
        (out["loss"].sum() * (world / n_targets.clamp(min=1))).backward()
        if meter is not None:
            meter.add(out)


def _out_of_time(deadline: float, step: int, every: int) -> bool:
    """The time budget is spent. Several processes: rank 0's clock decides, broadcast at log steps only (a
    broadcast each step would make the host wait for the GPU), so all ranks stop at the same step."""
    late = time.time() >= deadline
    if not dist.is_initialized():
        return late
    if step % every:
        return False
    out = torch.tensor([float(late)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(out, 0)
    return bool(out.item())


def _endless(loader):
    while True:
        yield from loader


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _clip(model, max_norm: float) -> torch.Tensor:
    """Clip and return the gradient norm as a tensor: reading it is left to the log steps."""
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def _value(norm: torch.Tensor) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # FSDP: a DTensor


def _evaluator(cfg: Config, info, rank: int, world: int, device):
    """In-loop evaluation on the validation build, its samples collated once with ``eval.sp_policy``."""
    from .evaluate import Evaluator

    collator = make_collator(cfg, info)
    collator.set_sp_policy(cfg.eval.sp_policy)
    return Evaluator(cfg, info, collator, rank, world, device)


def _print(rec: dict, cfg: Config, say) -> None:
    v = "val_" if rec.get("split") == "validation" else ""
    parts = [f"{'eval at ' if v else ''}step {rec['step']}/{cfg.train.steps}", f"{v}loss {rec[v + 'loss']:.4f}"]
    if rec[v + "sp_acc"] is not None:
        parts.append(f"{v}{'msp' if cfg.model.family != 'llama' else 'sp'} acc {rec[v + 'sp_acc']:.3f}")
    if not v:
        parts += [f"lr {rec['lr']:.2e}", f"gnorm {rec['grad_norm']:.2f}", f"{rec['tokens_per_s'] / 1e3:.1f}k tok/s"]
    if "mfu" in rec:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    by = "  ".join(f"{n} {x:.3f}" for n, x in zip(rec["sources"], rec[v + "loss_by_source"]) if x is not None)
    say("  ".join(parts) + f"  | {by}")


def _tensorboard(cfg: Config, rank: int):
    if rank != 0 or not cfg.log.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # tensorboard is optional
        return None
    return SummaryWriter(cfg.log.dir)


def _tb(writer, rec: dict) -> None:
    """Training scalars by their names; validation ones under val/ (val/loss, val/loss_by_source/<source>)."""
    step = rec["step"]
    v = "val_" if rec.get("split") == "validation" else ""
    tag = (lambda k: f"val/{k}") if v else (lambda k: k)
    for k in ("loss", "sp_loss", "sp_acc", "lr", "grad_norm", "tokens_per_s", "mfu"):
        if rec.get(v + k) is not None:
            writer.add_scalar(tag(k), rec[v + k], step)
    for name, x in zip(rec["sources"], rec[v + "loss_by_source"]):
        if x is not None:
            writer.add_scalar(tag(f"loss_by_source/{name}"), x, step)

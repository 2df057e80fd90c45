"""`sptok pretrain`: one readable training loop over an sptok build.

Launched as one process, or by `torchrun` (many): DDP or FSDP2, bf16 on CUDA, fp32 + gloo on CPU. The loss of
a step is the sum of per-token losses divided by the number of target tokens of the whole global batch
(all ranks, all micro-batches), so the gradients do not depend on how the batch is split.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import SptokError
from .config import FAMILIES, Config, check_against_build, check_build_args, check_device, check_output_dirs
from .meters import Meter
from .phases import enter_phase, open_phase, phase_at, phase_summary, plan_phases, sp_policy_at


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
    """Build the data first when the config names a manifest and the build is not there yet (when it is,
    check it has the options asked for); then check it is a build the trainer reads."""
    from ..layout import MARKER, load_build

    if os.path.exists(os.path.join(cfg.data.build, MARKER)) and cfg.data.manifest:
        check_build_args(cfg)   # on every rank: none waits at a barrier for a rank that failed
    elif cfg.data.manifest:
        from ..build.manifest import read_document

        given = cfg.data.build_args.get("format") or (read_document(cfg.data.manifest).get("build") or {}).get("format")
        _check_format(cfg.data.build, given or "mds", "would be")   # refused before it is built, not after
        if rank == 0:
            from ..build import run_build

            log(f"building {cfg.data.build} from {cfg.data.manifest}")
            run_build(cfg.data.manifest, cfg.data.build, dict(cfg.data.build_args, quiet=True), log=log)
        if dist.is_initialized():
            dist.barrier()
    # load_build gives the clear error where the build is missing, incomplete or not a build
    _check_format(cfg.data.build, load_build(cfg.data.build)["format"], "is")


def _check_format(build: str, fmt: str, verb: str) -> None:
    if fmt != "mds":
        raise SptokError(f"data.build: {build} {verb} a build in {fmt} format; sptok pretrain reads MDS builds "
                         f"(streaming shards them over ranks and workers and resumes mid-epoch): build it with "
                         f"--format mds, or train on this one with the Hugging Face Trainer")


def lr_lambda(cfg: Config):
    """The learning rate at each step as a fraction of ``optim.lr``: a linear warm-up over ``warmup_steps``,
    then ``constant``, a ``linear`` or ``cosine`` decay over the remaining steps, or ``wsd`` (warmup-stable-
    decay: stable at lr, then a linear decay over the last ``decay_steps``). Decays reach ``min_lr`` (else
    ``min_lr_ratio`` x lr) after the last step."""
    o, steps = cfg.optim, cfg.train.steps
    low = o.min_lr / o.lr if o.min_lr is not None else o.min_lr_ratio

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "wsd":
            frac = max(0, step - (steps - o.decay_steps)) / o.decay_steps
            return low + (1.0 - low) * (1.0 - frac)
        frac = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
        decay = 1.0 - frac if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return low + (1.0 - low) * decay
    return f


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
    from .stop import StopCheck

    run = setup(cfg, log)
    try:
        start = resume(run)
        with Records(run) as emit, StopCheck(cfg.train.max_minutes) as stop:
            train(run, start, emit, stop)
    finally:
        run.loader.dataset.close()   # streaming's threads and shared memory would outlive the run
    return emit.records


def end_distributed() -> None:
    """End the process group of a command whose runs are all done (`sptok pretrain`, `sptok mix`; one group
    serves every run of the command): left to the interpreter's exit, NCCL warns that it was not destroyed, and
    gloo's threads, torn down with the process, now and then abort a run that succeeded ("terminate called
    without an active exception"). Only after success: after an error the other ranks may never reach the
    barrier."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass
class Run:
    """Everything ``setup`` makes and the loop uses."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    say: Callable
    info: object          # the build's BuildInfo
    loader: object        # sptok.data.Loader: collated host batches, resumable mid-epoch
    collator: object
    model: object         # the transformers model
    trained: object       # LossModel around it, under DDP / FSDP2 / as is
    optimizer: object
    scheduler: object
    autocast: object
    accum: int            # micro-batches per step on each rank
    meter: Meter
    evaluator: object     # in-loop evaluation, or None
    meta: dict            # what every checkpoint records about the run
    phases: list          # phases.Phase of data.phases (one when none are given)
    phase: int            # the phase the loader reads
    resume_from: str | None   # the checkpoint to resume from


def setup(cfg: Config, log=print) -> Run:
    """Processes, data, model, optimizer: a run ready to start (or resume)."""
    from ..data import Loader
    from . import checkpoint as ckpt
    from .losses import LossModel
    from .model import build_model
    from .parallelize import parallelize

    rank, world, device = init_distributed(cfg.train.device)
    check_device(cfg, device.type)
    check_output_dirs(cfg)
    say = log if rank == 0 else (lambda *a, **k: None)
    ensure_build(cfg, rank, say)
    earlier = ckpt.complete(cfg.checkpoint.dir) if not cfg.checkpoint.resume else []
    if earlier:
        raise SptokError(f"checkpoint.dir: {cfg.checkpoint.dir} holds {len(earlier)} checkpoint(s) of an earlier run "
                         f"(the newest: {os.path.basename(earlier[-1])}), which checkpoint.resume: false would mix with "
                         f"this run's (export and resume take the newest step of either); give another "
                         f"checkpoint.dir, or remove them")
    resume_from = ckpt.newest_intact(cfg.checkpoint.dir, say) if cfg.checkpoint.dir and cfg.checkpoint.resume else None
    phases = plan_phases(cfg)
    phase = phase_at(phases, ckpt.step_of(resume_from)) if resume_from else 0
    ds = open_phase(cfg, phases[phase])
    info = ds.build
    check_against_build(cfg, info)
    accum, parallel = _accumulation(cfg, world), _parallel(cfg, world)
    bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, info)
    lineage = None
    if resume_from:   # a run started from init_from resumes from its own checkpoints
        lineage = ckpt.load_meta(resume_from).get("init_from")
    elif cfg.train.init_from:
        from .init_from import init_model

        lineage = init_model(cfg, model, info, say)
    loss_model = LossModel(model, cfg.model.family, info.sp_ids.tolist()).to(device)
    # bf16: FSDP2 casts parameters itself (MixedPrecisionPolicy); DDP / one process use autocast
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and parallel != "fsdp")
    trained = parallelize(loss_model, parallel, device, bf16, cfg.train.activation_checkpointing, cfg.train.compile)
    optimizer, scheduler = make_optimizer(cfg, trained, device)
    collator = make_collator(cfg, info)
    loader = Loader(ds, collator, batch_size=cfg.train.micro_batch_size, num_workers=cfg.data.num_workers)
    evaluator = _evaluator(cfg, info, rank, world, device) if cfg.eval.every else None
    build_desc = {k: info.raw[k] for k in ("options", "manifest", "tokenizer", "inputs", "sptok_version")}
    meta = {"config": cfg.to_dict(), "fingerprint": info.fingerprint, "build": build_desc, "world_size": world,
            "num_workers": loader.num_workers, "init_from": lineage}
    say(f"training {cfg.model.family} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) on "
        f"{cfg.data.build}: {world} process(es), {parallel}, {'bf16' if bf16 else 'fp32'}, {accum} micro-batch(es) "
        f"of {cfg.train.micro_batch_size} per step, {loader.num_workers} loader worker(s) per process "
        f"(data.num_workers: {cfg.data.num_workers})")
    meter = Meter(len(info.sources), device, len(cfg.data.phases))
    meter.phase = phase
    return Run(cfg, rank, world, device, say, info, loader, collator, model, trained, optimizer, scheduler,
               autocast, accum, meter, evaluator, meta, phases, phase, resume_from)


def _accumulation(cfg: Config, world: int) -> int:
    per_step = cfg.train.micro_batch_size * world
    if cfg.train.global_batch_size % per_step:
        raise SptokError(f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
                         f"train.micro_batch_size x processes ({per_step})")
    return cfg.train.global_batch_size // per_step


def _parallel(cfg: Config, world: int) -> str:
    """ddp, fsdp or none: ``auto`` is DDP over several processes; one process needs no wrapper."""
    parallel = cfg.train.parallel if cfg.train.parallel != "auto" else ("ddp" if world > 1 else "none")
    return "none" if world == 1 else parallel


def make_optimizer(cfg: Config, trained, device):
    """AdamW (no weight decay on biases and norms) and the warm-up + decay schedule."""
    decay = [p for p in trained.parameters() if p.ndim >= 2]
    no_decay = [p for p in trained.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps, fused=device.type == "cuda")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def resume(run: Run) -> int:
    """Load the newest intact checkpoint of ``checkpoint.dir`` when asked to (model, optimizer, schedule, RNG,
    the loader's place in the epoch, delivered counts); return the step to start from. A damaged checkpoint
    is reported and the one before it used; one made for another build or model shape is refused."""
    from . import checkpoint as ckpt

    path = run.resume_from
    if not path:
        return 0
    _check_resumable(run, path, ckpt.load_meta(path))
    extra = ckpt.load(path, run.trained, run.optimizer)
    run.scheduler.load_state_dict(extra["scheduler"])
    ckpt.set_rng_state(extra["rng"])
    if extra.get("phase", 0) == run.phase:   # else it was saved at the end of the last phase: this one starts
        run.loader.load_state_dict(extra["loader"])
    run.meter.delivered = torch.tensor(extra["delivered"], dtype=torch.float64)
    if len(run.meter.by_phase):
        run.meter.by_phase = torch.tensor(extra["delivered_by_phase"], dtype=torch.float64)
    run.say(f"resumed from {path} at step {int(extra['step'])}")
    return int(extra["step"])


# model settings a resume may change: the saved state does not depend on them
_MODEL_FREE = ("dropout", "attn_implementation")


def _check_resumable(run: Run, path: str, old: dict) -> None:
    """Refuse, before torch reads a tensor, a checkpoint of another build or another model shape."""
    from ..build.driver import describe_changes

    if old["fingerprint"] != run.info.fingerprint:
        raise SptokError(f"cannot resume {path}: it trained on build {old['fingerprint'][:12]}, "
                         f"{run.cfg.data.build} is build {run.info.fingerprint[:12]} "
                         f"({describe_changes(old.get('build', {}), run.meta['build']) or 'they differ'}); use "
                         f"another checkpoint.dir or the original build")
    was, now = old["config"]["model"], json.loads(json.dumps(run.cfg.to_dict()["model"]))   # as JSON stored it
    keys = sorted((set(was) | set(now)) - set(_MODEL_FREE))
    changed = [f"model.{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in keys if was.get(k) != now.get(k)]
    if changed:
        raise SptokError(f"cannot resume {path}: it holds another model ({', '.join(changed)}); use another "
                         f"checkpoint.dir or the checkpoint's model settings")
    changed = _order_changes(old["config"], json.loads(json.dumps(run.cfg.to_dict())))
    if changed:
        raise SptokError(f"cannot resume {path}: the samples' order changed ({', '.join(changed)}), so the loader's "
                         f"place in its epoch would skip or repeat samples; resume with the old values, or start a new "
                         f"run from it with train.init_from (a planned change of mixture is data.phases)")


# what decides which sample comes at which step: the loader's saved place means something only under the same
_ORDER = (("data", "proportion"), ("data", "repeat"), ("data", "weights"), ("data", "phases"), ("data", "shuffle"),
          ("train", "seed"))
_PHASE_ORDER = (("train", "steps"), ("train", "global_batch_size"))   # a phase's steps and epoch follow from these


def _order_changes(was: dict, now: dict) -> list[str]:
    keys = _ORDER + (_PHASE_ORDER if was["data"].get("phases") or now["data"]["phases"] else ())
    # a key the checkpoint lacks is from before that setting existed: its default
    return [f"{a}.{b}: {was[a].get(b)!r} -> {now[a][b]!r}" for a, b in keys
            if was[a].get(b, now[a][b]) != now[a][b]]


def train(run: Run, start: int, emit, stop) -> None:
    """Steps ``start`` .. ``train.steps`` (or ``stop_at``, or until ``stop`` says: a signal or the time budget):
    a log line every ``log.every`` steps, an evaluation every ``eval.every``, a checkpoint every
    ``checkpoint.every``, and all three at the end."""
    from . import checkpoint as ckpt

    cfg, info = run.cfg, run.info
    end = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
    batches = _endless(run.loader)
    # the first step with a non-finite gradient norm (0: none), kept on the device and read only where the
    # loop reads the device anyway (log steps) or must (before a checkpoint): a NaN / inf loss makes the
    # gradients non-finite too, so this one flag covers both without a wait per step
    first_bad = torch.zeros((), dtype=torch.int64, device=run.device)
    why = None
    for step in range(start, end):
        why = stop()
        if why:
            end = step
            break
        if step == run.phases[run.phase].end:
            batches.close()   # its loader's workers end with it
            enter_phase(run, run.phase + 1)
            batches = _endless(run.loader)
        run.collator.set_sp_policy(sp_policy_at(cfg, step))
        forward_backward(run.trained, [next(batches) for _ in range(run.accum)], run.world, run.device, run.meter,
                         run.autocast)
        grad_norm = _clip(run.trained, cfg.optim.grad_clip)
        finite = torch.isfinite(_local(grad_norm))
        if cfg.train.on_nonfinite == "skip" and not finite:   # skipping needs the answer now: one read per step
            run.say(f"step {step + 1}: non-finite gradient norm; update skipped (train.on_nonfinite: skip)")
        else:
            run.optimizer.step()
        first_bad = torch.where((first_bad == 0) & ~finite, step + 1, first_bad)
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        last = step + 1 == end
        saving = cfg.checkpoint.dir and ((cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or last)
        if (step + 1) % cfg.log.every == 0 or last:   # the device is read here, and before a checkpoint
            rec = {"step": step + 1, **run.meter.report(run.world), "lr": run.scheduler.get_last_lr()[0],
                   "grad_norm": _value(grad_norm), "sp_policy": str(run.collator.policy), "sources": info.sources}
            if run.device.type == "cuda":
                rec["mfu"] = mfu(rec["tokens_per_s"], run.model, info.seq_len)
            emit(rec)
            _stop_if_nonfinite(run, int(first_bad), rec["loss"])
        elif saving:
            _stop_if_nonfinite(run, int(first_bad))
        if run.evaluator and ((step + 1) % cfg.eval.every == 0 or last):
            for rec in run.evaluator.records(run.trained, run.autocast):
                emit({"step": step + 1, "split": "validation", **rec, "sources": info.sources})
        if saving:
            save(run, step + 1)
    if end > start and cfg.checkpoint.dir and not os.path.exists(ckpt.step_dir(cfg.checkpoint.dir, end)):
        _stop_if_nonfinite(run, int(first_bad))
        save(run, end)   # stopped early: keep what was trained
    if why:
        _stopped(run, why, end, stop.signum)


def _stop_if_nonfinite(run: Run, first_bad: int, loss: float = 0.0) -> None:
    """``train.on_nonfinite: stop``: end the run before a checkpoint holds what a NaN / inf step made."""
    if run.cfg.train.on_nonfinite != "stop" or (first_bad == 0 and math.isfinite(loss)):
        return
    from . import checkpoint as ckpt

    at = f"at step {first_bad}" if first_bad else "in the last logged steps"
    last = ckpt.latest(run.cfg.checkpoint.dir)
    kept = f"the last checkpoint is {last}" if last else "no checkpoint was written"
    raise SptokError(f"non-finite loss or gradient norm {at}: stopped without writing a checkpoint ({kept}); "
                     f"lower optim.lr or set train.on_nonfinite: skip to skip such updates")


def _stopped(run: Run, why: str, step: int, signum: int) -> None:
    """Say why the run ended early: the time budget is a normal end, a signal a pre-emption (Stopped)."""
    from ..errors import Stopped

    if not signum:
        run.say(f"{why}: stopped after step {step}")
        return
    saved = (f"saved step {step} to {run.cfg.checkpoint.dir}; run the same command again to resume"
             if run.cfg.checkpoint.dir and step else "nothing saved (no checkpoint.dir)")
    raise Stopped(f"{why}: stopped after step {step} and {saved}", signum)


def save(run: Run, step: int) -> None:
    """A checkpoint of everything ``resume`` needs (per rank: JSON, no pickle), and (rank 0) the copy of the
    build it trained on."""
    from . import checkpoint as ckpt

    extra = {"step": step, "scheduler": run.scheduler.state_dict(), "rng": ckpt.rng_state(),
             "loader": run.loader.state_dict(), "phase": run.phase, "delivered": run.meter.delivered.tolist(),
             "delivered_by_phase": run.meter.by_phase.tolist()}
    ckpt.save(run.cfg.checkpoint.dir, step, run.trained, run.optimizer, extra, run.meta)
    if run.rank == 0:
        ckpt.keep_build(run.cfg.checkpoint.dir, run.cfg.data.build)


def _check_log_dir(cfg: Config) -> None:
    """A run starting at step 0 refuses a log.dir holding another run's log (its run.json records another
    config): metrics.jsonl would hold both runs' records, one after the other, and run.json describe only the
    second. The same run started again (stopped before its first checkpoint, or without checkpoints) appends,
    as a resumed run does."""
    path = os.path.join(cfg.log.dir, "run.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError):
        old = {}
    now = json.loads(json.dumps(cfg.to_dict()))   # as run.json holds it (tuples as lists)
    changed = [f"{sec}.{k}" for sec, values in now.items() for k, v in values.items()
               if not isinstance(old.get(sec), dict) or old[sec].get(k) != v]
    if changed:
        raise SptokError(f"log.dir: {cfg.log.dir} holds the log of another run (its run.json differs in "
                         f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); both runs' records "
                         f"would mix in its metrics.jsonl: give another log.dir, or remove it")


class Records:
    """Where records go (rank 0): ``metrics.jsonl``, the console, TensorBoard; every rank keeps them in
    ``.records``. Entering writes ``run.json``, what `sptok stats BUILD --run LOGDIR` compares the delivered
    counts with."""

    def __init__(self, run: Run):
        self.run, self.records = run, []
        self.logfile = self.writer = self.summary = None

    def __enter__(self):
        run, cfg = self.run, self.run.cfg
        os.makedirs(cfg.log.dir, exist_ok=True)
        if run.rank == 0:
            from ..data import source_weights

            if not run.resume_from:
                _check_log_dir(cfg)

            requested = source_weights(run.info, cfg.data.proportion, cfg.data.repeat, cfg.data.weights)
            self.summary = {"config": cfg.to_dict(), "fingerprint": run.info.fingerprint, "sources": run.info.sources,
                            "requested": requested, "world_size": run.world, "num_workers": run.loader.num_workers,
                            "init_from": run.meta["init_from"]}
            if cfg.data.phases:
                self.summary["phases"] = [phase_summary(run, p) for p in run.phases]
            self._write_summary()
            self.logfile = open(os.path.join(cfg.log.dir, "metrics.jsonl"), "a")
            self.writer = _tensorboard(cfg, run.rank)
        return self

    def __call__(self, rec: dict) -> None:
        self.records.append(rec)
        if self.logfile:
            self.logfile.write(json.dumps(rec) + "\n")
            self.logfile.flush()
            _print(rec, self.run.cfg, self.run.say)
            if self.writer:
                _tb(self.writer, rec)

    def __exit__(self, *exc) -> None:
        for f in (self.logfile, self.writer):
            if f:
                f.close()
        trained = [r for r in self.records if "delivered_samples_by_phase" in r]
        if self.logfile and trained:   # what each phase delivered, as of the last logged step
            for p, samples, tokens in zip(self.summary["phases"], trained[-1]["delivered_samples_by_phase"],
                                          trained[-1]["delivered_tokens_by_phase"]):
                p.update(delivered_samples=samples, delivered_tokens=tokens)
            self._write_summary()

    def _write_summary(self) -> None:
        from ..layout import write_json

        write_json(os.path.join(self.run.cfg.log.dir, "run.json"), self.summary)


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


def _endless(loader):
    while True:
        yield from loader


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _clip(model, max_norm: float) -> torch.Tensor:
    """Clip and return the gradient norm as a tensor: reading it is left to the log steps."""
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def _local(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # FSDP: a DTensor


def _value(norm: torch.Tensor) -> float:
    return float(_local(norm))


def _evaluator(cfg: Config, info, rank: int, world: int, device):
    """In-loop evaluation on the validation build, its samples collated once with ``eval.sp_policy`` (or once per
    policy of ``eval.conditions``)."""
    from .evaluate import Evaluator

    collator = make_collator(cfg, info)
    collator.set_sp_policy(cfg.eval.sp_policy)
    return Evaluator(cfg, info, collator, rank, world, device)


def _print(rec: dict, cfg: Config, say) -> None:
    v = "val_" if rec.get("split") == "validation" else ""
    cond = f" ({rec['condition']})" if "condition" in rec else ""
    parts = [f"{'eval at ' if v else ''}step {rec['step']}/{cfg.train.steps}{cond}", f"{v}loss {rec[v + 'loss']:.4f}"]
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
    group = f"val/{rec['condition']}" if "condition" in rec else "val"   # one curve per eval condition
    tag = (lambda k: f"{group}/{k}") if v else (lambda k: k)
    for k in ("loss", "sp_loss", "sp_acc", "lr", "grad_norm", "tokens_per_s", "mfu"):
        if rec.get(v + k) is not None:
            writer.add_scalar(tag(k), rec[v + k], step)
    for name, x in zip(rec["sources"], rec[v + "loss_by_source"]):
        if x is not None:
            writer.add_scalar(tag(f"loss_by_source/{name}"), x, step)

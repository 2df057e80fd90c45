"""Checkpoints with torch.distributed.checkpoint: sharded model + optimizer, plus a small per-rank JSON file
(step, scheduler, RNG, data-loader position, delivered-token counters).

A checkpoint directory is complete when its ``meta.json`` exists (written last, by rank 0); it records the
training config, the build it trained on, and the size and xxh64 of every other file in the directory.
Loading checks those first: DCP reads ``.metadata`` with ``pickle.load``, so no byte of a checkpoint reaches
torch before it is known to be what the run wrote. Resuming picks the newest intact checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .. import layout
from ..errors import SptokError
from ..build.manifest import file_xxh64

META = "meta.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gathered(mine: list) -> list:
    """Every rank's list, concatenated, on every rank."""
    if not dist.is_initialized():
        return mine
    parts = [None] * _world()
    dist.all_gather_object(parts, mine)
    return [x for p in parts for x in p]


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def complete(root: str) -> list[str]:
    """The complete checkpoints of ``root`` (those with ``meta.json``), oldest first."""
    if not root or not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root))
            if d.startswith("step-") and os.path.exists(os.path.join(root, d, META))]


def latest(root: str) -> str | None:
    done = complete(root)
    return done[-1] if done else None


def step_of(path: str) -> int:
    return int(os.path.basename(path).removeprefix("step-"))


def rng_state() -> dict:
    """The RNG states as JSON values (byte lists), so the per-rank file holds no pickle."""
    state = {"torch": torch.get_rng_state().tolist(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _extra_name(rank: int) -> str:
    return f"extra-rank{rank}.json"


def save(root: str, step: int, model, optimizer, extra: dict, meta: dict) -> str:
    """Write step ``step`` on every rank; ``extra`` is this rank's JSON-able state. A full disk is one line
    naming the last complete checkpoint."""
    path = step_dir(root, step)
    if _rank() == 0 and os.path.exists(path):
        shutil.rmtree(path)       # an incomplete (or damaged) earlier attempt at this step
    _barrier()
    before = latest(root)
    try:
        _write(path, model, optimizer, extra, meta)
    except (Exception, CheckpointException) as e:   # DCP's CheckpointException is a BaseException
        if not _disk_full(e):
            raise
        last = f"step {step_of(before)}" if before else "none (no checkpoint was completed yet)"
        raise SptokError(f"disk full saving step {step} to {root}; the last complete checkpoint is {last}") from None
    return path


def _write(path: str, model, optimizer, extra: dict, meta: dict) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():   # one process: DCP says it saves without torch.distributed, as meant
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)   # raises on every rank if one fails
    _on_every_rank(lambda: layout.write_json(os.path.join(path, _extra_name(_rank())), extra))
    names = sorted(os.listdir(path)) if _rank() == 0 else None
    if dist.is_initialized():   # one listing for all: every rank hashes its share of the same files
        box = [names]
        dist.broadcast_object_list(box, 0)
        names = box[0]
    files = dict(_gathered([(n, _file_record(os.path.join(path, n))) for n in names[_rank()::_world()]]))
    # last: the checkpoint is complete
    _on_every_rank(lambda: _rank() == 0 and layout.write_json(os.path.join(path, META), {**meta, "files": files}))


def _on_every_rank(write) -> None:
    """Run ``write`` on every rank, then a barrier that also tells every rank whether any failed: all raise,
    and none waits for a rank that gave up."""
    err = None
    try:
        write()
    except OSError as e:
        err = e
    if dist.is_initialized():
        flag = torch.tensor([int(err is not None and _disk_full(err)), int(err is not None)])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag)
        if err is None and flag[1]:
            err = OSError(errno.ENOSPC if flag[0] else errno.EIO, "failed on another rank")
    if err is not None:
        raise err


def _file_record(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "xxh64": file_xxh64(path)}


def _disk_full(e: BaseException) -> bool:
    """Whether a save failed for want of space: ENOSPC anywhere in the chain, or torch's zip writer's short
    write (``inline_container.cc ... unexpected pos``), which is how a full disk reaches torch.save."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return True
        if any(s in str(x) for s in ("No space left on device", "unexpected pos", "file write failed")):
            return True
        if isinstance(x, CheckpointException):
            stack += [exc for exc, _ in x.failures.values()]
        stack += [x.__cause__, x.__context__]
    return False


def keep_build(root: str, build: str) -> None:
    """Copy the build's identity and tokenizer next to the checkpoints, so an export needs nothing else."""
    dst = os.path.join(root, "build")
    marker = os.path.join(dst, layout.MARKER)
    if os.path.exists(marker):
        kept, now = (layout.read_json(m).get("fingerprint") for m in (marker, os.path.join(build, layout.MARKER)))
        if kept == now:
            return
        shutil.rmtree(dst)   # another build's, left by checkpoints that are gone: export would read it
    os.makedirs(dst, exist_ok=True)
    shutil.copytree(os.path.join(build, "tokenizer"), os.path.join(dst, "tokenizer"), dirs_exist_ok=True)
    for name in (layout.STATS, layout.MARKER):   # sptok.json last: the copy is complete
        shutil.copyfile(os.path.join(build, name), os.path.join(dst, name))


def kept_build(step_dir: str, meta: dict):
    """The BuildInfo of the copy ``keep_build`` made beside the steps, refused unless it is the build the step
    trained on (steps of two runs in one directory, from before that was refused, pair a model with another
    build's tokenizer and SP table)."""
    from ..build_info import BuildInfo

    root = os.path.dirname(step_dir)
    build = os.path.join(root, "build")
    if not os.path.exists(os.path.join(build, layout.MARKER)):
        raise SptokError(f"{root}: the checkpoints lack the copy of their build (build/{layout.MARKER})")
    info = BuildInfo.load(build)
    if info.fingerprint != meta["fingerprint"]:
        raise SptokError(f"checkpoint {step_dir} trained on build {meta['fingerprint'][:12]}, but the copy of the "
                         f"build beside it ({build}) is build {info.fingerprint[:12]}: its tokenizer and SP table are "
                         f"not the model's; use a checkpoint.dir of one run")
    return info


def load_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, META)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SptokError(f"{path}: not a complete sptok checkpoint ({e})") from None


def damage(path: str) -> str | None:
    """What is wrong with the files of the checkpoint at ``path`` against its ``meta.json`` (a file missing,
    resized or changed), or None when it is intact. Every rank hashes a share and all get the answer."""
    files = load_meta(path).get("files")
    if not isinstance(files, dict) or not files:
        return f"{META} records no file hashes (written by an older sptok), so it cannot be checked"
    problems = []
    for name in sorted(files)[_rank()::_world()]:
        want, p = files[name], os.path.join(path, name)
        if not os.path.isfile(p):
            problems.append(f"{name} is missing")
        elif os.path.getsize(p) != want.get("bytes"):
            problems.append(f"{name} has {os.path.getsize(p):,} bytes, {META} recorded {want.get('bytes'):,}")
        elif (got := file_xxh64(p)) != want.get("xxh64"):
            problems.append(f"{name} has xxh64 {got}, {META} recorded {want.get('xxh64')}")
    problems = sorted(_gathered(problems))
    if not problems:
        return None
    return "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")


def newest_intact(root: str, say) -> str | None:
    """The newest complete checkpoint of ``root`` whose files match its ``meta.json``; damaged ones are
    reported and passed over. None when ``root`` has no complete checkpoint; an error when it has only
    damaged ones (starting over would silently replace them)."""
    damaged = []
    for path in reversed(complete(root)):
        why = damage(path)
        if why is None:
            return path
        damaged.append(f"{os.path.basename(path)}: {why}")
        say(f"checkpoint {path} is damaged ({why}): falling back to the previous one")
    if damaged:
        raise SptokError(f"no intact checkpoint in {root} ({'; '.join(damaged[:3])}); move the damaged ones away "
                         f"to train from the start")
    return None


def load(path: str, model, optimizer) -> dict:
    """Load model + optimizer state into the (already parallelized) model; return this rank's extra state.
    The caller has checked the files (``newest_intact``)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = os.path.join(path, _extra_name(_rank()))
    if not os.path.exists(extra):
        raise SptokError(f"{path}: no state for rank {_rank()} (the checkpoint was written by fewer processes); "
                         f"resume with the same number of processes")
    with open(extra) as f:
        return json.load(f)


def load_model_only(path: str, model) -> None:
    """Model weights of a checkpoint into a plain (unsharded, single-process) module, for export. The caller
    has checked the files (``damage``)."""
    model_sd = get_state_dict(model, [], options=StateDictOptions())[0]
    state = {"model": model_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})

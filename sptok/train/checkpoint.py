"""Checkpoints with torch.distributed.checkpoint: sharded model + optimizer, plus a small per-rank file
(step, scheduler, RNG, data-loader position, delivered-token counters) loaded with ``weights_only=True``.

A checkpoint directory is complete when its ``meta.json`` exists (written last, by rank 0); resuming picks
the newest complete one. ``meta.json`` records the training config and the build it trained on.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .. import layout
from ..errors import SptokError

META = "meta.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def latest(root: str) -> str | None:
    if not root or not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.exists(os.path.join(root, d, META)))
    return os.path.join(root, done[-1]) if done else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: str, step: int, model, optimizer, extra: dict, meta: dict) -> str:
    path = step_dir(root, step)
    if _rank() == 0 and os.path.exists(path):
        shutil.rmtree(path)       # an incomplete earlier attempt at this step
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():   # one process: DCP says it saves without torch.distributed, as meant
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    torch.save(extra, os.path.join(path, f"extra-rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        tmp = os.path.join(path, META + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(path, META))   # last: the checkpoint is complete
    _barrier()
    return path


def keep_build(root: str, build: str) -> None:
    """Copy the build's identity and tokenizer next to the checkpoints, so an export needs nothing else."""
    dst = os.path.join(root, "build")
    if os.path.exists(os.path.join(dst, layout.MARKER)):
        return
    os.makedirs(dst, exist_ok=True)
    shutil.copytree(os.path.join(build, "tokenizer"), os.path.join(dst, "tokenizer"), dirs_exist_ok=True)
    for name in (layout.STATS, layout.MARKER):   # sptok.json last: the copy is complete
        shutil.copyfile(os.path.join(build, name), os.path.join(dst, name))


def load_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, META)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SptokError(f"{path}: not a complete sptok checkpoint ({e})") from None


def load(path: str, model, optimizer) -> dict:
    """Load model + optimizer state into the (already parallelized) model; return this rank's extra state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = os.path.join(path, f"extra-rank{_rank()}.pt")
    if not os.path.exists(extra):
        raise SptokError(f"{path}: no state for rank {_rank()} (the checkpoint was written by fewer processes); "
                         f"resume with the same number of processes")
    return torch.load(extra, weights_only=True)


def load_model_only(path: str, model) -> None:
    """Model weights of a checkpoint into a plain (unsharded, single-process) module, for export."""
    model_sd = get_state_dict(model, [], options=StateDictOptions())[0]
    state = {"model": model_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})

"""Why a training run stops early, agreed by every rank: a pre-emption warning (SIGTERM, or SIGUSR1 as in
Slurm's ``--signal=USR1@60``) or the ``train.max_minutes`` budget.

A signal is only noted when it arrives; the loop finishes the step, saves a checkpoint on every rank and exits
(``sptok.errors.Stopped``). Ranks can get the signal at different steps, and a checkpoint needs all of them at
the same one, so each step ends with one all-reduce of a small CPU tensor over gloo: the hosts agree without
waiting for the GPU (on NCCL a separate gloo group carries it).
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopCheck:
    """``with StopCheck(max_minutes) as stop:`` installs the signal handlers (main thread only) and restores
    the previous ones on exit; ``stop()`` (every rank, every step) says why to stop, or None."""

    def __init__(self, max_minutes: float | None):
        self.deadline = time.time() + 60 * max_minutes if max_minutes else None
        self.signum = 0          # the signal received (any rank's, once agreed)
        self.minutes = max_minutes
        self._old: dict = {}
        self._group = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._note)
        if dist.is_initialized() and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _note(self, signum, frame) -> None:
        self.signum = signum

    def __call__(self) -> str | None:
        late = self.deadline is not None and time.time() >= self.deadline
        if dist.is_initialized():
            flags = torch.tensor([self.signum, int(late)], dtype=torch.int64)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
            self.signum, late = int(flags[0]), bool(flags[1])
        if self.signum:
            return signal.Signals(self.signum).name
        if late:
            return f"train.max_minutes ({self.minutes}) spent"
        return None

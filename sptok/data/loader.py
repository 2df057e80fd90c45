"""A loader that reads samples in worker processes and collates where the batches are consumed.

Why not ``DataLoader(collate_fn=collator)``: measured here, a collator running inside a streaming
worker is slowed several-fold by the dataset's own prefetch threads competing for the GIL, and
handing torch tensors back through shared memory costs more than the collation itself. Raw samples
travel cheaply (small numpy arrays and bytes), and collation in the consuming process keeps every collator at
0.65-0.93x raw iteration with the default workers (``benchmarks/RESULTS.md``), overlapping the GPU's work.
Resumption is exact: ``state_dict()`` is streaming's, and collation is a pure function of the samples. It
holds across worker counts too: given the batch size (``open_dataset(batch_size=...)``), streaming's sample
order does not depend on the number of workers.
"""

from __future__ import annotations

import functools
import numbers
import os
import signal
import threading

from ..errors import SptokError

MAX_AUTO_WORKERS = 8


def auto_workers(cpus: int | None = None, local_world: int | None = None) -> int:
    """The loader workers ``num_workers="auto"`` starts: this process's share of the CPUs it may run on
    (``os.sched_getaffinity``, else ``os.cpu_count()``, divided by ``LOCAL_WORLD_SIZE``, the processes torchrun
    starts on this host), less one for the process that collates, at least 1 and at most ``MAX_AUTO_WORKERS``.
    Why: with no worker the collator shares the GIL with streaming's prefetch threads (MLM + MSP at 0.30x raw
    reading, 1 worker: 0.85x), while workers beyond the free CPUs only compete with the collator."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_world is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, cpus // max(1, local_world) - 1))


def resolve_workers(num_workers: int | str) -> int:
    """``num_workers`` as a count: ``"auto"`` by ``auto_workers()``, a count as it is."""
    if num_workers == "auto":
        return auto_workers()
    if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        raise SptokError(f"num_workers: expected \"auto\" or a count >= 0, got {num_workers!r}")
    return int(num_workers)


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """A worker leaves SIGTERM, SIGUSR1 and SIGINT to the training process: Slurm signals every process of a
    job, and a worker killed by it ended the run ("DataLoader worker exited unexpectedly") before the training
    process saved its checkpoint. SIGTERM from the worker's parent still ends it (as torch's own handler
    does): that is how the parent stops its workers at exit. So SIGTERM is blocked and taken by a thread that
    reads who sent it (``sigwaitinfo``)."""
    for s in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})   # threads started from now on inherit it
    threading.Thread(target=_exit_on_parents_sigterm, args=(os.getppid(),), daemon=True).start()


def _exit_on_parents_sigterm(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)


def _samples(samples: list) -> dict:
    """The workers' "collation": the samples as they are, in a dict so StreamingDataLoader counts them right."""
    return {"samples": samples}


class Loader:
    """Batches of ``collator(samples)``, read by ``num_workers`` processes (``"auto"``: ``auto_workers()``;
    the count used is ``.num_workers``)."""

    def __init__(self, dataset, collator, batch_size: int, num_workers: int | str = "auto", **kwargs):
        self.dataset = dataset
        self.collator = collator
        self.num_workers = resolve_workers(num_workers)
        if self.num_workers:
            kwargs["worker_init_fn"] = _chained(kwargs.get("worker_init_fn"))
        if hasattr(dataset, "state_dict"):            # a StreamingDataset: resumable mid-epoch
            from streaming import StreamingDataLoader

            self.loader = StreamingDataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                                              collate_fn=_samples, **kwargs)
        else:                                         # an Arrow build through `datasets`
            from torch.utils.data import DataLoader

            self.loader = DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                                     collate_fn=_samples, **kwargs)

    def __iter__(self):
        try:
            for batch in self.loader:
                yield self.collator(batch["samples"])
        except SptokError as e:
            raise SptokError(worker_message(e.message)) from None

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        self.loader.load_state_dict(state)


def worker_message(message: str) -> str:
    """A worker's SptokError as its own one line: torch raises it again in this process with its traceback
    folded into the message (``Caught SptokError in DataLoader worker process 0. Original Traceback...``)."""
    if not message.startswith("Caught SptokError"):
        return message
    return message.rstrip().rpartition(f"{SptokError.__module__}.{SptokError.__name__}: ")[2]


def _chained(init):
    """The worker set-up: signals left to the training process, then the caller's ``worker_init_fn``."""
    return _leave_signals_to_the_trainer if init is None else functools.partial(_init_both, init)


def _init_both(init, worker_id: int) -> None:
    _leave_signals_to_the_trainer(worker_id)
    init(worker_id)

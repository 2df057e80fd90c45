"""`sptok build --executor ray`: the work units as Ray tasks, on a cluster whose nodes share the output directory.

The pool of ``runner.WorkerPool`` with Ray in place of local processes; nothing else of the build changes. Each
task runs ``unit.process_unit`` on one unit (the same read -> pack -> write -> atomic rename as a local worker),
asks Ray for one CPU (a unit runs on one core), and is retried by Ray up to RETRIES times when its worker or node
dies: a retry rebuilds the unit from its inputs, so its bytes are the same. The driver plans, holds the build
directory's lock, and finalizes from the committed units, as for a local build.

The cluster is ``--ray-address``, else ``RAY_ADDRESS``, else a new local one started for this build with
``--workers`` CPUs (never one found on this machine: Ray's own rule would join a ``ray start`` cluster silently).
ray is imported only here, and this module only by ``--executor ray`` (``pip install 'sptok[ray]'``).
"""

from __future__ import annotations

import logging
import os
import socket

from .. import layout
from ..errors import SptokError
from ..extras import require
from .encoders import EncoderMismatch
from .runner import choose_here, unit_context, warm_up

RETRIES = 3   # Ray's attempts after the first, for a task whose worker process or node died


def _unit_task(work: str, strict: bool, encoder: str, unit) -> dict:
    """One unit, on a Ray worker (kept by Ray between tasks: its context is loaded once per build)."""
    from .unit import process_unit

    _check_shared(work)
    return process_unit(unit_context(work, strict, encoder), unit)


def _choose_task(work: str, kind: str, sample: list[str]) -> tuple[str, str]:
    _check_shared(work)
    return choose_here(work, kind, sample)


def _warm_task() -> None:
    warm_up()


def _check_shared(work: str) -> None:
    """The nodes write where the driver reads: a node that cannot see the plan is on another filesystem."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one task per CPU; no thread pool inside
    if not os.path.exists(os.path.join(work, layout.PLAN)):
        raise SptokError(f"--executor ray: node {socket.gethostname()} cannot see {os.path.dirname(work)}: --out "
                         f"(or --local, for a remote --out) must be on a filesystem every Ray node mounts")


def _connect(ray, address: str | None, workers: int) -> None:
    """Join the cluster at ``address``, or start a local Ray with ``workers`` CPUs; either fails in one line."""
    if address:
        _check_reachable(address)
    where = {"address": address} if address else {"address": "local", "num_cpus": workers, "include_dashboard": False}
    try:
        # log_to_driver off: a task's errors reach the driver as exceptions, turned into sptok's one line here
        ray.init(**where, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:   # Ray raises its own types (ConnectionError, AuthenticationError, ...)
        what = f"join the Ray cluster at {address}" if address else "start a local Ray"
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise SptokError(f"--executor ray: cannot {what} ({type(e).__name__}: {first})") from None


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A cluster's address (host:port) that nothing answers on is one line now: Ray itself would retry for minutes."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():   # ray://, auto: Ray's own resolution
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise SptokError(f"--executor ray: no Ray cluster answers at {address} ({e.strerror or e}); start one "
                         f"(`ray start --head`) or fix --ray-address / RAY_ADDRESS") from None


class RayPool:
    """What ``runner.WorkerPool`` does, on a Ray cluster: connected at once, so its workers start (and import the
    encoders) while the driver plans."""

    distributed = True   # every unit goes to the cluster, even a lone one: the driver's node may not be for work

    def __init__(self, address: str | None, workers: int):
        require("ray", "--executor ray")
        import ray

        self.ray = ray
        self.refs: dict = {}
        _connect(ray, address or os.environ.get("RAY_ADDRESS"), workers)
        self.unit_task = ray.remote(_unit_task).options(num_cpus=1, max_retries=RETRIES)
        self.choose_task = ray.remote(_choose_task).options(num_cpus=1, max_retries=RETRIES)
        warm = ray.remote(_warm_task).options(num_cpus=1)
        self.warming = [warm.remote() for _ in range(max(1, int(ray.cluster_resources().get("CPU", 1))))]

    def choose_encoder(self, work: str, kind: str, sample: list[str]) -> tuple[str, str]:
        """``encoders.choose_encoder`` run by a Ray worker, which imported the encoders while the driver planned."""
        return self._get(self.choose_task.remote(work, kind, sample))

    def run(self, work: str, todo: list, strict: bool, encoder: str, progress, on_done) -> None:
        ray = self.ray
        order = sorted(todo, key=lambda u: -u.size)   # big units first: a shorter tail of the schedule
        self.refs = {self.unit_task.remote(work, strict, encoder, u): u for u in order}
        pending = list(self.refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
                for ref in done:
                    result = self._get(ref)
                    unit = self.refs[ref]
                    # a task reports once, when it commits: progress moves unit by unit
                    progress.update(result["counts"].get("docs", 0),
                                    result["counts"].get("sample_tokens", 0) + result["tail_tokens"], unit.size)
                    progress.unit_done()
                    on_done(unit)
        except EncoderMismatch:   # the build falls back: let no unit of this encoder commit after this
            self._stop(pending)
            raise

    def _get(self, ref):
        """A task's result; its SptokError as the same one line (no Ray traceback), a lost worker as one line."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, SptokError):
                raise e.cause from None
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.OutOfMemoryError) as e:
            raise SptokError(f"a Ray task died {RETRIES + 1} times ({type(e).__name__}: killed, out of memory, or "
                             f"its node lost?); the units committed so far are kept: run the same command again "
                             f"to resume") from None

    def _stop(self, refs: list) -> None:
        """Cancel ``refs`` (a running one is interrupted before its commit) and wait until none runs."""
        for ref in refs:
            self.ray.cancel(ref)
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=60)

    def close(self, kill: bool = False) -> None:
        """Disconnect: the build's job ends, and Ray stops its tasks still running (a local cluster started for
        this build ends too); their temporary directories are cleared by the next run. No ``ray.cancel`` first:
        Ray 2.60's driver aborted (a failed check in its task manager) when a task it force-cancelled had just
        finished. ``kill`` is the local pool's interface; ending the job is what kills here."""
        self.ray.shutdown()

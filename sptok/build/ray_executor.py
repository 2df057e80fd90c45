"""`sptok build --executor ray`: the work units as Ray tasks, on a cluster whose nodes share the output directory,
or upload their units to a remote one (``ray_remote.py``).

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
import sys

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


def _warm_task(remote: str | None) -> None:
    warm_up()
    if remote:   # streaming's uploaders import torch: seconds, once per worker, while the driver plans
        from streaming.base.storage import upload  # noqa: F401


def _check_shared(work: str) -> None:
    """The nodes write where the driver reads: a node that cannot see the plan is on another filesystem."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one task per CPU; no thread pool inside
    if not os.path.exists(os.path.join(work, layout.PLAN)):
        raise SptokError(f"--executor ray: node {socket.gethostname()} cannot see {os.path.dirname(work)}: --out "
                         f"must be on a filesystem every Ray node mounts, or remote (s3://...: each node uploads "
                         f"its units)")


def _connect(ray, address: str | None, workers: int) -> None:
    """Join the cluster at ``address``, or start a local Ray with ``workers`` CPUs; either fails in one line."""
    where = {"address": address} if address else {"address": "local", "num_cpus": workers, "include_dashboard": False}
    try:
        # log_to_driver off: a task's errors reach the driver as exceptions, turned into sptok's one line here
        ray.init(**where, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:   # Ray raises its own types (ConnectionError, AuthenticationError, ...)
        what = f"join the Ray cluster at {address}" if address else "start a local Ray"
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise SptokError(f"--executor ray: cannot {what} ({type(e).__name__}: {first})") from None


class _NotMainThread(logging.Filter):
    """ray.init off the main thread warns that it leaves SIGTERM alone: as meant, sptok handles SIGTERM itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


def _stop_local(ray) -> None:
    """End the local Ray this build started, at once: ``ray.shutdown`` stops each of its processes gracefully,
    waiting up to a second for each (the autoscaler's monitor takes all of it), ~1.3 s of a build on 2 cores.
    Nothing else uses that Ray, so its processes are killed instead (its workers end with their raylet).
    Ray has no public way to do it: the node ``ray.init`` started is private; without it, the graceful stop."""
    node = getattr(getattr(ray, "_private", None) and ray._private.worker, "_global_node", None)
    if node is None or not (hasattr(node, "kill_all_processes") and hasattr(node, "is_head")) \
            or not node.is_head():
        ray.shutdown()
        return
    ray._private.worker._global_node = None   # ray.shutdown only disconnects the driver, then
    ray.shutdown()
    node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)


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


_POOLS = []   # the RayPools made in this process: only a process that ran a Ray build leaves by ``leave_now``


def ran_here() -> bool:
    """Whether this process ran a build with ``--executor ray`` (the CLI then ends it with ``leave_now``)."""
    return bool(_POOLS)


def leave_now(code: int = 0) -> None:
    """End the process now, its build written (or its error said): the interpreter's own teardown after a Ray
    driver (Ray's native library and its threads) took 0.5-1.3 s more on 2 cores; after an error, Ray is not
    disconnected first (its driver sometimes exited 1 in ``ray.shutdown`` while a task of the job failed, before
    the error was said): the job, and a local Ray, end with this process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class RayPool:
    """What ``runner.WorkerPool`` does, on a Ray cluster. Ray is imported and joined (or started) in a thread of
    its own while the driver plans; its workers then import the encoders while the driver checks them. The
    thread lives until ``close``: the processes of a local Ray die with the thread that started them
    (PR_SET_PDEATHSIG is per thread)."""

    distributed = True   # every unit goes to the cluster, even a lone one: the driver's node may not be for work
    RETRIES = RETRIES    # for ray_remote's tasks, which cannot import this module (it imports them)

    def __init__(self, address: str | None, workers: int, remote: str | None = None):
        require("ray", "--executor ray")
        import threading

        _POOLS.append(self)

        self.address = address or os.environ.get("RAY_ADDRESS")
        if self.address:
            _check_reachable(self.address)   # one line now, not Ray's minutes of retries in the thread
        self.workers, self.refs, self.ray, self.failed = workers, {}, None, None
        self.remote = remote   # a remote --out: each task uploads its unit there (else all write a shared --out)
        self.started, self.closing = threading.Event(), threading.Event()
        self.abandoned = ""   # closed before Ray was up: "stop" (the thread stops it) or "kept" (after an error)
        self.thread = threading.Thread(target=self._start, name="sptok-ray", daemon=True)
        self.thread.start()

    @property
    def local(self) -> bool:
        """Whether this build starts the Ray it runs on (then the driver's machine is the whole cluster)."""
        return not self.address

    def _start(self) -> None:
        try:
            import ray

            logging.getLogger("ray._private.worker").addFilter(_NotMainThread())
            _connect(ray, self.address, self.workers)
            self.ray = ray
            self.unit_task = ray.remote(_unit_task).options(num_cpus=1, max_retries=RETRIES)
            self.choose_task = ray.remote(_choose_task).options(num_cpus=1, max_retries=RETRIES)
            warm = ray.remote(_warm_task).options(num_cpus=1)
            self.warming = [warm.remote(self.remote) for _ in range(max(1, int(ray.cluster_resources().get("CPU", 1))))]
        except BaseException as e:   # raised where the driver waits for Ray
            self.failed = e
        finally:
            self.started.set()
        self.closing.wait()
        if self.abandoned == "stop" and self.ray is not None:   # the build ended without it: stopped here, once up
            _stop_local(self.ray) if self.local else self.ray.shutdown()

    def _ready(self):
        """Ray, once joined or started; the start's error, raised here."""
        self.started.wait()
        if self.failed is not None:
            raise self.failed
        return self.ray

    def choose_encoder(self, work: str, kind: str, sample: list[str]) -> tuple[str, str]:
        """``encoders.choose_encoder`` run by a Ray worker, which imported the encoders while the driver planned;
        for a local Ray, by the driver (the same machine) while Ray still starts."""
        if self.local or self.remote:   # (a remote output's nodes do not see the work directory)
            return choose_here(work, kind, sample)
        self._ready()
        return self._get(self.choose_task.remote(work, kind, sample))

    def run(self, work: str, todo: list, strict: bool, encoder: str, progress, on_done) -> None:
        if self.local and not self.remote:
            todo = self._run_here_while_starting(work, todo, strict, encoder, progress, on_done)
        if not todo:
            return
        ray = self._ready()
        if self.remote:
            from .ray_remote import run_remote

            return run_remote(self, work, todo, strict, encoder, progress, on_done)
        order = sorted(todo, key=lambda u: -u.size)   # big units first: a shorter tail of the schedule
        self.refs = {self.unit_task.remote(work, strict, encoder, u): u for u in order}
        pending = list(self.refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
                for ref in done:
                    unit = self.refs[ref]
                    self.report(progress, self._get(ref), unit)
                    progress.unit_done()
                    on_done(unit)
        except EncoderMismatch:   # the build falls back: let no unit of this encoder commit after this
            self._stop(pending)
            raise

    @staticmethod
    def report(progress, result: dict, unit) -> None:
        """A unit's counts into the progress line: a task reports once, when it is done, so progress moves unit
        by unit."""
        progress.update(result["counts"].get("docs", 0),
                        result["counts"].get("sample_tokens", 0) + result["tail_tokens"], unit.size)

    def _run_here_while_starting(self, work: str, todo: list, strict: bool, encoder: str, progress, on_done) -> list:
        """While the local Ray starts (seconds, much of them its processes waiting on one another), the driver
        builds units itself, on this machine (the whole cluster), the smallest first; returns the units left."""
        from .unit import process_unit

        left = sorted(todo, key=lambda u: -u.size)
        while left and not self.started.is_set():
            unit = left.pop()
            process_unit(unit_context(work, strict, encoder), unit, progress=progress.update)
            progress.unit_done()
            on_done(unit)
        return left

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
        """Disconnect: the build's job ends, and Ray stops its tasks still running (a local Ray started for this
        build is stopped); their temporary directories are cleared by the next run. No ``ray.cancel`` first:
        Ray 2.60's driver aborted (a failed check in its task manager) when a task it force-cancelled had just
        finished. ``kill`` (an error): Ray is left as it is; the CLI ends the process (``leave_now``), which ends the
        job and a local Ray. A Ray still starting is left to its thread, which stops it once up (or, should this
        process end first, its processes end with the thread that started them, and Ray's reaper ends the rest)."""
        if kill or not self.started.is_set():   # an error, or every unit built by the driver while Ray started
            self.abandoned = "kept" if kill else "stop"   # an error's Ray ends with the process (``leave_now``)
            self.closing.set()
            return
        try:
            if self.ray is not None:
                _stop_local(self.ray) if self.local else self.ray.shutdown()
        finally:
            self.closing.set()
            self.thread.join()

"""Run work units: in-process for one worker, else in a pool of spawned worker processes.

Each worker rebuilds its context from the plan on disk, so every process uses identical inputs. Workers
die with the main process (PR_SET_PDEATHSIG on Linux): a `kill -9` of the build leaves no orphan still
committing units. Ctrl-C or SIGTERM stops the pool, keeps what was committed, and the next run resumes.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager


from .. import layout
from ..errors import SptokError
from .encoders import FAST, EncoderMismatch, choose_encoder, make_encoder
from .progress import Progress
from ..spec import BuildSpec
from .unit import UnitContext, process_unit

PROGRESS_EVERY = 0.5   # seconds between a worker's progress messages
MMAP_THRESHOLD = 1 << 20   # bytes: glibc gives a block this large its own mapping, unmapped when freed

_CTXS: dict = {}    # a worker's contexts, by (work dir, strict, encoder)
_CHOSEN: dict = {}  # the encoder this process built to choose it, by (work dir, name): for its first context
_QUEUE = None


def load_context(work: str, strict: bool, encoder: str) -> UnitContext:
    """A worker's context, rebuilt from ``.sptok/plan.json`` and ``.sptok/tokenizer`` (the encoder: the one this
    process chose, ``choose_here``, else built from that tokenizer)."""
    from tokenizers import Tokenizer

    unmap_freed_blocks()
    path = os.path.join(work, layout.PLAN)
    spec = BuildSpec.parse(layout.read_json(path), path)
    enc = _CHOSEN.pop((work, encoder), None) or make_encoder(Tokenizer.from_file(layout.tokenizer_json(work)), encoder)
    o, lay = spec.options, spec.layout
    literals = spec.sps + ([lay.delimiter] if lay.delimiter_special else [])   # counted where text holds them
    return UnitContext(
        work=work, fmt=spec.format, dtype=spec.raw["input_ids_dtype"], seq_len=spec.seq_len,
        shard_size=o["shard_size"], seed=o["seed"], insert_prob=o["insert_prob"], msp_prob=o["msp_prob"],
        layout=lay, sp_ids=spec.sp_ids,
        sources={s["name"]: {"text_field": s["text_field"], "id_field": s["id_field"]}
                 for s in spec.raw["manifest"]["sources"]},
        literals=literals, strict=strict, encoder=enc, holdout=o.get("holdout"),
        holdout_docs=o.get("holdout_docs"), metadata=o.get("metadata"))


def unmap_freed_blocks() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD. By default glibc raises it (up to 32 MB) whenever a mapped
    block is freed, so the next blocks of a long document (its line, its text, its ids) come from the heap and
    stay there once freed: ~1.5x a document's bytes more peak RSS (``tests/test_build.py``)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):   # not glibc: its own allocator
        pass


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # not Linux: orphans finish their unit; commits are idempotent
        return
    if os.getppid() != parent:   # the parent died before prctl (a build killed while its workers start):
        os._exit(1)              # no signal will come, and an orphan would wait for work forever


def _init_worker(queue, parent: int) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the main process decides how to stop
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core; no thread pool inside
    global _QUEUE
    _QUEUE = queue
    warm_up()


def warm_up() -> None:
    """Import what a unit needs, while the main process plans: the first fast encoder installed, which the encoder
    check tries first (the others only where it cannot run the tokenizer)."""
    import tokenizers  # noqa: F401 - imported for its start-up cost

    for name in FAST:
        try:
            __import__(name)
            return
        except ImportError:   # gigatoken and riptoken are optional (sptok[fast])
            pass


class _Batched:
    """Sums a worker's progress and sends it at most every PROGRESS_EVERY seconds."""

    def __init__(self, queue):
        self.queue, self.acc, self.last = queue, [0, 0, 0], time.time()

    def __call__(self, docs: int, tokens: int, nbytes: int) -> None:
        self.acc = [self.acc[0] + docs, self.acc[1] + tokens, self.acc[2] + nbytes]
        if time.time() - self.last >= PROGRESS_EVERY:
            self.flush()

    def flush(self) -> None:
        if any(self.acc):
            self.queue.put(tuple(self.acc))
        self.acc, self.last = [0, 0, 0], time.time()


def unit_context(work: str, strict: bool, encoder: str) -> UnitContext:
    """This worker's context for a build, loaded on its first unit."""
    key = (work, strict, encoder)
    if key not in _CTXS:
        _CTXS[key] = load_context(work, strict, encoder)
    return _CTXS[key]


def _run_one(work: str, strict: bool, encoder: str, unit) -> dict:
    report = _Batched(_QUEUE)
    try:
        return process_unit(unit_context(work, strict, encoder), unit, progress=report)
    finally:
        report.flush()


def _ready() -> None:
    """A no-op task: returns once a worker has started and imported what it needs."""


def choose_here(work: str, kind: str, sample: list[str], tok=None) -> tuple[str, str]:
    """(name, why) of ``encoders.choose_encoder`` run in this process on ``tok``, the build's tokenizer (else read
    from ``work``). The encoder it built and checked is this process's for its first unit: never built twice."""
    from tokenizers import Tokenizer

    name, why, enc = choose_encoder(tok or Tokenizer.from_file(layout.tokenizer_json(work)), kind, sample)
    _CHOSEN.clear()   # one at most: a build that chose and then stopped holds no other's
    _CHOSEN[(work, name)] = enc
    return name, why


def needs_workers(units: list) -> bool:
    """Whether ``units`` are worth worker processes: more than one of them may hold a record. A unit that starts
    none (a JSONL byte range inside one long line) only reads to that line's end, so a build of one long
    document runs in this process, and starts no worker to wait for."""
    from .readers import starts_a_record

    return sum(map(starts_a_record, units)) > 1


class WorkerPool:
    """Worker processes, spawned as soon as the pool exists so their start-up overlaps with planning.
    ``ray_executor.RayPool`` is the same interface on a Ray cluster."""

    distributed = False   # one unit runs in the main process, which is on the same machine
    remote = None         # the units are committed in the build directory (a Ray pool may upload them instead)

    def __init__(self, workers: int):
        import multiprocessing as mp
        import threading
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.workers = workers
        # the workers are born ignoring SIGINT (an ignored signal stays ignored through exec): a Ctrl-C while one
        # still starts up, before _init_worker, would print its traceback. The main process ignores it only
        # while it spawns them, here.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) \
            if threading.current_thread() is threading.main_thread() else None
        try:
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(self.queue, os.getpid()))
            for _ in range(workers):
                self.pool.submit(_ready)   # spawns every worker, now
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def choose_encoder(self, work: str, kind: str, sample: list[str]) -> tuple[str, str]:
        """``encoders.choose_encoder`` run by a worker, which imported the encoders while the main process
        planned: the main process never loads them."""
        with _worker_deaths():
            return self.pool.submit(choose_here, work, kind, sample).result()

    def run(self, work: str, todo: list, strict: bool, encoder: str, progress, on_done) -> None:
        with _worker_deaths():
            self._run(work, todo, strict, encoder, progress, on_done)

    def _run(self, work, todo, strict, encoder, progress, on_done) -> None:
        import queue as queue_mod
        from concurrent.futures import FIRST_EXCEPTION, wait

        order = sorted(todo, key=lambda u: -u.size)   # big units first: a shorter tail of the schedule
        units = {self.pool.submit(_run_one, work, strict, encoder, u): u for u in order}
        pending = set(units)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            while True:
                try:
                    progress.update(*self.queue.get_nowait())
                except queue_mod.Empty:
                    break
            try:
                for fut in done:
                    fut.result()          # re-raises a worker's SptokError
                    progress.unit_done()
                    on_done(units[fut])
            except EncoderMismatch:       # the build falls back: let no unit of this encoder commit after this
                for fut in pending:
                    fut.cancel()
                wait(pending)
                raise

    def close(self, kill: bool = False) -> None:
        if kill:
            import multiprocessing as mp

            for p in mp.active_children():   # stop units in flight; their temporary dirs are cleared next run
                p.kill()
            # then wait for the executor's manager thread to see the dead workers and end: left running, it
            # races concurrent.futures' exit hook ("Exception ignored ... Bad file descriptor" at exit)
            self.pool.shutdown(wait=True, cancel_futures=True)
        else:
            self.pool.shutdown(wait=True)


@contextmanager
def _worker_deaths():
    """A worker killed by the OS: one readable error."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        yield
    except BrokenProcessPool:
        raise SptokError("a worker process died (killed, or out of memory?); the units committed so far are "
                         "kept: run the same command again to resume, with fewer --workers if memory is short. "
                         "(From Python, start builds with several workers under `if __name__ == "
                         "'__main__':`.)") from None


def run_units(work: str, todo: list, opts, encoder: str, pool: WorkerPool | None = None,
              on_done=lambda unit: None) -> None:
    """Process ``todo``: in the pool when there is one and more than one unit (or it is a cluster), else in this
    process.
    ``on_done(unit)`` runs in this process after each commit (it may raise to stop the build)."""
    progress = Progress(total_bytes=sum(u.size for u in todo), total_units=len(todo), quiet=opts.quiet)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if pool is not None and (len(todo) > 1 or pool.distributed):
            pool.run(work, todo, opts.strict, encoder, progress, on_done)
        else:
            ctx = load_context(work, opts.strict, encoder)
            for u in todo:
                process_unit(ctx, u, progress=progress.update)
                progress.unit_done()
                on_done(u)
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt

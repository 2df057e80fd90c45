"""Writing an output directory: one writer at a time, and a complete build replaced in one step.

A writer (``sptok build``, ``sptok merge``) holds an exclusive ``flock`` on ``OUT/.sptok/lock`` from start to
end; the file says who holds it, for the message a second writer or a reader gets (``layout.writer_of``). The
kernel drops the lock when its process ends, however it ends, so a killed writer's lock is simply taken over.
``--overwrite`` of a complete build builds beside it and exchanges the two directories at the end
(``renameat2(RENAME_EXCHANGE)``), unless a process is reading the old one: streaming reads shard files by path
as an epoch goes, so a reader swapped under would read a mix of two builds.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone

from ..errors import SptokError
from ..layout import LOCK, WORK, describe_writer, writer_of


class Held:
    """An exclusive lock on a directory's ``.sptok/lock``: the directory and the open lock file."""

    def __init__(self, out: str, fd: int):
        self.out, self.fd = out, fd

    @property
    def path(self) -> str:
        return os.path.join(self.out, WORK, LOCK)


@contextmanager
def writing(out: str, command: str):
    """Hold ``out``'s writer lock for the block, or refuse in one line naming the writer that holds it. On the
    way out the lock file goes, and ``.sptok`` with it when nothing else is left in it."""
    held = Held(out, _acquire(out, command))
    try:
        yield held
    finally:
        try:
            if os.path.samestat(os.stat(held.path), os.fstat(held.fd)):   # still ours: see exchange()
                os.remove(held.path)
                os.rmdir(os.path.dirname(held.path))
        except OSError:
            pass
        os.close(held.fd)


def _acquire(out: str, command: str, patience: float = 1.0) -> int:
    """An fd holding the exclusive lock. A lock held for less than ``patience`` seconds is a reader's probe
    (``layout.writer_of``), waited out; the lock file removed by a writer that finished is made again."""
    path = os.path.join(out, WORK, LOCK)
    deadline = time.monotonic() + patience
    while True:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise SptokError(f"another {describe_writer(writer_of(out) or {})} is writing {out}; wait for it to end, "
                             f"or choose another --out") from None
        try:
            ours = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            ours = False
        if ours:
            me = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            return fd
        os.close(fd)   # the file we locked was removed meanwhile: lock the one there now


def clear_work(out: str) -> None:
    """Remove everything in ``out/.sptok`` but the lock its writer holds."""
    work = os.path.join(out, WORK)
    for name in os.listdir(work) if os.path.isdir(work) else ():
        p = os.path.join(work, name)
        if name != LOCK:
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def work_left(out: str) -> bool:
    """Whether ``out/.sptok`` holds more than a lock: a build killed after its ``sptok.json`` and before its
    work directory was cleared, whose next writer clears it."""
    work = os.path.join(out, WORK)
    return os.path.isdir(work) and bool(set(os.listdir(work)) - {LOCK})


def clear_dir(out: str) -> None:
    """Remove everything in ``out`` but its writer's lock (a build that is not complete, on --overwrite)."""
    for name in os.listdir(out):
        p = os.path.join(out, name)
        if name != WORK:
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    clear_work(out)


def beside(out: str) -> str | None:
    """Where ``--overwrite`` builds the replacement of the complete build in ``out`` (the directory, where ``out``
    is a link to it): named for it, so an interrupted --overwrite resumes there, and on the same filesystem, so
    the two can be exchanged; None where ``out`` is a mount point and no such place exists."""
    parent, name = os.path.split(os.path.realpath(out))
    if os.stat(parent).st_dev != os.stat(out).st_dev:
        return None
    return os.path.join(parent, f".{name}.sptok-overwrite")


def exchange(new: Held, out: Held) -> None:
    """Put the complete build in ``new.out`` in place of the one in ``out.out`` in one step (the old one lands
    in ``new.out``), each lock following its files; refused while a process reads the old build."""
    pids = readers(out.out)
    if pids:
        raise SptokError(f"--overwrite: {out.out} is open for reading (pid {', '.join(map(str, pids))}), so it was "
                         f"not replaced: a reader would see a mix of two builds. The new build is complete in "
                         f"{new.out}; stop the readers, then run the same command again to swap it in")
    _exchange_paths(new.out, os.path.realpath(out.out))
    new.fd, out.fd = out.fd, new.fd


def _exchange_paths(a: str, b: str) -> None:
    """Exchange two directories atomically (Linux ``renameat2``); where the filesystem cannot, two renames, so
    for a moment there is no ``b`` (a reader then finds no build, still never a mix)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None:
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), b)
    old = a + ".old"
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)


def readers(out: str) -> list[int]:
    """The processes reading the build in ``out``: a live StreamingDataset whose local directory is ``out`` or
    inside it (streaming names them in its ``/dev/shm/NNNNNN_locals`` segment), or a process that maps or holds
    open a file under it (memory-mapped Arrow shards). Empty where there is no /proc."""
    roots = {os.path.realpath(out), os.path.abspath(out)}   # streaming records the path it was given, made absolute
    inside = lambda p: any(p == r or p.startswith(r + os.sep) for r in roots)  # noqa: E731
    root, me = os.path.realpath(out), os.getpid()
    pids = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{pid}/maps") as f:
                paths = {line[line.find("/"):].rstrip("\n") for line in f if "/" in line}
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    continue
        except OSError:   # gone, or another user's
            continue
        paths.discard(os.path.join(root, WORK, LOCK))
        if int(pid) == me:   # this writer's own lock and build files are not a reader
            paths = {p for p in paths if not p.startswith(os.path.join(root, WORK))}
        if any(inside(p) for p in paths) or any(inside(d) for p in paths if p.endswith("_locals")
                                                for d in _streaming_locals(p)):
            pids.append(int(pid))
    return pids


def _streaming_locals(segment: str) -> list[str]:
    """The local directories a StreamingDataset registered in its ``_locals`` shared memory segment (streaming's
    ``shared/prefix.py``: an int32 size, then the directories and the prefix joined by NUL)."""
    try:
        with open(segment, "rb") as f:
            data = f.read(1 << 20)
        size = int.from_bytes(data[:4], "little")
        return data[4:size].decode("utf-8").split("\0")[:-1]
    except (OSError, UnicodeDecodeError):
        return []

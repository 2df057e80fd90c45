"""Streaming's shared memory left behind by readers that were killed.

A ``StreamingDataset`` keeps its coordination state in POSIX shared memory (``/dev/shm/NNNNNN_locals``,
``..._barrier``, ...) plus two lock files (``/tmp/NNNNNN_barrier_filelock``, ``..._cache_filelock``). A
process killed with ``kill -9`` removes none of them, so every such kill leaks a group for good, and new
readers skip every leaked prefix when they look for a free one. streaming's own
``clean_stale_shared_memory()`` unlinks *every* group, a live job's included; here a group is removed only
when no process holds any of its segments (mapped, or open), so two trainings on one machine stay safe.
"""

from __future__ import annotations

import os
import re
import tempfile

SHM_DIR = "/dev/shm"
# streaming/base/util.py SHM_TO_CLEAN, named f"{prefix:06}_{name}" by streaming/base/shared/prefix.py
_SEGMENT = re.compile(r"^(\d{6})_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume|"
                      r"epoch_shape|epoch_data)$")
# streaming/base/constant.py BARRIER_FILELOCK, CACHE_FILELOCK, in tempfile.gettempdir()
_FILELOCK = re.compile(r"^(\d{6})_(barrier_filelock|cache_filelock)$")


def clean_stale_shm(root: str = SHM_DIR, lock_dir: str | None = None) -> list[str]:
    """Remove this user's streaming groups that no live process holds; return the names removed.

    Cleaners take a lock, so one never acts on a listing another has made stale. Within a group the
    ``_locals`` segment goes last: streaming takes a prefix only once all its names are gone, so nothing a
    reader creates is ever removed."""
    if not os.path.isdir(root) or not os.path.isdir("/proc"):
        return []   # not Linux: nothing to look at, nothing removed
    import fcntl

    root, lock_dir = os.path.realpath(root), os.path.realpath(lock_dir or tempfile.gettempdir())
    with open(os.path.join(lock_dir, "sptok-shm-clean.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        groups = _groups(root, lock_dir)
        if not groups:
            return []
        held = _held((root, lock_dir))   # read after listing: a group created meanwhile is not in `groups`
        removed = []
        for prefix, paths in sorted(groups.items()):
            if any(p in held for p in paths):
                continue
            for path in sorted(paths, key=lambda p: p.endswith("_locals")):
                try:
                    os.unlink(path)
                    removed.append(os.path.basename(path))
                except FileNotFoundError:
                    pass
        return removed


def _groups(root: str, lock_dir: str) -> dict[str, list[str]]:
    """prefix -> paths of this user's streaming segments under ``root`` and lock files in ``lock_dir``."""
    groups: dict[str, list[str]] = {}
    uid = os.getuid()
    for d, pattern in ((root, _SEGMENT), (lock_dir, _FILELOCK)):
        for name in os.listdir(d):
            m = pattern.match(name)
            try:
                if m and os.stat(os.path.join(d, name)).st_uid == uid:
                    groups.setdefault(m.group(1), []).append(os.path.join(d, name))
            except FileNotFoundError:
                continue
    return groups


def _held(dirs: tuple[str, ...]) -> set[str]:
    """Paths in ``dirs`` that some process maps or has open (processes we may not inspect are skipped: they
    belong to other users, who cannot open this user's 0600 segments)."""
    held = set()
    prefixes = tuple(os.path.join(d, "") for d in dirs)
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/maps") as f:
                targets = [line[line.find("/"):].rstrip("\n") for line in f if "/" in line]
            targets += [_readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            # "NAME (deleted)" is an unlinked segment that once had the name, not the one there now
            held.update(t for t in targets if t.startswith(prefixes) and not t.endswith(" (deleted)"))
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue   # the process ended, or is not ours to read
    return held


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:   # closed since it was listed (the listing's own descriptor, for one)
        return ""

"""Streaming's shared memory left behind by readers that were killed.

A ``StreamingDataset`` keeps its coordination state in POSIX shared memory (``/dev/shm/NNNNNN_locals``,
``..._barrier``, ...). A process killed with ``kill -9`` never unlinks it, so every such kill leaks a
group of segments for good. streaming's own ``clean_stale_shared_memory()`` unlinks *every* group, a live
job's included; here a group is removed only when no process holds any of its segments (mapped, or open),
so two trainings on one machine stay safe.
"""

from __future__ import annotations

import os
import re

SHM_DIR = "/dev/shm"
# streaming/base/util.py SHM_TO_CLEAN, named f"{prefix:06}_{name}" by streaming/base/shared/prefix.py
_SEGMENT = re.compile(r"^(\d{6})_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume|"
                      r"epoch_shape|epoch_data)$")


def clean_stale_shm(root: str = SHM_DIR) -> list[str]:
    """Unlink this user's streaming segment groups that no live process holds; return their names."""
    if not os.path.isdir(root) or not os.path.isdir("/proc"):
        return []   # not Linux: nothing to look at, nothing removed
    groups: dict[str, list[str]] = {}
    uid = os.getuid()
    for name in os.listdir(root):
        m = _SEGMENT.match(name)
        try:
            if m and os.stat(os.path.join(root, name)).st_uid == uid:
                groups.setdefault(m.group(1), []).append(name)
        except FileNotFoundError:
            continue
    if not groups:
        return []
    held = _held(root)   # read after listing: a group created meanwhile is not in `groups` at all
    removed = []
    for names in groups.values():
        if any(n in held for n in names):
            continue
        for n in names:
            try:
                os.unlink(os.path.join(root, n))
                removed.append(n)
            except FileNotFoundError:
                pass
    return sorted(removed)


def _held(root: str) -> set[str]:
    """Names under ``root`` that some process maps or has open (processes we may not inspect are skipped:
    they belong to other users, who cannot open this user's 0600 segments)."""
    held = set()
    prefix = root.rstrip("/") + "/"
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    at = line.find(prefix)
                    if at >= 0:
                        held.add(line[at + len(prefix):].split()[0])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(prefix):
                    held.add(target[len(prefix):].split()[0])
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue   # the process ended, or is not ours to read
    return held

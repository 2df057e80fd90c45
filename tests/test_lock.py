"""One writer at a time in a build directory (a flock on OUT/.sptok/lock, taken over from a killed writer), readers
told that a build is in progress, and --overwrite that swaps a complete build in whole or not at all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TOKENIZER, build_bytes, demo_corpus, tmpfs

from sptok.build import run_build
from sptok.errors import SptokError

ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sptok", *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=300)


def slow_build(out: Path, *extra) -> subprocess.Popen:
    """The whole demo corpus through the reference encoder: seconds of work in which to catch the writer."""
    return subprocess.Popen([sys.executable, "-m", "sptok", "build", ROOT / "pipelines" / "demo.yaml", "--out", out,
                             "--workers", "1", "--encoder", "hf", "--seq-len", "256", "--unit-size", "64KB", "--quiet",
                             *extra], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def holding(proc: subprocess.Popen, d: Path) -> dict:
    """Wait until ``proc`` holds the writer lock of ``d``; what the lock file says."""
    lock = d / ".sptok" / "lock"
    for _ in range(3000):
        try:
            who = json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            who = {}
        if who.get("pid") == proc.pid:
            return who
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"{proc.pid} never took the lock of {d}")


def test_a_second_writer_is_refused_and_readers_are_told(tmp_path):
    out = tmp_path / "o"
    a = slow_build(out)
    who = holding(a, out)
    a.send_signal(signal.SIGSTOP)   # mid-build, the lock held
    try:
        b = cli("build", ROOT / "pipelines" / "demo.yaml", "--out", out, "--workers", "1", "--seq-len", "256")
        assert b.returncode == 2, b.stderr
        assert b.stderr.strip() == (f"error: another sptok build (pid {a.pid} on {socket.gethostname()}, started "
                                    f"{who['started']}) is writing {out}; wait for it to end, or choose another --out")
        for cmd in ("stats", "show", "verify"):
            r = cli(cmd, out)
            assert r.returncode == 2 and "Traceback" not in r.stderr
            assert f"a build is in progress (sptok build (pid {a.pid}" in r.stderr, r.stderr
        r = cli("merge", out, "--out", tmp_path / "m")
        assert r.returncode == 2 and f"{out}: a partition still being built (sptok build (pid {a.pid}" in r.stderr
    finally:
        a.send_signal(signal.SIGCONT)
    assert a.wait(timeout=300) == 0, a.communicate()
    assert not (out / ".sptok").exists()               # nothing of the lock is left in a complete build
    assert cli("verify", out).returncode == 0


def test_a_killed_writers_lock_is_taken_over(tmp_path):
    out = tmp_path / "o"
    a = slow_build(out)
    holding(a, out)
    a.kill()
    a.wait()
    assert (out / ".sptok" / "lock").exists()          # the file stays; the kernel dropped the lock
    r = cli("stats", out)
    assert "run the same `sptok build` command again to resume it" in r.stderr, r.stderr
    b = slow_build(out)
    assert b.wait(timeout=300) == 0, b.communicate()
    assert cli("verify", out).returncode == 0


def _flags(**kw):
    return dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, tail="pad", **kw)


def test_overwrite_waits_for_readers_and_swaps_the_whole_build(tmp_path):
    """A reader of the old build is never swapped under (it would read a mix of two builds); once it is gone, the
    same command puts the new build in place whole, without building it again."""
    pytest.importorskip("streaming")
    from sptok.data import open_dataset

    m, out = str(demo_corpus(tmp_path)), str(tmp_path / "o")
    run_build(m, out, _flags(seq_len=64), log=lambda x: None)
    run_build(m, str(tmp_path / "ref"), _flags(seq_len=32), log=lambda x: None)
    ds = open_dataset(out, batch_size=1, shuffle=False)
    try:
        it = iter(ds)
        before = [len(next(it)["input_ids"]) for _ in range(5)]
        with pytest.raises(SptokError, match=rf"--overwrite: {out} is open for reading \(pid {os.getpid()}\), so it "
                                             "was not replaced"):
            run_build(m, out, _flags(seq_len=32), overwrite=True, log=lambda x: None)
        rest = [len(s["input_ids"]) for s in it]
    finally:
        ds.close()
    assert set(before + rest) == {64}                   # the reader saw the old build only, to its end
    assert json.loads(Path(out, "sptok.json").read_text())["options"]["seq_len"] == 64
    beside = tmp_path / ".o.sptok-overwrite"
    assert (beside / "sptok.json").exists()            # the new build waits, complete, beside
    logs = []
    res = run_build(m, out, _flags(seq_len=32), overwrite=True, log=logs.append)
    assert res.out == out and res.info["options"]["seq_len"] == 32
    assert not beside.exists() and not Path(out, ".sptok").exists()
    assert build_bytes(out) == build_bytes(str(tmp_path / "ref"))


def test_a_killed_overwrite_leaves_the_old_build_whole(tmp_path):
    out = tmp_path / "o"
    assert cli("build", ROOT / "pipelines" / "demo.yaml", "--out", out, "--workers", "1", "--seq-len", "128",
               "--quiet").returncode == 0
    old = build_bytes(str(out))
    a = slow_build(out, "--overwrite")
    holding(a, tmp_path / ".o.sptok-overwrite")        # building beside
    units = tmp_path / ".o.sptok-overwrite" / ".sptok" / "units"
    # killed once a unit is committed beside (something to resume), at once: the whole build takes under a second
    for _ in range(1000):
        if any(units.glob("*/result.json")):
            break
        time.sleep(0.005)
    a.kill()
    a.wait()
    left = build_bytes(str(out))
    assert json.loads(left.pop(".sptok/lock"))["pid"] == a.pid   # a killed writer's lock file, taken over later
    assert left == old and cli("verify", out).returncode == 0
    b = slow_build(out, "--overwrite")                  # resumes beside, then swaps
    assert b.wait(timeout=300) == 0, b.communicate()
    assert json.loads((out / "sptok.json").read_text())["options"]["seq_len"] == 256
    assert not (tmp_path / ".o.sptok-overwrite").exists() and not (out / ".sptok").exists()
    assert cli("verify", out).returncode == 0


def _leave_work(out: Path) -> None:
    """What a build killed after writing its sptok.json, while it cleared its work directory, leaves there."""
    unit = out / ".sptok" / "units" / "u00003"
    unit.mkdir(parents=True)
    (unit / "shard.00000.mds").write_bytes(b"half")


def test_what_a_build_killed_after_its_sptok_json_left_is_cleared_by_the_next(tmp_path):
    """The build is complete (sptok.json is written last), but its .sptok was not yet cleared: the same command
    clears it, and so does an --overwrite that finds its replacement complete beside (which CI once swapped in
    with the leftovers: a writer killed 0.5 s after taking the lock had got that far)."""
    m, out = str(demo_corpus(tmp_path)), tmp_path / "o"
    run_build(m, str(out), _flags(seq_len=64), log=lambda x: None)
    ref = build_bytes(str(out))
    _leave_work(out)
    assert run_build(m, str(out), _flags(seq_len=64), log=lambda x: None).skipped
    assert not (out / ".sptok").exists() and build_bytes(str(out)) == ref
    beside = tmp_path / ".o.sptok-overwrite"
    run_build(m, str(beside), _flags(seq_len=32), log=lambda x: None)
    new = build_bytes(str(beside))
    _leave_work(beside)
    run_build(m, str(out), _flags(seq_len=32), overwrite=True, log=lambda x: None)
    assert not beside.exists() and not (out / ".sptok").exists() and build_bytes(str(out)) == new


@pytest.fixture
def mount(tmp_path):
    """A tmpfs of its own: skipped where mounting is not allowed."""
    with tmpfs(tmp_path / "mnt", "64m") as mnt:
        yield mnt


def test_overwrite_of_a_mount_point_replaces_in_place(tmp_path, mount):
    """No directory beside a mount point shares its filesystem, so there the build is replaced in place."""
    m = str(demo_corpus(tmp_path))
    run_build(m, str(mount), _flags(seq_len=64), log=lambda x: None)
    logs = []
    info = run_build(m, str(mount), _flags(seq_len=32), overwrite=True, log=logs.append).info
    assert info["options"]["seq_len"] == 32 and any("is a mount point" in x for x in logs)
    run_build(m, str(tmp_path / "ref"), _flags(seq_len=32), log=lambda x: None)
    assert build_bytes(str(mount)) == build_bytes(str(tmp_path / "ref"))


def test_the_same_build_on_a_read_only_copy_is_still_a_no_op(tmp_path, mount):
    """Finding its build complete, a build writes nothing, not even its lock."""
    m = str(demo_corpus(tmp_path))
    out = mount / "o"
    run_build(m, str(out), _flags(seq_len=64), log=lambda x: None)
    assert subprocess.run(["mount", "-o", "remount,ro", str(mount)]).returncode == 0
    assert run_build(m, str(out), _flags(seq_len=64), log=lambda x: None).skipped

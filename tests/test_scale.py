"""Corpus-scale guarantees with real processes: the same bytes for any worker count, after SIGKILL + resume,
after Ctrl-C + resume, and for partitions joined by `sptok merge`; resumes refuse changed inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import SOURCES, TOKENIZER, build_bytes, demo_records, without_modules, write_jsonl

from sptok.build.encoders import version
from sptok.errors import SptokError

pytestmark = pytest.mark.slow
FLAGS = ["--seq-len", "256", "--msp-prob", "0.3", "--insert-prob", "0.8", "--unit-size", "96KB"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The demo corpus as plain JSONL (so byte-range units split it: ~30 units) and its manifest."""
    d = tmp_path_factory.mktemp("corpus")
    for name in SOURCES:
        write_jsonl(d / f"{name}.jsonl", demo_records(name))
    m = d / "m.yaml"
    m.write_text("sources:\n" + "".join(f"  - {{name: {n}, paths: {n}.jsonl, id_field: id}}\n" for n in SOURCES))
    return m


def sptok(*args, env=None, check=True, **kw):
    r = subprocess.run([sys.executable, "-m", "sptok", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, **kw)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def build_cmd(m, out, *extra):
    return ["build", m, "--out", out, "--tokenizer", TOKENIZER, *FLAGS, *extra]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    sptok(*build_cmd(corpus, out, "--workers", "1", "--quiet"))
    return build_bytes(out)


def test_reference_has_many_units(reference):
    info = json.loads(reference["sptok.json"])
    assert info["units"] >= 20


@pytest.mark.parametrize("workers", [2, 4])
def test_same_bytes_for_any_worker_count(corpus, reference, tmp_path, workers):
    sptok(*build_cmd(corpus, tmp_path / "o", "--workers", workers, "--quiet"))
    assert build_bytes(tmp_path / "o") == reference


def _wait_for_progress(out, k: int, p) -> None:
    """Block until the build is mid-way: its plan written (k = 0, before the first unit) or k units committed.
    Fails if the build ended first: the interruption must land in the middle of a build."""
    work = out / ".sptok"

    def reached() -> bool:
        if k == 0:
            return (work / "plan.json").exists()
        return (work / "units").is_dir() and len(os.listdir(work / "units")) >= k

    end = time.time() + 300
    while not reached():
        assert p.poll() is None, f"the build ended before {k} units were committed: {p.stderr.read()}"
        assert time.time() < end, f"the build committed no {k} units in 300 s"
        time.sleep(0.005)
    assert p.poll() is None, "the build ended before it could be interrupted"


def _workers(p) -> list[int]:
    """The worker processes of a running build (spawned children of its main process)."""
    children = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
    return [int(c) for c in children if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]


def _wait_gone(pids: list[int], timeout: float = 60) -> None:
    """Until every process in ``pids`` has exited (a zombie no init reaps counts as exited)."""
    def gone(pid):
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True

    end = time.time() + timeout
    while not all(gone(pid) for pid in pids):
        assert time.time() < end, f"processes {pids} outlived the build they worked for"
        time.sleep(0.01)


@pytest.mark.parametrize("after_units", [0, 3, 12, 25])
def test_sigkill_then_resume_is_byte_identical(corpus, reference, tmp_path, after_units):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "sptok", *map(str, build_cmd(corpus, out, "--workers", "2", "--encoder", "hf"))]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_progress(out, after_units, p)
    workers = _workers(p)
    assert len(workers) == 2
    p.send_signal(signal.SIGKILL)     # the main process only: workers must die with it
    p.wait()
    _wait_gone(workers)
    # nothing that looks complete: no index a reader would take for a finished dataset
    assert not (out / "sptok.json").exists() and not (out / "index.json").exists()
    assert not any((out / s / "index.json").exists() for s in SOURCES)
    r = sptok(*build_cmd(corpus, out, "--workers", "2"))
    assert "Traceback" not in r.stderr
    assert build_bytes(out) == reference
    info = json.loads((out / "sptok.json").read_text())   # units of the killed run (hf) and of the resume
    assert sum(info["encoder"].values()) == info["units"] and set(info["encoder"]) <= {
        f"hf {version('tokenizers')}", f"gigatoken {version('gigatoken')}"}


def test_sigkill_then_resume_with_metadata_is_byte_identical(corpus, tmp_path):
    """Metadata (a keyed draw, a per-unit token cache) changes nothing of the above: killed after some units
    and resumed with another encoder, the bytes are those of one uninterrupted worker."""
    meta = ["--metadata", "url:url", "--metadata-prob", "0.7", "--metadata-template", "URL: {}\\n"]
    sptok(*build_cmd(corpus, tmp_path / "ref", "--workers", "1", "--quiet", *meta))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "sptok", *map(str, build_cmd(corpus, out, "--workers", "2", "--encoder", "hf",
                                                              *meta))]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_progress(out, 5, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    sptok(*build_cmd(corpus, out, "--workers", "2", *meta))
    want = build_bytes(tmp_path / "ref")
    assert build_bytes(out) == want
    assert json.loads(want["sptok.json"])["options"]["metadata"]["code"]["template"] == "URL: {}\n"


def test_ctrl_c_stops_cleanly_and_resumes(corpus, reference, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "sptok", *map(str, build_cmd(corpus, out, "--workers", "2", "--encoder", "hf"))]
    # SIGINT as a terminal gives it, even when this session runs in the background (where the shell
    # ignores SIGINT, and Python then installs no KeyboardInterrupt handler)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_progress(out, 2, p)
    os.killpg(p.pid, signal.SIGINT)   # what a terminal's Ctrl-C does: the whole process group
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert not (out / "sptok.json").exists()
    r = sptok(*build_cmd(corpus, out, "--workers", "2"))
    assert "resuming:" in r.stderr
    assert build_bytes(out) == reference


def test_partitions_merge_to_the_same_bytes(corpus, reference, tmp_path):
    parts = [tmp_path / f"p{i}" for i in range(3)]
    sptok(*build_cmd(corpus, parts[0], "--partition", "0/3", "--workers", "1"))
    sptok(*build_cmd(corpus, parts[1]), env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"})
    sptok(*build_cmd(corpus, parts[2]), env={"RANK": "2", "WORLD_SIZE": "3"})
    committed = [len(os.listdir(p / ".sptok" / "units")) for p in parts]
    assert sum(committed) == json.loads(reference["sptok.json"])["units"] and min(committed) > 0
    r = sptok("merge", parts[0], parts[1], "--out", tmp_path / "m", check=False)
    assert r.returncode == 2 and "units are committed in none" in r.stderr
    r = sptok("show", parts[1], check=False)      # a partition is not a build to read, nor to resume
    assert r.returncode == 2 and "partition 1/3 of a build, not a whole build" in r.stderr
    assert "sptok merge" in r.stderr and "resume" not in r.stderr
    r = sptok("merge", *parts, "--out", tmp_path / "m", "-q")
    assert r.stdout == "" and r.stderr == ""
    assert build_bytes(tmp_path / "m") == reference
    r = sptok("merge", *parts, "--out", tmp_path / "m", "-q")    # the same merge again: a no-op, as for build
    assert r.stderr.startswith(f"{tmp_path / 'm'} already holds this exact build (fingerprint ")
    assert "nothing to do" in r.stderr and build_bytes(tmp_path / "m") == reference
    r = sptok("merge", *parts, "--out", tmp_path / "m", "-q", "--overwrite")
    assert r.stderr == "" and build_bytes(tmp_path / "m") == reference and not (tmp_path / ".m.sptok-overwrite").exists()
    shutil.copytree(parts[0], tmp_path / "m" / "p0")   # a partition kept inside the build it went into
    r = sptok("merge", tmp_path / "m" / "p0", *parts[1:], "--out", tmp_path / "m", "--overwrite", check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"error: --out {tmp_path / 'm'} holds the partition {tmp_path / 'm' / 'p0'}: merge into " \
                       f"another directory (or into a partition itself)\n"
    assert (tmp_path / "m" / "p0" / ".sptok" / "units").is_dir() and (tmp_path / "m" / "sptok.json").exists()


def test_resume_refuses_changed_inputs_and_options(corpus, tmp_path):
    from sptok.build import run_build

    d = tmp_path / "c"
    shutil.copytree(corpus.parent, d)
    out = str(tmp_path / "o")
    flags = dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, unit_size="96KB")
    run_build(str(d / "m.yaml"), out, flags, partition=(0, 2), log=lambda m: None)   # half the units: "interrupted"
    with pytest.raises(SptokError, match="cannot resume: option seq_len: 2048 -> 512"):
        run_build(str(d / "m.yaml"), out, dict(flags, seq_len=512), log=lambda m: None)
    with open(d / "code.jsonl", "a") as f:
        f.write(json.dumps({"id": "new", "text": "x"}) + "\n")
    with pytest.raises(SptokError, match="cannot resume: .*input files changed: code.jsonl"):
        run_build(str(d / "m.yaml"), out, flags, log=lambda m: None)
    info = run_build(str(d / "m.yaml"), out, flags, overwrite=True, log=lambda m: None).info
    assert info["counts"]["code"]["docs"] == len(demo_records("code")) + 1


def test_progress_lines_and_quiet(corpus, tmp_path):
    r = sptok(*build_cmd(corpus, tmp_path / "a", "--workers", "2"))
    assert "encoder: gigatoken (identical ids to the Hugging Face tokenizer on a sample" in r.stderr
    assert "tokens/s, encoder: gigatoken " in r.stderr
    assert f"units {json.load(open(tmp_path / 'a' / 'sptok.json'))['units']}/" in r.stderr and "tok/s" in r.stderr
    r = sptok(*build_cmd(corpus, tmp_path / "b", "--workers", "2", "--quiet"))
    assert r.stderr == ""


def test_remote_output_goes_through_streaming_uploader(corpus, reference, tmp_path):
    """A local path stands in for the bucket: streaming's LocalUploader runs the same upload code path."""
    from sptok.build.remote import upload_build

    local = tmp_path / "local"
    sptok(*build_cmd(corpus, local, "--quiet"))
    n = upload_build(str(local), str(tmp_path / "bucket"), log=lambda m: None)
    assert n == len(reference)
    assert build_bytes(tmp_path / "bucket") == reference


def test_a_remote_out_that_cannot_be_reached_is_refused_before_building(corpus, tmp_path):
    """No credentials, or an endpoint that refuses: one line and exit 2 before anything is built (there is no
    network here, so nothing may wait on one)."""
    pytest.importorskip("boto3")
    bare = {k: "" for k in os.environ if k.startswith("AWS_")}
    env = {**bare, "HOME": str(tmp_path), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    for extra, says in (({}, "no AWS credentials found"),
                        ({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1",
                          "S3_ENDPOINT_URL": "http://127.0.0.1:9"}, "streaming cannot upload there (")):
        t = time.time()
        r = sptok(*build_cmd(corpus, "s3://bucket/x", "--local", tmp_path / "l", "--quiet"), env={**env, **extra},
                  check=False, timeout=300)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"error: --out s3://bucket/x: {says}") and len(r.stderr.splitlines()) == 1, r.stderr
        assert "nothing was built" in r.stderr and not (tmp_path / "l").exists()
        assert time.time() - t < 120


def test_a_worker_killed_mid_build_is_a_clear_error(corpus, reference, tmp_path):
    """SIGKILL of one worker (as the OOM killer would): one readable error, then a resume completes."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "sptok", *map(str, build_cmd(corpus, out, "--workers", "2", "--encoder", "hf"))]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_progress(out, 2, p)
    workers = _workers(p)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "Traceback" not in err and "a worker process died" in err, err
    sptok(*build_cmd(corpus, out, "--workers", "2"))
    assert build_bytes(out) == reference


def test_builds_without_the_optional_fast_encoders(corpus, reference, tmp_path):
    """`pip install sptok` without the [fast] extra: gigatoken and riptoken cannot be imported, in the main
    process or in the workers; the build runs on tiktoken (a core dependency), says so, and gives the same bytes."""
    env = without_modules(tmp_path, "gigatoken", "riptoken")
    r = sptok(*build_cmd(corpus, tmp_path / "o", "--workers", "2"), env=env)
    assert "encoder: tiktoken (identical ids" in r.stderr
    assert build_bytes(tmp_path / "o") == reference
    info = json.loads((tmp_path / "o" / "sptok.json").read_text())
    assert info["encoder"] == {f"tiktoken {version('tiktoken')}": info["units"]}
    r = sptok(*build_cmd(corpus, tmp_path / "p", "--encoder", "gigatoken"), env=env, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--encoder gigatoken: no fast encoder runs this tokenizer exactly (gigatoken: gigatoken is not installed " \
           "(pip install 'sptok[fast]'))" in r.stderr

"""`sptok build --executor ray` on a real local Ray cluster: the bytes of a `--workers 2` build, also after a Ray
worker or the driver is killed mid-build or a fast encoder is caught giving other ids, and a task's error as
sptok's one line.

Ray must only ever talk over loopback, and none of its processes may outlive the test: the cluster runs inside a
network + PID namespace of its own (tests/ray_cluster.py, as root: CI is root), which ends every Ray process with
it. One namespace, one cluster, every scenario; the asserts are here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SOURCES, TOKENIZER, build_bytes, demo_records, without_modules, write_jsonl
from test_encoders import _mismatch_corpus, unreachable_token_bpe

pytestmark = pytest.mark.slow
pytest.importorskip("ray")
FLAGS = ["--seq-len", "256", "--msp-prob", "0.3", "--insert-prob", "0.8", "--unit-size", "96KB"]


def _namespace_problem() -> str | None:
    """Why a network + PID namespace cannot be made here, or None."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare and ip (util-linux, iproute2)"
    r = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "ip", "link", "set", "lo", "up"],
                       capture_output=True, text=True)
    return f"cannot make a network + PID namespace here: {r.stderr.strip()}" if r.returncode else None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The demo corpus as plain JSONL (~30 byte-range units), and one source whose second unit holds a bad record."""
    d = tmp_path_factory.mktemp("corpus")
    for name in SOURCES:
        write_jsonl(d / f"{name}.jsonl", demo_records(name))
    (d / "m.yaml").write_text("sources:\n" + "".join(
        f"  - {{name: {n}, paths: {n}.jsonl, id_field: id}}\n" for n in SOURCES))
    good = (d / "code.jsonl").read_bytes()
    (d / "bad.jsonl").write_bytes(good + b'{"id": "broken", "text": \n' + good)
    (d / "bad.yaml").write_text("sources:\n  - {name: code, paths: bad.jsonl, id_field: id}\n")
    return d


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    subprocess.run([sys.executable, "-m", "sptok", "build", corpus / "m.yaml", "--out", out, "--tokenizer",
                    TOKENIZER, *FLAGS, "--workers", "2", "--quiet"], check=True, capture_output=True)
    return build_bytes(out)


@pytest.fixture(scope="module")
def mismatch(tmp_path_factory):
    """A corpus on which riptoken and tiktoken are caught giving other ids mid-build (gigatoken is hidden), and the
    Hugging Face tokenizer's build of it: what the fallback must give."""
    d = tmp_path_factory.mktemp("mismatch")
    m = _mismatch_corpus(d)
    unreachable_token_bpe(d).save(str(d / "tok.json"))
    flags = ["--seq-len", "128", "--unit-size", "24KB"]
    subprocess.run([sys.executable, "-m", "sptok", "build", m, "--out", d / "hf", "--tokenizer", d / "tok.json",
                    *flags, "--encoder", "hf", "--workers", "2", "--quiet"], check=True, capture_output=True)
    return {"manifest": str(m), "tokenizer": str(d / "tok.json"), "flags": flags, "hf": build_bytes(d / "hf"),
            "env": without_modules(d, "gigatoken")}


@pytest.fixture(scope="module")
def runs(corpus, mismatch, tmp_path_factory):
    """Every scenario of tests/ray_cluster.py, run once in its own namespace: (its directory, its results)."""
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)
    d = tmp_path_factory.mktemp("ray")
    cfg = d / "config.json"
    cfg.write_text(json.dumps({"dir": str(d), "manifest": str(corpus / "m.yaml"), "tokenizer": str(TOKENIZER),
                               "bad_manifest": str(corpus / "bad.yaml"), "flags": FLAGS,
                               "mismatch": {k: v for k, v in mismatch.items() if k != "hf"}}))
    script = f"ip link set lo up && exec {sys.executable} {ROOT / 'tests' / 'ray_cluster.py'} {cfg}"
    r = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c", script],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, json.loads((d / "results.json").read_text())


def _processes_naming(text: str) -> list[str]:
    """The command lines of this machine's processes that contain ``text``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(cmd)
    return found


def test_no_ray_process_outlives_its_namespace(runs):
    """Ray's processes name their session directory (under RAY_TMPDIR): none may be left once the namespace ended."""
    assert (runs[0] / "ray").is_dir()
    assert _processes_naming(str(runs[0] / "ray")) == []


def _built(run: dict) -> None:
    assert run["rc"] == 0 and "Traceback" not in run["stderr"], run["stderr"][-3000:]


def test_the_cluster_has_two_nodes_on_loopback(runs):
    assert runs[1]["nodes"] == ["127.0.0.1", "127.0.0.1"]


def test_a_local_ray_falls_back_to_the_reference_encoder(runs, mismatch):
    """No address: a local Ray (the driver builds units itself while it starts); a fast encoder caught mid-build
    stops its tasks, and the units it built are built again by the Hugging Face tokenizer, to its bytes exactly.
    Then no process of that Ray is left."""
    run = runs[1]["local"]
    _built(run)
    assert runs[1]["left_by_local"] == []   # the Ray it started is stopped, killed, whole
    assert re.search(r"encoder: hf \(the (riptoken|tiktoken) encoder gave other ids", run["stderr"]), run["stderr"]
    assert build_bytes(runs[0] / "local") == mismatch["hf"]


def test_a_build_on_a_two_node_cluster_is_the_local_build(runs, reference):
    run = runs[1]["cluster"]
    _built(run)
    assert "encoder: " in run["stderr"] and re.search(r"^units (\d+)/\1 ", run["stderr"], re.M)   # progress
    assert "built " in run["stderr"].splitlines()[-1]                     # the summary line
    assert build_bytes(runs[0] / "cluster") == reference


def test_a_killed_worker_s_unit_is_retried_to_the_same_bytes(runs, reference):
    run = runs[1]["worker_killed"]
    assert run["killed_mid_unit"], "the worker finished its unit before the kill: nothing was retried"
    _built(run)
    assert build_bytes(runs[0] / "worker_killed") == reference


def test_a_killed_driver_resumes_from_the_committed_units(runs, reference):
    run = runs[1]["driver_killed"]
    assert run["lock_holder"] == run["driver"]   # the build's lock is the driver's, as a local build's is
    assert not run["killed_complete"]
    _built(run)
    assert "resuming: " in run["stderr"]
    assert build_bytes(runs[0] / "driver_killed") == reference


def test_an_error_in_a_task_is_sptok_s_one_line(runs, corpus, tmp_path):
    """The SptokError a task raised ends the build as it would a local one: the same line, exit code 2."""
    run = runs[1]["task_error"]
    assert run["rc"] == 2, run["stderr"]
    assert "Traceback" not in run["stderr"] and "RayTaskError" not in run["stderr"]
    local = subprocess.run([sys.executable, "-m", "sptok", "build", corpus / "bad.yaml", "--out", tmp_path / "o",
                            "--tokenizer", TOKENIZER, *FLAGS, "--strict", "--workers", "2", "--quiet"],
                           capture_output=True, text=True)
    assert local.returncode == 2
    line = local.stderr.strip()
    assert line.startswith("error: bad.jsonl line ") and "\n" not in line
    assert run["stderr"].strip().splitlines()[-1] == line


def test_a_remote_output_is_uploaded_by_the_tasks(runs, reference):
    """--out s3://...: each task uploads its unit's shards from its node, the driver the rest (sptok.json last),
    also when a worker is killed building a unit. The bucket holds the local build's bytes, and the driver's
    --local never held the units' shards, nor do the nodes once it is done (their work directories are removed)."""
    run = runs[1]["remote"]
    assert run["killed_mid_unit"], "the worker finished its unit before the kill: nothing was retried"
    _built(run)
    uploaded = build_bytes(runs[0] / "remote_download")
    assert uploaded == reference
    by_tasks = set(uploaded) - set(run["local_files"])
    assert by_tasks and all(re.search(r"/shard\.\d+\.mds\.zstd$", f) for f in by_tasks), by_tasks
    assert set(run["local_files"]) < set(uploaded)   # what the driver wrote, all uploaded
    assert run["left_on_nodes"] == []


def test_units_a_ray_task_uploaded_are_finished_only_there(corpus, tmp_path):
    """A unit a Ray task uploaded to a remote --out holds no shards: a build that does not upload there (another
    --out, the local executor) cannot finish it, and says so in one line instead of building a hole."""
    build = [sys.executable, "-m", "sptok", "build", corpus / "m.yaml", "--out", tmp_path / "o", "--tokenizer",
             TOKENIZER, *FLAGS, "--workers", "1", "--quiet"]
    subprocess.run(build + ["--partition", "0/2"], check=True, capture_output=True)
    (tmp_path / "o" / ".sptok" / "units" / "u000000" / "uploaded").write_text("s3://bucket/built")
    r = subprocess.run(build, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == ("error: the units of this build were uploaded by Ray tasks to "
                                              "s3://bucket/built: finish it with the same command (--out "
                                              "s3://bucket/built --executor ray)\n"), r.stderr


def test_a_cluster_that_does_not_answer_is_one_line(corpus, tmp_path):
    """Nothing listens at the address: one line at once (Ray itself retries for minutes); no Ray is started."""
    r = subprocess.run([sys.executable, "-m", "sptok", "build", corpus / "m.yaml", "--out", tmp_path / "o",
                        "--tokenizer", TOKENIZER, "--executor", "ray", "--ray-address", "127.0.0.1:9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --executor ray: no Ray cluster answers at 127.0.0.1:9 ")
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "o").exists()

"""Checkpoints that cannot train on garbage or run code: every file hashed in meta.json and checked before torch
opens any, a fall back to the newest intact step, per-rank state as JSON; a full disk and a non-finite step end in
one line; a changed model is refused; SIGTERM under torchrun saves a checkpoint that resumes exactly."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, demo_corpus, tmpfs
from test_train import _cfg, _torchrun

from sptok.errors import SptokError
from sptok.train.config import load_config
from sptok.train.export import export
from sptok.train.loop import pretrain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt-corpus")
    demo_corpus(d)
    return d


def _run(doc, overrides=()):
    """Train; return (records, the lines the run said)."""
    said = []
    recs = pretrain(load_config(None, list(overrides), base=doc), log=said.append)
    return recs, said


def _ckpt_doc(corpus, tmp_path, steps=4, every=2):
    doc = _cfg(corpus, tmp_path, steps=steps)
    doc["checkpoint"]["every"] = every
    return doc


def _flip(path, n=64):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _sptok(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sptok", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_flipped_bytes_are_refused_and_resume_falls_back_to_the_last_intact_step(corpus, tmp_path):
    """64 flipped bytes in step 4's shard: resuming reports it by name and continues from step 2, with the
    losses of a run that never stopped; export refuses it and names step 2. The per-rank files are JSON."""
    straight, _ = _run(_ckpt_doc(corpus, tmp_path / "straight", steps=6))
    doc = _ckpt_doc(corpus, tmp_path / "broken", steps=6)
    _run(doc, ["train.stop_at=4"])
    ckpt = tmp_path / "broken" / "ckpt"
    meta = json.loads((ckpt / "step-00000004" / "meta.json").read_text())
    assert set(meta["files"]) == {".metadata", "__0_0.distcp", "extra-rank0.json"}
    json.loads((ckpt / "step-00000004" / "extra-rank0.json").read_text())   # sptok's own state: no pickle
    _flip(ckpt / "step-00000004" / "__0_0.distcp")

    with pytest.raises(SptokError) as e:
        export(str(ckpt), str(tmp_path / "hf"))
    assert e.value.message.startswith(f"checkpoint {ckpt / 'step-00000004'} is damaged: __0_0.distcp has xxh64 ")
    assert e.value.message.endswith(f"the newest intact one is {ckpt / 'step-00000002'}: export it by name")

    resumed, said = _run(doc)
    assert any(f"checkpoint {ckpt / 'step-00000004'} is damaged (__0_0.distcp has xxh64" in s for s in said), said
    assert f"resumed from {ckpt / 'step-00000002'} at step 2" in said
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    for a, b in zip(straight[2:], resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * max(1.0, abs(a["loss"])), (a["step"], a["loss"], b["loss"])


class _Evil:
    """A pickle that creates a file when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_metadata_pickle_is_refused_before_it_runs(corpus, tmp_path):
    """A `.metadata` replaced by a pickle that creates a file: export and resume refuse the checkpoint by
    name, and the file is never created (torch's pickle.load never sees it)."""
    doc = _ckpt_doc(corpus, tmp_path, steps=2)
    _run(doc)
    step = tmp_path / "ckpt" / "step-00000002"
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(SptokError, match=rf"^checkpoint {step} is damaged: \.metadata has \d+ bytes, meta.json "):
        export(str(step), str(tmp_path / "hf"))
    with pytest.raises(SptokError, match=r"no intact checkpoint in .*ckpt \(step-00000002: \.metadata has "):
        _run(doc, ["train.steps=4"])
    assert not marker.exists()
    pickle.loads((step / ".metadata").read_bytes())   # the pickle is real: loading it does create the file
    assert marker.exists()


def test_a_changed_model_shape_is_refused_naming_the_keys(corpus, tmp_path):
    doc = _ckpt_doc(corpus, tmp_path, steps=2)
    _run(doc)
    with pytest.raises(SptokError, match=r"cannot resume .*step-00000002: it holds another model "
                                         r"\(model.hidden_size: 32 -> 64, model.intermediate_size: 64 -> 128\)"):
        _run(doc, ["train.steps=4", "model.hidden_size=64", "model.intermediate_size=128"])
    recs, said = _run(doc, ["train.steps=3", "model.dropout=0.1"])   # no change to what is stored: resumes
    assert [r["step"] for r in recs] == [3] and any("resumed from" in s for s in said)


def test_the_checkpoints_of_two_runs_never_mix(corpus, tmp_path):
    """checkpoint.resume: false into a directory holding another run's checkpoints wrote its steps among them
    (export and resume then took the newest of either); and the copy of the build beside the checkpoints stayed
    the first run's after its steps were removed, so an export paired the new weights with the old build."""
    import shutil

    _run(_ckpt_doc(corpus, tmp_path, steps=3, every=3))
    other = _cfg(corpus, tmp_path / "other", steps=2, build="b64-other")
    other["checkpoint"]["dir"] = str(tmp_path / "ckpt")
    other["data"]["build_args"]["msp_prob"] = 0.1   # another build
    other["checkpoint"]["resume"] = False
    with pytest.raises(SptokError, match=r"^checkpoint.dir: .* holds 1 checkpoint\(s\) of an earlier run \(the "
                                         r"newest: step-00000003\)"):
        _run(other)
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["build", "step-00000003"]
    shutil.rmtree(ckpt / "step-00000003")
    _run(other)
    meta = json.loads((ckpt / "step-00000002" / "meta.json").read_text())
    assert json.loads((ckpt / "build" / "sptok.json").read_text())["fingerprint"] == meta["fingerprint"]
    mixed = tmp_path / "mixed"   # such a directory, made before either was refused: export refuses it
    shutil.copytree(ckpt / "step-00000002", mixed / "step-00000002")
    shutil.copytree(corpus / "b64" / "tokenizer", mixed / "build" / "tokenizer")
    for name in ("stats.json", "sptok.json"):
        shutil.copyfile(corpus / "b64" / name, mixed / "build" / name)
    with pytest.raises(SptokError, match=rf"^checkpoint {mixed / 'step-00000002'} trained on build "
                                         rf"{meta['fingerprint'][:12]}, but the copy of the build beside it"):
        export(str(mixed), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    init = _cfg(corpus, tmp_path / "init", steps=1)
    init["train"]["init_from"] = str(mixed)
    with pytest.raises(SptokError, match=r"^train.init_from: checkpoint .* trained on build .*, but the copy"):
        _run(init)


def test_a_nonfinite_step_stops_before_a_checkpoint_is_written(corpus, tmp_path):
    """lr 1000 without clipping: the gradient norm is inf/NaN at step 3. The run stops there with one line;
    step 2 is the last checkpoint, and no checkpoint holds a NaN."""
    doc = _ckpt_doc(corpus, tmp_path, steps=8)
    doc["optim"].update(lr=1000.0, warmup_steps=0, grad_clip=0.0)
    with pytest.raises(SptokError, match=r"non-finite loss or gradient norm at step 3: stopped without writing a "
                                         r"checkpoint \(the last checkpoint is .*step-00000002\)"):
        _run(doc)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-00000002"]


def test_on_nonfinite_skip_skips_the_update(corpus, tmp_path):
    doc = _ckpt_doc(corpus, tmp_path, steps=6, every=0)
    doc["optim"].update(lr=1000.0, warmup_steps=0, grad_clip=0.0)
    doc["train"]["on_nonfinite"] = "skip"
    recs, said = _run(doc)
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert "step 3: non-finite gradient norm; update skipped (train.on_nonfinite: skip)" in said
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "ckpt" / "step-00000006", tmp_path / "w.pt")
    weights = torch.load(tmp_path / "w.pt")["model"]
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


def test_disk_full_while_saving_is_one_line(corpus, tmp_path):
    """A real 8 MB tmpfs: step 2's checkpoint fits, step 4's does not. One line, exit 2; resuming elsewhere
    is not needed: the partial step has no meta.json."""
    with tmpfs(tmp_path / "small", "8m") as mnt:
        doc = _ckpt_doc(corpus, tmp_path, steps=6)
        doc["checkpoint"]["dir"] = str(mnt / "ckpt")
        (tmp_path / "c.json").write_text(json.dumps(doc))
        res = _sptok("pretrain", tmp_path / "c.json")
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert res.stderr.splitlines()[-1] == (f"error: disk full saving step 4 to {mnt / 'ckpt'}; the last "
                                               f"complete checkpoint is step 2")
        assert not (mnt / "ckpt" / "step-00000004" / "meta.json").exists()


def _tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it."""
    from test_data import _children

    found = [pid]
    for p in found:
        found += sorted(_children(p))
    return found


def test_sigterm_under_torchrun_saves_and_the_resumed_run_equals_the_unbroken_one(corpus, tmp_path):
    """2 gloo processes: SIGTERM to every process of the job once a few steps are logged, as Slurm sends it:
    torchrun, which passes it to both trainers, the trainers, and their loader workers, which leave it to them.
    The trainers finish the step, agree on it, save it and exit with a message; resuming logs the same losses
    as a run that was never stopped."""
    build = corpus / "b64"
    if not (build / "sptok.json").exists():
        _run(_cfg(corpus, tmp_path / "warm", steps=1))

    def config(name):
        doc = _cfg(corpus, tmp_path / name, steps=400)   # the schedule of a long run; it is stopped early
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        return path

    metrics = tmp_path / "stopped" / "log" / "metrics.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sptok",
           "pretrain", config("stopped")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        for pid in _tree(proc.pid):
            with contextlib.suppress(ProcessLookupError):   # a loader worker ending with its epoch
                os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    saved = sorted((tmp_path / "stopped" / "ckpt").glob("step-*/meta.json"))
    assert len(saved) == 1, err[-3000:]
    n = int(saved[0].parent.name.removeprefix("step-"))
    assert 3 <= n < 400, err[-3000:]          # stopped by the signal, not at the end of the schedule
    assert f"SIGTERM: stopped after step {n} and saved step {n} to {tmp_path / 'stopped' / 'ckpt'}" in err, err[-3000:]
    meta = json.loads(saved[0].read_text())
    assert {"extra-rank0.json", "extra-rank1.json", ".metadata"} <= set(meta["files"])
    assert meta["num_workers"] >= 1 and "DataLoader worker" not in err

    _torchrun("-m", "sptok", "pretrain", config("stopped"), "--set", f"train.stop_at={n + 2}")
    _torchrun("-m", "sptok", "pretrain", config("straight"), "--set", f"train.stop_at={n + 2}")
    straight = [json.loads(x) for x in open(tmp_path / "straight" / "log" / "metrics.jsonl")]
    resumed = [json.loads(x) for x in open(metrics)]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, n + 3))
    for a, b in zip(straight, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * max(1.0, abs(a["loss"])), (a["step"], a["loss"], b["loss"])

"""sptok pretrain on real builds, CPU: loss falls, DDP/FSDP gradient parity and exact resume with real
processes (torch.distributed.run, gloo), export loadable by transformers offline, fingerprint checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TOKENIZER, demo_corpus

from sptok.errors import SptokError
from sptok.train.config import load_config
from sptok.train.loop import pretrain

pytestmark = pytest.mark.slow
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("train-corpus")
    demo_corpus(d)
    return d


def _cfg(corpus, tmp_path, family="bert", build="b64", steps=20, **sections):
    doc = {"model": {"family": family, **TINY},
           "data": {"build": str(corpus / build), "manifest": str(corpus / "m.yaml"),
                    "build_args": {"seq_len": 64, "msp_prob": 0.3, "position": "post" if family == "llama" else
                                   "prefix", "tokenizer": str(TOKENIZER), "workers": 1}},
           "optim": {"lr": 3e-3, "warmup_steps": 2},
           "train": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 4},
           "log": {"dir": str(tmp_path / "log"), "every": 1, "tensorboard": False},
           "checkpoint": {"dir": str(tmp_path / "ckpt")}}
    for sec, vals in sections.items():
        doc[sec].update(vals)
    return doc


def _run(doc, overrides=()):
    return pretrain(load_config(None, list(overrides), base=doc), log=lambda m: None)


def test_tiny_bert_learns_and_logs_every_metric(corpus, tmp_path):
    recs = _run(_cfg(corpus, tmp_path, steps=40, build="bert-b"))
    last = recs[-1]
    mean = lambda rs: sum(r["loss"] for r in rs) / len(rs)  # noqa: E731
    assert mean(recs[-5:]) < mean(recs[:5]) - 0.5
    seen = [any(r["loss_by_source"][k] is not None for r in recs) for k in range(4)]
    assert all(seen) and all(v is None or v > 0 for r in recs for v in r["loss_by_source"])
    assert last["sp_acc"] is not None and last["sp_targets"] > 0
    lines = [json.loads(x) for x in open(tmp_path / "log" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == list(range(1, 41))
    assert {"loss", "loss_by_source", "sp_loss", "sp_acc", "lr", "grad_norm", "tokens_per_s",
            "delivered_tokens"} <= set(lines[-1])


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_llama_and_t5_train(corpus, tmp_path, family):
    from sptok.data import BuildInfo
    from sptok.train.model import padded_vocab

    recs = _run(_cfg(corpus, tmp_path, family=family, steps=25, build=f"{family}-b"))
    assert sum(r["loss"] for r in recs[-3:]) / 3 < sum(r["loss"] for r in recs[:3]) / 3 - 0.3
    # an untrained model is near uniform over the vocabulary (T5's untied head started at 30+ nats)
    assert abs(recs[0]["loss"] - math.log(padded_vocab(BuildInfo.load(corpus / f"{family}-b"), family))) < 1
    if family == "llama":   # post SP: the decoder is scored on naming the source after the text
        assert recs[-1]["sp_targets"] > 0


def _torchrun(*args, nproc=2, env=None):
    # --standalone: a fresh rendezvous on a free port each time (a fixed port can still be held by the last run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_pretrain_under_torchrun_ends_its_process_group(corpus, tmp_path):
    """After a run under torchrun, `sptok pretrain` has destroyed its process group (NCCL warns of one left to
    the interpreter's exit, and gloo's teardown at exit now and then aborted a finished run)."""
    (tmp_path / "run.json").write_text(json.dumps(_cfg(corpus, tmp_path, steps=2)))
    script = tmp_path / "run.py"
    script.write_text("import os, sys\nimport torch.distributed as dist\nfrom sptok.cli import main\n"
                      "main(['pretrain', sys.argv[1]], standalone_mode=False)\n"
                      "with open(f'{sys.argv[2]}/rank{os.environ[\"RANK\"]}', 'w') as f:\n"
                      "    f.write(f'group left: {dist.is_initialized()}')\n")
    r = _torchrun(script, tmp_path / "run.json", tmp_path)
    left = [(tmp_path / f"rank{k}").read_text() for k in range(2)]
    assert left == ["group left: False"] * 2, r.stderr[-2000:]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradients_equal_for_one_process_ddp_and_fsdp(corpus, tmp_path, family):
    """One global batch of 8 samples: 1 process (2 micro-batches of 4), 2-process DDP (2 x 2 per rank) and
    2-process FSDP2 (1 x 4 per rank) give the same gradients, to 1e-5 relative (fp32, CPU, gloo)."""
    build = corpus / "b64"
    if not (build / "sptok.json").exists():
        _run(_cfg(corpus, tmp_path, steps=1))
    script = ROOT / "tests" / "dist_grads.py"
    subprocess.run([sys.executable, script, build, tmp_path / "one.pt", "none", family, "4"], check=True, cwd=ROOT)
    _torchrun(script, build, tmp_path / "ddp.pt", "ddp", family, "2")
    _torchrun(script, build, tmp_path / "fsdp.pt", "fsdp", family, "4")
    one, ddp, fsdp = (torch.load(tmp_path / f"{k}.pt") for k in ("one", "ddp", "fsdp"))
    assert one.keys() == ddp.keys() == fsdp.keys()
    for name, g in one.items():
        scale = g.abs().max().clamp(min=1e-12)
        assert (ddp[name] - g).abs().max() <= 1e-5 * scale + 1e-9, name
        assert (fsdp[name] - g).abs().max() <= 1e-5 * scale + 1e-9, name


def test_export_loads_with_transformers_offline(corpus, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sptok.cli import main

    _run(_cfg(corpus, tmp_path, steps=3))
    res = CliRunner().invoke(main, ["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = tok("[MASK]<SPSEP>def main():\n    return 0\n", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] >= len(tok) and torch.isfinite(logits).all()
    # the exported weights are the trained ones: every tensor equals the checkpoint's (read by DCP itself)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "ckpt" / "step-00000003", tmp_path / "ckpt.pt")
    trained = {k.removeprefix("model."): v for k, v in torch.load(tmp_path / "ckpt.pt")["model"].items()}
    exported = model.state_dict()
    assert set(exported) <= set(trained) and len(exported) > 10
    for k, v in exported.items():
        assert torch.equal(v, trained[k]), k
    # a directory that is not an earlier export is left alone: a build (its sptok.json would be replaced), the
    # checkpoint root (init_from would then read it as an export), a step directory; an export is redone
    build = corpus / "b64"
    before = {p.name: p.read_bytes() for p in build.iterdir() if p.is_file()}
    for out in (build, tmp_path / "ckpt", tmp_path / "ckpt" / "step-00000003"):
        res = CliRunner().invoke(main, ["export", str(tmp_path / "ckpt"), "--out", str(out)])
        assert res.exit_code == 2 and res.output.startswith(f"error: --out {out}: holds other files ("), res.output
        assert not (out / "config.json").exists()
    assert {p.name: p.read_bytes() for p in build.iterdir() if p.is_file()} == before
    res = CliRunner().invoke(main, ["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output


def test_resume_on_another_build_is_refused(corpus, tmp_path):
    doc = _cfg(corpus, tmp_path, steps=2, build="refuse")
    _run(doc)
    import shutil

    from sptok.build import run_build

    shutil.rmtree(corpus / "refuse")
    run_build(str(corpus / "m.yaml"), str(corpus / "refuse"), dict(doc["data"]["build_args"], seq_len=32, quiet=True),
              log=lambda m: None)
    with pytest.raises(SptokError, match="cannot resume .*option seq_len: 64 -> 32"):
        _run(dict(doc, data=dict(doc["data"], manifest=None)), ["train.steps=4"])   # not the build_args' check


def test_a_table_build_is_refused_with_the_way_out(corpus, tmp_path):
    doc = _cfg(corpus, tmp_path, steps=1, build="arrow")
    doc["data"]["build_args"]["format"] = "arrow"
    with pytest.raises(SptokError, match="would be a build in arrow format; sptok pretrain reads MDS builds .* "
                                         "--format mds"):
        _run(doc)
    assert not (corpus / "arrow").exists()   # refused before building it (it was built, then refused)
    from sptok.build import run_build

    run_build(str(corpus / "m.yaml"), str(corpus / "arrow"), dict(doc["data"]["build_args"], quiet=True),
              log=lambda m: None)
    with pytest.raises(SptokError, match="is a build in arrow format; sptok pretrain reads MDS builds .* --format mds"):
        _run(dict(doc, data=dict(doc["data"], manifest=None)))


def test_sp_schedule_and_pinned_fingerprint(corpus, tmp_path):
    recs = _run(_cfg(corpus, tmp_path, steps=6), ["data.sp_schedule=[[0.5, strip]]"])
    assert [r["sp_policy"] for r in recs] == ["keep"] * 3 + ["strip"] * 3
    assert recs[-1]["sp_targets"] == 0 and recs[0]["sp_targets"] > 0
    with pytest.raises(SptokError, match="not the expected"):
        _run(_cfg(corpus, tmp_path / "x", steps=1), ["data.expected_fingerprint=" + "0" * 64])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(SptokError, match="train.bogus is not a setting"):
        load_config(None, ["train.bogus=1", "data.build=x"])
    with pytest.raises(SptokError, match="model.family: 'gpt' is not one of"):
        load_config(None, ["model.family=gpt", "data.build=x"])
    with pytest.raises(SptokError, match="data.build"):
        load_config(None, [])
    # a value of the wrong type names the key, the type expected and what was given
    with pytest.raises(SptokError, match=r"^config: train.steps: expected an integer, got 'abc' "
                                         r"\(--set train.steps=abc\)$"):
        load_config(None, ["train.steps=abc", "data.build=x"])
    with pytest.raises(SptokError, match="config: train.stop_at: expected an integer or null, got 1.5"):
        load_config(None, ["train.stop_at=1.5", "data.build=x"])
    with pytest.raises(SptokError, match="config: data.proportion: expected a mapping or null, got 3"):
        load_config(None, ["data.proportion=3", "data.build=x"])
    (tmp_path / "c.yaml").write_text("data: {build: x}\ntrain: {micro_batch_size: eight}\n")
    with pytest.raises(SptokError, match="config: train.micro_batch_size: expected an integer, got 'eight'$"):
        load_config(str(tmp_path / "c.yaml"))
    cfg = load_config(None, ["optim.lr=1e-4", "train.max_minutes=2", "optim.betas=[0.9, 0.99]", "data.build=x"])
    assert (cfg.optim.lr, cfg.train.max_minutes, cfg.optim.betas) == (1e-4, 2.0, (0.9, 0.99))
    # a path in the file is relative to the file; one given with --set, to where the command runs
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("data: {build: b}\n")
    assert load_config(str(tmp_path / "sub" / "c.yaml")).data.build == str(tmp_path / "sub" / "b")
    assert load_config(str(tmp_path / "sub" / "c.yaml"), ["data.build=o/b"]).data.build == os.path.abspath("o/b")


def _epoch_run(corpus, tmp_path, weights: bool):
    """Train exactly one epoch (2 loader workers) with a stop and resume half-way; return run + build facts."""
    build = corpus / "b512"
    doc = _cfg(corpus, tmp_path, steps=1, build="b512")
    doc["data"]["build_args"]["seq_len"] = 512
    if not (build / "sptok.json").exists():
        _run(dict(doc, checkpoint={"dir": ""}, log=dict(doc["log"], dir=str(tmp_path / "warm"))))
    info = json.load(open(build / "sptok.json"))
    n = sum(c["samples"] for c in info["counts"].values())
    batch = next(b for b in (8, 4, 2, 1) if n % b == 0)
    doc["train"].update(steps=n // batch, global_batch_size=batch, micro_batch_size=batch)
    doc["data"].update(weights=weights, num_workers=2)
    doc["checkpoint"]["every"] = 10 ** 6
    _run(doc, [f"train.stop_at={n // batch // 2}"])
    recs = _run(doc)
    return info, json.load(open(build / "stats.json")), recs[-1], n


def test_delivered_tokens_over_an_epoch_equal_the_build(corpus, tmp_path):
    """Natural sizes: one epoch delivers every built token of every source exactly once, across a resume."""
    info, stats, last, _ = _epoch_run(corpus, tmp_path, weights=False)
    built = [stats["sources"][s]["sample_tokens"] for s in last["sources"]]
    assert [int(x) for x in last["delivered_tokens"]] == built
    assert [int(x) for x in last["delivered_samples"]] == [info["counts"][s]["samples"] for s in last["sources"]]


def test_delivered_proportions_follow_the_manifest_weights(corpus, tmp_path):
    from click.testing import CliRunner

    from sptok.cli import main

    info, stats, last, n = _epoch_run(corpus, tmp_path, weights=True)      # weights 1 : 1 : 1 : 1 here
    shares = [x / sum(last["delivered_samples"]) for x in last["delivered_samples"]]
    assert all(abs(s - 0.25) <= 2 / n + 1e-9 for s in shares), shares   # streaming's per-epoch counts are exact
    res = CliRunner().invoke(main, ["stats", str(corpus / "b512"), "--run", str(tmp_path / "log")])
    assert res.exit_code == 0 and "requested" in res.output and "25.0%" in res.output, res.output


def test_llama_attention_stays_inside_each_document(corpus, tmp_path):
    """End to end through LossModel: changing the first document of a packed sample leaves the losses of the
    second document unchanged (position ids restart, and transformers masks each document from them)."""
    from sptok.data import CausalLMCollator, open_dataset
    from sptok.train.config import ModelConfig
    from sptok.train.losses import LossModel
    from sptok.train.model import build_model

    build = corpus / "b64"
    if not (build / "sptok.json").exists():
        _run(_cfg(corpus, tmp_path, steps=1))
    info = open_dataset(str(build), weights=False).build
    torch.manual_seed(0)
    lm = LossModel(build_model(ModelConfig(family="llama", **TINY), info), "llama", info.sp_ids.tolist()).eval()
    coll = CausalLMCollator(info)
    ids = torch.randint(100, 2000, (64,)).numpy()
    sample = {"input_ids": ids, "source_id": 0, "doc_offsets": [0, 20], "sp_positions": b"", "msp_mask": b""}
    other = dict(sample, input_ids=ids.copy())
    other["input_ids"][:20] = torch.randint(100, 2000, (20,)).numpy()
    with torch.no_grad():
        a, b = lm(coll([sample]))["loss"], lm(coll([other]))["loss"]
    # targets: positions 1..19 of doc 1 (19 losses), then positions 21..63 of doc 2 (43 losses)
    assert len(a) == len(b) == 19 + 43
    assert not torch.allclose(a[:19], b[:19])
    assert torch.allclose(a[19:], b[19:], atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_a_training_step_never_reads_the_device(corpus, tmp_path, family):
    """Micro-batches, per-source metrics, clipping and the optimizer step run with the model on the `meta`
    device, where any read of a device value (`.item()`, boolean indexing, `bincount`, ...) raises: on a GPU
    each would make the host wait. Counts come from the host batch; the device is read at log steps only."""
    from sptok.data import open_dataset
    from sptok.train.config import ModelConfig
    from sptok.train.loop import Meter, _clip, forward_backward, make_collator
    from sptok.train.losses import LossModel
    from sptok.train.model import build_model

    build = corpus / "b64"
    if not (build / "sptok.json").exists():
        _run(_cfg(corpus, tmp_path, steps=1))
    ds = open_dataset(str(build), weights=False)
    cfg = load_config(None, base=_cfg(corpus, tmp_path, family=family))
    collate = make_collator(cfg, ds.build)
    meta = torch.device("meta")
    lm = LossModel(build_model(ModelConfig(family=family, **TINY), ds.build), family, ds.build.sp_ids.tolist())
    lm = lm.to(meta)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    meter = Meter(len(ds.build.sources), meta)
    micro = [collate([ds[i] for i in range(j, j + 4)]) for j in (0, 4)]
    forward_backward(lm, micro, 1, meta, meter)
    _clip(lm, 1.0)
    optimizer.step()
    assert meter.losses.sums.device == meta and meter.tokens == sum(int((m["token_source" if family == "bert" else
                                                                  "input_source"] >= 0).sum()) for m in micro)


def test_two_runs_never_mix_in_one_log(corpus, tmp_path):
    """A run starting at step 0 in a log.dir of another run appended its records to the other's metrics.jsonl
    (steps 1, 2, 1, 2) and replaced its run.json; the same run started again still appends."""
    doc = _cfg(corpus, tmp_path, steps=2)
    doc["checkpoint"]["dir"] = ""
    _run(doc)
    _run(doc)
    with pytest.raises(SptokError, match=r"^log.dir: .* holds the log of another run \(its run.json differs in "
                                         r"optim.lr\)"):
        _run(doc, ["optim.lr=1e-3"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log" / "metrics.jsonl")]
    assert steps == [1, 2, 1, 2]
    assert json.loads((tmp_path / "log" / "run.json").read_text())["config"]["optim"]["lr"] == 3e-3


def test_settings_that_fail_late_are_refused_before_any_step(corpus, tmp_path):
    """A file where checkpoint.dir or log.dir goes ended the run at its first save (a torch traceback, the
    steps before it spent); a model.extra key that sptok sets itself, in a transformers TypeError."""
    (tmp_path / "f").write_text("x")
    for key, sec in (("checkpoint.dir", "checkpoint"), ("log.dir", "log")):
        doc = _cfg(corpus, tmp_path / key, steps=1)
        doc[sec]["dir"] = str(tmp_path / "f")
        with pytest.raises(SptokError, match=rf"^{key}: {tmp_path / 'f'} is a file, not a directory"):
            _run(doc)
        assert not (tmp_path / key).exists()   # nothing written: no step ran
    with pytest.raises(SptokError, match="^model.extra.hidden_size: sptok sets bert's hidden_size itself"):
        _run(_cfg(corpus, tmp_path, steps=1, model={"extra": {"hidden_size": 64}}))

"""Continual pre-training on real tiny builds, CPU: `train.init_from` (grown embeddings, refusals, lineage, a
resume that does not go back to the origin), the warmup-stable-decay schedule and `optim.min_lr` (exact
learning rates), and `data.phases` (the mixture switching at its step with exact per-phase counts, a resume
inside a phase equal to an unbroken run)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import SOURCES, TOKENIZER, demo_corpus

from sptok.errors import SptokError
from sptok.train.config import load_config
from sptok.train.loop import lr_lambda, pretrain

pytestmark = pytest.mark.slow
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
OLD, NEW = SOURCES[:3], SOURCES   # the old build has three sources; the new one adds the fourth
NEW_SP = "<NEWS>"
EXTRA = [f"<NEW{i}>" for i in range(59)] + [NEW_SP]   # 60 tokens: the padded vocabulary grows (8256 -> 8320)


def _manifest(d, names, custom: bool):
    """A manifest of ``names``; ``custom``: the old sources keep their SPs, the new one gets NEW_SP."""
    sps = {"pydocs": "<PYDOCS>", "code": "<CODE>", "fortunes": "<FORTUNES>", "chinese": NEW_SP}
    sp = (lambda n: f", sp: '{sps[n]}'") if custom else (lambda n: "")
    p = d / f"m{len(names)}{'c' if custom else ''}.yaml"
    p.write_text("sources:\n" + "".join(f"  - {{name: {n}, paths: {n}.jsonl, id_field: id{sp(n)}}}\n" for n in names))
    return p


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """``old``: three demo sources with the demo tokenizer; ``new``: all four, with that tokenizer extended by
    60 tokens, the fourth source's SP among them (what an appended build is); ``other``: a tokenizer trained
    afresh, which does not extend the demo one."""
    from sptok.build import run_build
    from sptok.build.tokenizer import extend_for, train_for_manifest

    d = tmp_path_factory.mktemp("continual")
    demo_corpus(d)
    opts = dict(quiet=True, workers=1, seq_len=64, msp_prob=0.3)
    run_build(str(_manifest(d, OLD, False)), str(d / "old"), dict(opts, tokenizer=str(TOKENIZER)), log=lambda m: None)
    extend_for(str(TOKENIZER), str(d / "tok-new"), EXTRA)
    run_build(str(_manifest(d, NEW, True)), str(d / "new"), dict(opts, tokenizer=str(d / "tok-new"), policy="custom"),
              log=lambda m: None)
    train_for_manifest(str(_manifest(d, NEW, True)), str(d / "tok-other"), "bpe", 600, "200KB", policy="custom")
    run_build(str(_manifest(d, NEW, True)), str(d / "other"), dict(opts, tokenizer=str(d / "tok-other"),
                                                                    policy="custom"), log=lambda m: None)
    return d


def _cfg(d, build, name, steps=6, family="bert", **sections):
    doc = {"model": {"family": family, **TINY}, "data": {"build": str(d / build), "num_workers": 1},
           "optim": {"lr": 3e-3, "warmup_steps": 2},
           "train": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 4},
           "log": {"dir": str(d / name / "log"), "every": 1, "tensorboard": False},
           "checkpoint": {"dir": str(d / name / "ckpt")}}
    for sec, vals in sections.items():
        doc[sec].update(vals)
    return doc


def _run(doc, overrides=()):
    said = []
    return pretrain(load_config(None, list(overrides), base=doc), log=said.append), said


def _trained(builds, family="bert"):
    """A model trained 4 steps on the old build (once per family): its checkpoint directory."""
    name = f"old-{family}"
    if not (builds / name / "ckpt").exists():
        _run(_cfg(builds, "old", name, steps=4, family=family))
    return builds / name / "ckpt"


def _metrics(path):
    return [json.loads(x) for x in open(path / "log" / "metrics.jsonl")]


# ------------------------------------------------------------------------------------------------ schedules

def _lrs(**optim):
    cfg = load_config(None, base={"data": {"build": "b"}, "train": {"steps": 10},
                                  "optim": {"lr": 1.0, "warmup_steps": 2, **optim}})
    f = lr_lambda(cfg)
    return [f(s) for s in range(11)]


def test_wsd_warms_up_holds_then_decays_to_min_lr():
    got = _lrs(schedule="wsd", decay_steps=4, min_lr=0.2)
    assert got == pytest.approx([0.5, 1.0, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2], abs=1e-12)


@pytest.mark.parametrize("schedule,want", [
    ("linear", [0.5, 1.0] + [0.2 + 0.8 * (1 - k / 8) for k in range(9)]),
    ("cosine", [0.5, 1.0] + [0.2 + 0.8 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * k / 8))
                             for k in range(9)]),
])
def test_min_lr_ends_the_existing_schedules(schedule, want):
    assert _lrs(schedule=schedule, min_lr=0.2) == pytest.approx(want, abs=1e-12)
    assert _lrs(schedule=schedule, min_lr_ratio=0.2) == pytest.approx(want, abs=1e-12)   # the same, relatively


@pytest.mark.parametrize("optim,train,data,message", [
    ({"schedule": "wsd"}, {}, {}, "optim.decay_steps: give it with optim.schedule: wsd"),
    ({"decay_steps": 3}, {}, {}, "optim.decay_steps: only optim.schedule: wsd takes it, not linear"),
    ({"schedule": "wsd", "decay_steps": 9}, {}, {}, "optim.decay_steps (9) + optim.warmup_steps (2) must not exceed "
                                                    "train.steps (10)"),
    ({"min_lr": 2.0}, {}, {}, "optim.min_lr (2.0) must not exceed optim.lr (1.0)"),
    ({"min_lr": 0.1, "min_lr_ratio": 0.1}, {}, {}, "give optim.min_lr or optim.min_lr_ratio, not both"),
    ({"schedule": "constant", "min_lr": 0.1}, {}, {}, "the constant schedule does not decay"),
    ({"schedule": "step"}, {}, {}, "optim.schedule: 'step' is not one of linear, cosine, constant, wsd"),
    ({}, {}, {"phases": [{"until": 0.5}, {"until": 0.4}]}, "data.phases[1].until: phases must end at increasing"),
    ({}, {}, {"phases": [{"until": 0.5}]}, "data.phases[0].until: the last phase must end at 1.0"),
    ({}, {}, {"phases": [{"until": 0.01}, {"until": 1.0}]}, "data.phases[0]: ends at step 0 of train.steps (10)"),
    ({}, {}, {"phases": [{"until": 1.0, "mix": {}}]}, "data.phases[0].mix is not a phase setting"),
    ({}, {}, {"phases": [{"until": 1.0, "proportion": {"a": -1}}]}, "data.phases[0].proportion.a: must be a finite"),
    ({}, {}, {"phases": [{"until": 1.0, "sp_policy": "msp=2"}]}, "data.phases[0].sp_policy: SP policy 'msp=2'"),
    ({}, {}, {"phases": [{"until": 1.0, "sp_policy": "strip"}], "sp_schedule": [[0.5, "keep"]]},
     "give the load-time SP policy by data.phases[].sp_policy or by data.sp_schedule, not both"),
    ({}, {}, {"phases": [{"until": 1.0}], "repeat": {"a": 2}}, "data.repeat: cannot weigh data.phases"),
])
def test_schedule_and_phase_settings_are_checked_in_one_line(optim, train, data, message):
    with pytest.raises(SptokError) as e:
        load_config(None, base={"data": {"build": "b", **data}, "train": {"steps": 10, **train},
                                "optim": {"lr": 1.0, "warmup_steps": 2, **optim}})
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ init_from

def _setup(doc):
    from sptok.train.loop import setup

    run = setup(load_config(None, base=doc), log=lambda m: None)
    run.loader.dataset.close()
    return run


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_init_from_grows_the_vocabulary_rows(builds, family):
    """Old token rows equal the checkpoint's, the new SP's row is the mean of the old SP rows, every other
    weight is copied; BERT's tied output layer stays tied, T5's and Llama's untied ones grow too, and T5's
    sentinels move past the grown vocabulary."""
    from sptok.data import BuildInfo
    from sptok.train.init_from import load_origin

    src = _trained(builds, family)
    run = _setup(_cfg(builds, "new", f"grow-{family}", family=family, train={"init_from": str(src)}))
    old = load_origin(str(src), print)
    old_info, new_info = BuildInfo.load(src / "build"), run.info
    n_old, n_new = old_info.vocab_size, new_info.vocab_size
    assert n_new == n_old + len(EXTRA)
    new_sp = int(new_info.sp_ids[new_info.sps.index(NEW_SP)])
    assert new_sp >= n_old and new_info.sps[:3] == old_info.sps and (new_info.sp_ids[:3] == old_info.sp_ids).all()
    m, o = run.model, old.model
    pairs = [(m.get_input_embeddings().weight, o.get_input_embeddings().weight),
             (m.get_output_embeddings().weight, o.get_output_embeddings().weight)]
    if family == "bert":
        pairs.append((m.cls.predictions.bias, o.cls.predictions.bias))
        assert m.get_input_embeddings().weight is m.get_output_embeddings().weight   # tied stays tied
    else:
        assert m.get_input_embeddings().weight is not m.get_output_embeddings().weight
    for new, was in pairs:
        assert new.shape[0] > was.shape[0]                                # 8256 -> 8320 (+ T5's sentinels)
        assert torch.equal(new[:n_old], was[:n_old])
        assert torch.allclose(new[new_sp], was[old_info.sp_ids].mean(0), atol=0, rtol=1e-6)
        if family == "t5":
            assert torch.equal(new[n_new:n_new + 256], was[n_old:n_old + 256])
    vocab = {id(p) for pair in pairs for p in pair}
    old_params = dict(o.named_parameters())
    for name, p in m.named_parameters():
        if id(p) not in vocab:
            assert torch.equal(p, old_params[name]), name


def test_init_from_an_export_equals_init_from_its_checkpoint(builds):
    from sptok.train.export import export

    src = _trained(builds)
    out = export(str(src), str(builds / "exported"))
    a = _setup(_cfg(builds, "new", "from-ckpt", train={"init_from": str(src)})).model.state_dict()
    b = _setup(_cfg(builds, "new", "from-export", train={"init_from": out})).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_refusals_are_one_line(builds):
    src = _trained(builds)
    cases = [
        (_cfg(builds, "other", "r1", train={"init_from": str(src)}),
         "does not extend the one", "' there and is '"),
        (_cfg(builds, "new", "r2", model={"hidden_size": 64}, train={"init_from": str(src)}),
         "holds another model (model.hidden_size: 32 -> 64)", ""),
        (_cfg(builds, "new", "r3", family="llama", train={"init_from": str(src)}),
         "is a bert model, model.family is llama", ""),
        (_cfg(builds, "new", "r4", train={"init_from": str(builds / "nowhere")}),
         "is neither an sptok checkpoint", ""),
        (_cfg(builds, "new", "r5", data={"phases": [{"until": 1.0, "proportion": {"web": 1}}]}),
         "data.phases[0].proportion: no source 'web'", ""),
    ]
    for doc, a, b in cases:
        with pytest.raises(SptokError) as e:
            _run(doc)
        assert a in str(e.value) and b in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_init_from_refuses_a_damaged_checkpoint(builds, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(_trained(builds), src)
    step = sorted(src.glob("step-*"))[-1]
    victim = next(p for p in sorted(step.iterdir()) if p.suffix == ".distcp")
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(SptokError, match=f"checkpoint {step} is damaged: {victim.name} has xxh64"):
        _run(_cfg(builds, "new", "damaged", train={"init_from": str(step)}))


def test_init_from_refuses_a_damaged_export_in_one_line(builds, tmp_path):
    """A cut model.safetensors, an unreadable sptok_train.json or a missing sptok.json ended in a traceback."""
    from sptok.train.export import export

    good = export(str(_trained(builds)), str(tmp_path / "good"))
    damages = [("model.safetensors", lambda p: os.truncate(p, 1000), "cannot load the exported model in"),
               ("sptok_train.json", lambda p: p.write_text("{"), "is not a whole `sptok export` directory"),
               ("sptok.json", os.remove, "is not a whole `sptok export` directory"),
               ("config.json", lambda p: p.write_text(p.read_text().replace('"hidden_size": 32', '"hidden_size": 64')),
                "cannot load the exported model in")]
    for name, damage, message in damages:
        out = tmp_path / name
        shutil.copytree(good, out)
        damage(out / name)
        with pytest.raises(SptokError) as e:
            _run(_cfg(builds, "new", f"damaged-export-{name}", train={"init_from": str(out)}))
        assert e.value.message.startswith("train.init_from: ") and message in e.value.message
        assert "\n" not in e.value.message


def test_an_init_from_run_records_its_lineage_and_resumes_from_its_own_checkpoints(builds, tmp_path):
    """Stopped at step 4 and resumed with the origin moved away: the resume reads only the run's own checkpoint,
    and logs the losses of an unbroken run."""
    src = tmp_path / "origin"
    shutil.copytree(_trained(builds), src)
    doc = lambda name: _cfg(builds, "new", f"lineage-{name}", steps=8,   # noqa: E731
                            train={"init_from": str(src)}, checkpoint={"every": 2})
    straight, _ = _run(doc("straight"))
    _run(doc("stopped"), ["train.stop_at=4"])
    shutil.move(src, tmp_path / "moved")
    _, said = _run(doc("stopped"))
    assert not any("initialised from" in s for s in said)
    resumed = _metrics(builds / "lineage-stopped")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-6)
    lineage = json.loads((builds / "lineage-stopped" / "log" / "run.json").read_text())["init_from"]
    assert lineage == {"path": str(src / "step-00000004"), "kind": "checkpoint", "step": 4,
                       "fingerprint": json.loads((builds / "old" / "sptok.json").read_text())["fingerprint"]}
    assert straight[0]["loss"] < resumed[0]["loss"] + 1   # sanity: it started from the trained model


# ------------------------------------------------------------------------------------------------ phases

PHASES = [{"until": 0.6, "proportion": {"pydocs": 1, "code": 1, "fortunes": 1}},
          {"until": 1.0, "proportion": {"chinese": 3, "fortunes": 1}, "sp_policy": "strip"}]


def _phased(builds, name, **sections):
    return _cfg(builds, "new", name, steps=10, data={"phases": PHASES}, checkpoint={"every": 2}, **sections)


def test_phases_switch_the_mixture_and_policy_at_their_step(builds):
    """Steps 1-6 read the old sources 1:1:1, steps 7-10 the new one with 25% replay of fortunes, SPs stripped:
    each phase's delivered samples are exactly its shares of its 48 and 32 samples."""
    from click.testing import CliRunner

    from sptok.cli import main

    recs, said = _run(_phased(builds, "phases"))
    assert [r["phase"] for r in recs] == [0] * 6 + [1] * 4
    assert [r["sp_policy"] for r in recs] == ["keep"] * 6 + ["strip"] * 4
    assert all(r["sp_targets"] == 0 for r in recs[6:])   # stripped: no SP left to predict
    assert recs[5]["delivered_samples_by_phase"] == [[16, 16, 16, 0], [0, 0, 0, 0]]
    assert recs[-1]["delivered_samples_by_phase"] == [[16, 16, 16, 0], [0, 0, 8, 24]]
    assert recs[-1]["delivered_samples"] == [16, 16, 24, 24]
    tokens = recs[-1]["delivered_tokens_by_phase"]
    assert sum(map(sum, tokens)) == sum(recs[-1]["delivered_tokens"]) and tokens[1][:2] == [0, 0]
    assert "phase 1: steps 7-10, proportion {'chinese': 3, 'fortunes': 1}, sp_policy strip" in said
    run = json.loads((builds / "phases" / "log" / "run.json").read_text())
    assert [(p["start_step"], p["end_step"], p["sp_policy"]) for p in run["phases"]] == [(0, 6, "keep"),
                                                                                       (6, 10, "strip")]
    assert run["phases"][1]["requested"]["chinese"] == {"proportion": 0.75}
    assert run["phases"][1]["delivered_samples"] == [0, 0, 8, 24]
    res = CliRunner().invoke(main, ["stats", str(builds / "new"), "--run", str(builds / "phases" / "log")])
    assert res.exit_code == 0, res.output
    assert "phase 1 (steps 7-10): delivered by step 10" in res.output and "75.0%" in res.output, res.output


@pytest.mark.parametrize("stop_at", [4, 6, 8])
def test_a_resume_inside_or_between_phases_equals_the_unbroken_run(builds, stop_at):
    """Stopped inside phase 0 (4), at the switch (6) or inside phase 1 (8), then resumed: the same loss at every
    step and the same per-phase counts as a run never stopped; a phase's samples never repeat (its epoch)."""
    straight = builds / "phases-straight"
    if not straight.exists():
        _run(_phased(builds, "phases-straight"))
    name = f"phases-stop{stop_at}"
    _run(_phased(builds, name), [f"train.stop_at={stop_at}"])
    _run(_phased(builds, name))
    a, b = _metrics(straight), _metrics(builds / name)
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    assert b[-1]["delivered_samples_by_phase"] == a[-1]["delivered_samples_by_phase"]
    assert b[-1]["delivered_tokens_by_phase"] == a[-1]["delivered_tokens_by_phase"]


def test_a_resume_with_another_mixture_is_refused_naming_the_keys(builds):
    """The loader's saved place means something only for the same order of samples: phases, proportions or (with
    phases) the step count changed between a stop and its resume are refused in one line, nothing trained."""
    _run(_phased(builds, "changed"), ["train.stop_at=4"])
    other = [PHASES[0], {**PHASES[1], "proportion": {"chinese": 1, "fortunes": 1}}]
    for doc, overrides, says in (
            (_cfg(builds, "new", "changed", steps=10, data={"phases": other}, checkpoint={"every": 2}), [],
             r"data\.phases: \[.*\] -> \[.*'chinese': 1, 'fortunes': 1"),
            (_phased(builds, "changed"), ["train.steps=12"], r"train\.steps: 10 -> 12"),
            (_cfg(builds, "new", "changed", steps=10, checkpoint={"every": 2}), [], r"data\.phases: \[.*\] -> \[\]")):
        with pytest.raises(SptokError, match=r"cannot resume .*step-00000004: the samples' order changed \(" + says):
            _run(doc, overrides)
    assert sorted(p.name for p in (builds / "changed" / "ckpt").glob("step-*"))[-1] == "step-00000004"


def test_within_a_phase_no_sample_repeats(builds):
    """The samples a phase delivers are distinct (its epoch is its own size, each source's share drawn without
    repetition): read through the phase's own dataset, as the loop does."""
    from sptok.train.phases import open_phase, plan_phases

    cfg = load_config(None, base=_phased(builds, "distinct"))
    for phase in plan_phases(cfg):
        ds = open_phase(cfg, phase)
        try:
            seen = [(int(s["source_id"]), s["input_ids"].tobytes()) for s in ds]
        finally:
            ds.close()
        assert len(seen) == (phase.end - phase.start) * 8 and len(set(seen)) == len(seen)


def test_a_source_at_proportion_zero_is_not_read(builds):
    """streaming hands an epoch's rounding shortfall to random streams, a share of 0 included: such a source is
    left out of the dataset, so a phase that names no replay reads none (the table path counts the same)."""
    from sptok.data import open_dataset
    from sptok.data.dataset import samples_per_source

    prop = {"pydocs": 1, "code": 1, "fortunes": 1, "chinese": 0}
    for size in range(4, 12):
        ds = open_dataset(str(builds / "new"), proportion=prop, weights=False, epoch_size=size, shuffle_seed=7)
        try:
            got = [0] * 4
            for s in ds:
                got[int(s["source_id"])] += 1
        finally:
            ds.close()
        sizes = [ds.build.raw["counts"][n]["samples"] for n in NEW]
        assert got[3] == 0 and sum(got) == size
        assert samples_per_source(sizes, [{"proportion": prop[n] / 3} for n in NEW], size, 7) == got


@pytest.mark.parametrize("parallel,workers", [("ddp", 2), ("fsdp", "auto")])
def test_init_from_and_phases_under_two_processes_resume_exactly(builds, tmp_path, parallel, workers):
    """2 processes (gloo): a run started from the old checkpoint with two phases, stopped inside the second and
    resumed, logs the losses and per-phase counts of the unbroken run; the counts are the phases' shares. The
    resumed run reads with ``data.num_workers: auto``; started with 2 loader workers per rank (ddp), it resumes
    exactly with another count too (auto gives 1 on a 2-CPU host): streaming's order does not depend on the
    workers, since the dataset knows the batch size (elastic determinism). (This is also the suite's test of
    exact resume under two processes, DDP and FSDP2.)"""
    from test_train import _torchrun

    from sptok.data.loader import auto_workers

    src = _trained(builds)

    def config(name):
        doc = _phased(builds, name, train={"init_from": str(src), "parallel": parallel})
        doc["log"]["dir"], doc["checkpoint"]["dir"] = str(tmp_path / name / "log"), str(tmp_path / name / "ckpt")
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        return path

    first = ["--set", f"data.num_workers={workers}"]
    _torchrun("-m", "sptok", "pretrain", config("straight"), *first)
    _torchrun("-m", "sptok", "pretrain", config("stopped"), "--set", "train.stop_at=8", *first)
    r = _torchrun("-m", "sptok", "pretrain", config("stopped"), "--set", "data.num_workers=auto")
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "stopped")
    n, auto = (workers if workers != "auto" else auto_workers(local_world=2)), auto_workers(local_world=2)
    assert json.loads((tmp_path / "straight" / "log" / "run.json").read_text())["num_workers"] == n
    assert json.loads((tmp_path / "stopped" / "log" / "run.json").read_text())["num_workers"] == auto
    assert f"{auto} loader worker(s) per process (data.num_workers: auto)" in r.stderr, r.stderr[-3000:]
    assert a[-1]["delivered_tokens"] == b[-1]["delivered_tokens"]
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    assert b[-1]["delivered_samples_by_phase"] == a[-1]["delivered_samples_by_phase"] == [[16, 16, 16, 0],
                                                                                          [0, 0, 8, 24]]
    assert b[-1]["delivered_samples"] == [16, 16, 24, 24]   # the ranks' counts summed once, not at every log step
    one, _ = _run(_phased(builds, f"one-{parallel}", train={"init_from": str(src)}))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in one], rel=1e-4)   # = one process
    assert json.loads((tmp_path / "stopped" / "log" / "run.json").read_text())["init_from"]["step"] == 4

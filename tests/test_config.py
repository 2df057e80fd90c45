"""sptok.train.config: every setting checked when the config is read (types, ranges, the device), or as soon as
the build is known (batch against samples, build_args against the existing build, the pinned fingerprint);
paths resolved by one rule."""

from __future__ import annotations

import dataclasses
import os
import typing

import pytest
import torch
from conftest import ROOT, TOKENIZER, demo_corpus

from sptok.errors import SptokError
from sptok.train.config import _SECTIONS, load_config

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64"]


def _refused(overrides, match):
    with pytest.raises(SptokError, match=match) as e:
        load_config(None, ["data.build=x", *overrides])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("optim.lr=nan", "optim.lr"), ("optim.eps=nan", "optim.eps"), ("optim.lr=inf", "optim.lr"),
    ("optim.grad_clip=nan", "optim.grad_clip"), ("log.every=0", "log.every"), ("model.num_heads=0", "model.num_heads"),
    ("model.hidden_size=0", "model.hidden_size"), ("data.num_workers=-1", "data.num_workers"),
    ("data.proportion={x: -1}", "data.proportion.x"), ("data.proportion.x=-1", "data.proportion.x"),
    ("checkpoint.every=-1", "checkpoint.every"), ("train.max_minutes=-1", "train.max_minutes"),
    ("optim.betas=[.nan, 0.9]", "optim.betas"), ("data.repeat={x: .inf}", "data.repeat.x"),
    ("data.sp_schedule=[[abc, strip]]", r"data.sp_schedule\[0\]"), ("train.seed=99999999999999999999", "train.seed"),
    ("model.num_kv_heads=3", "model.num_kv_heads"), ("train.device=gpu", "train.device"),
    ("data.num_workers=many", "data.num_workers"),
    ("model.attn_implementation=flash", "^model.attn_implementation: 'flash' is not one of sdpa, eager"),
])
def test_odd_values_are_refused_naming_the_key(override, key):
    _refused([override], key)


def _numeric_fields():
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],)):
                yield section, f


def test_every_numeric_setting_has_a_range_and_refuses_nan_infinities_and_negatives():
    fields = list(_numeric_fields())
    assert len(fields) > 20
    for section, f in fields:
        key = f"{section}.{f.name}"
        assert "range" in f.metadata, f"{key} has no range: declare it with number(...)"
        for bad in (".nan", ".inf", "-.inf", "-1"):
            _refused([f"{key}={bad}"], f"^config: {key}: ")
    load_config(None, ["data.build=x"])   # every default is inside its range
    assert [load_config(None, ["data.build=x", f"data.num_workers={n}"]).data.num_workers for n in ("auto", 0, 3)] \
        == ["auto", 0, 3]   # the one setting that also takes a word


def test_a_config_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    (tmp_path / "c.yaml").write_bytes("data: {build: caf\u00e9}\n".encode("latin-1"))   # was a UnicodeDecodeError
    with pytest.raises(SptokError, match=rf"^config {tmp_path / 'c.yaml'}: not UTF-8 text \(byte 17: "):
        load_config(str(tmp_path / "c.yaml"))


def test_flex_attention_on_cpu_is_refused_when_the_config_is_read(tmp_path):
    flex = ["model.family=llama", "model.attn_implementation=flex_attention"]
    _refused([*flex, "train.device=cpu"], "^model.attn_implementation: flex_attention cannot train on CPU")
    load_config(None, ["data.build=x", *flex])   # the device may still be a GPU
    if not torch.cuda.is_available():   # auto on a machine without one: refused before any data is read
        from sptok.train.loop import pretrain

        with pytest.raises(SptokError, match="flex_attention cannot train on CPU"):
            pretrain(load_config(None, [f"data.build={tmp_path / 'none'}", *flex]), log=lambda m: None)


def test_paths_in_the_file_are_relative_to_it_and_given_ones_to_where_the_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("data: {build: b}\ncheckpoint: {dir: ck}\nlog: {dir: lg}\n")
    cfg = load_config("sub/c.yaml")
    here = tuple(str(tmp_path / "sub" / p) for p in ("b", "ck", "lg"))
    assert (cfg.data.build, cfg.checkpoint.dir, cfg.log.dir) == here
    cfg = load_config("sub/c.yaml", ["checkpoint.dir=o/ck", "log.dir=o/lg"])
    assert (cfg.checkpoint.dir, cfg.log.dir) == (str(tmp_path / "o" / "ck"), str(tmp_path / "o" / "lg"))
    # the build's tokenizer (data.build_args.tokenizer) is a path like the others
    (tmp_path / "sub" / "t.yaml").write_text("data: {build: b, build_args: {tokenizer: tok}}\n")
    assert load_config("sub/t.yaml").data.build_args["tokenizer"] == str(tmp_path / "sub" / "tok")
    assert load_config("sub/t.yaml", ["data.build_args.tokenizer=o/tok"]).data.build_args["tokenizer"] == "o/tok"
    (tmp_path / "sub" / "d.yaml").write_text("data: {build: b}\n")
    assert load_config("sub/d.yaml").log.dir == str(tmp_path / "runs" / "sptok")   # a default: where it runs
    # the shipped config writes where the README's next commands look, wherever it is run from
    cfg = load_config(str(ROOT / "pipelines" / "tiny-cpu.yaml"))
    assert (cfg.data.build, cfg.checkpoint.dir, cfg.log.dir) == tuple(
        str(ROOT / "out" / p) for p in ("demo-tiny", "tiny-cpu/ckpt", "tiny-cpu/log"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A build made by the config itself (data.manifest + data.build_args), and that config."""
    from sptok.train.loop import ensure_build

    d = tmp_path_factory.mktemp("config-build")
    demo_corpus(d, counts=(20, 6, 100, 20))
    (d / "c.yaml").write_text(f"data: {{build: b, manifest: m.yaml, build_args: {{seq_len: 64, workers: 1, "
                              f"tokenizer: {TOKENIZER}}}}}\n")
    ensure_build(load_config(str(d / "c.yaml")), 0, lambda m: None)
    return d


def test_changed_build_args_are_refused_naming_the_option(built):
    from sptok.train.loop import ensure_build

    config = str(built / "c.yaml")
    ensure_build(load_config(config, ["data.build_args.workers=2"]), 0, lambda m: None)   # how to run: no matter
    with pytest.raises(SptokError, match=r"^data.build_args: .* \(option seq_len: 64 -> 32\); set data.build to a new"):
        ensure_build(load_config(config, ["data.build_args.seq_len=32"]), 0, lambda m: None)
    with pytest.raises(SptokError, match="option msp_prob: 0.0 -> 0.3"):
        ensure_build(load_config(config, ["data.build_args={msp_prob: 0.3, workers: 1}"]), 0, lambda m: None)
    _refused(["data.build_args.seqlen=32"], "^config: data.build_args.seqlen is not a build option")
    with pytest.raises(SptokError, match=r"option metadata: None -> \{'pydocs': \{'field': 'url', 'form': 'host'"):
        ensure_build(load_config(config, ["data.build_args.metadata={field: url, form: host}"]), 0, lambda m: None)


def test_a_fingerprint_prefix_of_12_characters_pins_the_build(built):
    from sptok.data import open_dataset

    b = str(built / "b")
    fp = open_dataset(b).build.fingerprint
    for given in (fp, fp[:12], fp[:12].upper()):
        assert open_dataset(b, expected_fingerprint=given).build.fingerprint == fp
    other = fp[:11] + ("0" if fp[11] != "0" else "1")
    with pytest.raises(SptokError, match=f"build fingerprint {fp[:12]} is not the expected {other}:"):
        open_dataset(b, expected_fingerprint=other)
    with pytest.raises(SptokError, match="too short to pin a build; give at least its first 12 characters"):
        open_dataset(b, expected_fingerprint=fp[:11])
    assert load_config(None, ["data.build=x", f"data.expected_fingerprint={fp[:12]}"]).data.expected_fingerprint
    _refused([f"data.expected_fingerprint={fp[:11]}"], "^config: data.expected_fingerprint: .* at least its first 12")


@pytest.mark.parametrize("override, match", [
    ("train.global_batch_size=1000000000000", r"^train.global_batch_size \(1,000,000,000,000\) is more than the"),
    ("model.max_position_embeddings=32", r"^model.max_position_embeddings \(32\) is less than the build's seq_len"),
])
def test_settings_the_build_makes_implausible_are_refused_before_training(built, tmp_path, override, match):
    from sptok.train.loop import pretrain

    cfg = load_config(str(built / "c.yaml"), [*TINY, f"log.dir={tmp_path}", override])
    with pytest.raises(SptokError, match=match):
        pretrain(cfg, log=lambda m: None)
    assert not os.listdir(tmp_path)

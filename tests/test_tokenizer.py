"""Tokenizer training (three models), extension with SP tokens, and loading by transformers offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import TOKENIZER, demo_records, small_sources

from sptok.cli import main
from sptok.errors import SptokError
from sptok.build.tokenizer import extend, load_tokenizer, text_encoder


@pytest.mark.parametrize("model", ["bpe", "wordpiece", "unigram"])
def test_train_each_model(tmp_path, small_corpus, manifest, model):
    m = manifest(small_sources(tmp_path))
    out = tmp_path / model
    res = CliRunner().invoke(main, ["tokenizer", "train", str(m), "--out", str(out), "--vocab-size", "600",
                                    "--model", model], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lt = load_tokenizer(out)
    tok = lt.tok
    for special in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>", "<PYDOCS>", "<CHINESE>", "<SPSEP>"]:
        assert tok.token_to_id(special) is not None, special
    assert lt.roles["mask_token"] == "[MASK]" and lt.roles["eos_token"] == "<|endoftext|>"
    enc = text_encoder(tok)
    text = small_corpus["fortunes"][0]["text"]
    ids = enc.encode(text, add_special_tokens=False).ids
    assert tok.token_to_id("<PYDOCS>") not in enc.encode("<PYDOCS> x", add_special_tokens=False).ids
    if model == "bpe":   # byte-level BPE round-trips exactly
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_a_smaller_vocabulary_than_asked_is_said(tmp_path, small_corpus, manifest):
    m = manifest(small_sources(tmp_path))
    res = CliRunner().invoke(main, ["tokenizer", "train", str(m), "--out", str(tmp_path / "t"), "--vocab-size",
                                    "70000"], catch_exceptions=False)
    got = load_tokenizer(tmp_path / "t").tok.get_vocab_size()
    assert res.exit_code == 0 and got < 70000
    assert f"note: the vocabulary has {got:,} tokens, not the 70,000 asked for" in res.stderr
    res = CliRunner().invoke(main, ["tokenizer", "train", str(m), "--out", str(tmp_path / "u"), "--vocab-size",
                                    "600"], catch_exceptions=False)
    assert res.exit_code == 0 and "note:" not in res.stderr


def test_a_vocabulary_too_large_to_train_is_one_line(tmp_path, small_corpus, manifest):
    """The trainers reserve memory for the vocabulary asked for: 10**11 aborted the process (no Python error)."""
    m = manifest(small_sources(tmp_path))
    res = subprocess.run([sys.executable, "-m", "sptok", "tokenizer", "train", str(m), "--out", str(tmp_path / "t"),
                          "--vocab-size", "99999999999"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr == "error: --vocab-size: 99,999,999,999 is too large (at most 16,777,216)\n"
    assert not (tmp_path / "t").exists()


def test_training_reports_skipped_records_and_refuses_a_source_without_text(tmp_path, small_corpus, manifest):
    """As a build does: a bad record is counted and told, a source that gives no text stops the training."""
    (tmp_path / "odd.jsonl").write_text('{"text": 5}\n{"text": "a real document"}\n{"text": ["a"]}\n')
    m = manifest(small_sources(tmp_path) + [{"name": "odd", "paths": "odd.jsonl"}])
    res = CliRunner().invoke(main, ["tokenizer", "train", str(m), "--out", str(tmp_path / "t"), "--vocab-size",
                                    "600"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert ("note: source 'odd': skipped records, not trained on: non_string_text 2; first: odd.jsonl line 1: "
            "field 'text' holds int, expected a string") in res.stderr
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n{"body": "x"}\n')
    m = manifest(small_sources(tmp_path) + [{"name": "blank", "paths": "blank.jsonl"}], name="b.yaml")
    res = CliRunner().invoke(main, ["tokenizer", "train", str(m), "--out", str(tmp_path / "u"), "--vocab-size",
                                    "600"], catch_exceptions=False)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.startswith("error: source 'blank' gave no text to train on: every record read was skipped "
                                 "(empty_text 1, missing_field 1; first: blank.jsonl line 1: "), res.stderr
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
def test_a_tokenizer_config_that_is_not_an_object_is_one_line(tmp_path, name):
    import shutil

    shutil.copytree(TOKENIZER, tmp_path / "tok")
    (tmp_path / "tok" / name).write_text("[1, 2]")
    with pytest.raises(SptokError, match=f"{name}: expected a JSON object of token roles .*, got list"):
        load_tokenizer(tmp_path / "tok")


def test_training_refuses_a_delimiter_that_is_an_sp_as_a_build_does(tmp_path, small_corpus, manifest):
    """The tokenizer was written with the delimiter and an SP as one token, for builds that refuse it."""
    m = manifest(small_sources(tmp_path))
    res = CliRunner().invoke(main, ["tokenizer", "train", str(m), "--out", str(tmp_path / "t"), "--vocab-size",
                                    "600", "--delimiter", "<CODE>"], catch_exceptions=False)
    assert res.exit_code == 2 and res.stderr == ("error: delimiter clash: --delimiter <CODE> is also the SP of a "
                                                 "source; choose another delimiter\n")
    assert not (tmp_path / "t").exists()


def test_transformers_loads_the_build_tokenizer_offline(tmp_path, small_corpus, manifest, build, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    out, info = build(manifest(small_sources(tmp_path)), seq_len=64)
    hf = AutoTokenizer.from_pretrained(f"{out}/tokenizer")
    assert hf.mask_token == "[MASK]" and hf.eos_token == "<|endoftext|>"
    for e in info["sp_table"]:
        assert hf.convert_tokens_to_ids(e["sp"]) == e["token_id"]
        assert e["sp"] in hf.additional_special_tokens
    assert len(hf) == info["tokenizer"]["vocab_size"]


def test_extend_adds_specials_and_refuses_ordinary_tokens(tmp_path):
    lt = load_tokenizer(TOKENIZER)
    base = lt.tok.get_vocab_size()
    ids = extend(lt, ["<NEWS>", "<WIKI>"], "<SEP2>")
    assert sorted(ids.values()) == [base, base + 1, base + 2]
    assert extend(lt, ["<NEWS>"], None) == {"<NEWS>": ids["<NEWS>"]}   # idempotent
    with pytest.raises(SptokError, match="ordinary token"):
        extend(load_tokenizer(TOKENIZER), ["ing"], None)
    res = CliRunner().invoke(main, ["tokenizer", "extend", str(TOKENIZER), "--sp", "<NEWS>", "--out",
                                    str(tmp_path / "x")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "x" / "special_tokens_map.json").read_text())
    assert "<NEWS>" in cfg["additional_special_tokens"]


@pytest.mark.parametrize("seed", ["0", "3"])
def test_an_explicit_seed_overrides_the_manifest_s_even_zero(tmp_path, small_corpus, manifest, seed):
    """The tokenizer commands resolve policy and seed as `sptok build` does: a flag given, 0 included, wins over
    the manifest's `build:` value (`--seed 0` used to fall back to the manifest's seed)."""
    from conftest import SOURCES

    from sptok.sp import sp_strings

    m = manifest(small_sources(tmp_path), policy="misplaced", seed=5)
    assert sp_strings(list(SOURCES), "misplaced", int(seed)) != sp_strings(list(SOURCES), "misplaced", 5)
    for args, want in ((["--seed", seed], int(seed)), ([], 5)):
        out = tmp_path / f"x{len(args)}"
        res = CliRunner().invoke(main, ["tokenizer", "extend", str(TOKENIZER), "--manifest", str(m), "--out", str(out),
                                        *args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        added = json.loads((out / "special_tokens_map.json").read_text())["additional_special_tokens"]
        assert added == sp_strings(list(SOURCES), "misplaced", want) + ["<SPSEP>"]


def test_char_owners_is_the_last_token_on_each_character():
    """encoding_problem's owner of each character, vectorized, against the plain rule on real encodings: bytes
    of one character spread over several tokens (emoji, CJK, in byte-level BPE), whitespace, no token at all."""
    import numpy as np
    from tokenizers import Tokenizer

    from sptok.build.tokenizer import char_owners

    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    for text in ["emoji 🫨🫨 and 中文字 and ﬁ\n\n\t x", demo_records("chinese", 1)[0]["text"][:3000], "", "a"]:
        e = tok.encode(text, add_special_tokens=False)
        want = np.full(len(text), -1, np.int64)
        for i, (a, b) in zip(e.ids, e.offsets):
            want[a:b] = i
        got = char_owners(len(text), np.array(e.ids, np.int64), np.array(e.offsets, np.int64).reshape(-1, 2))
        assert got.tolist() == want.tolist()
    assert char_owners(3, np.array([7]), np.array([[1, 2]])).tolist() == [-1, 7, -1]

"""sptok label on real tiny models trained here (CPU, seconds): a BERT with MSP (prefix SP), a Llama with post SP,
a T5 with MSP and a BERT trained without MSP, each exported with `sptok export`.

Predictions equal a hand computation from the model's own logits over the SP ids (encoder: [MASK] in the SP slot;
decoder: the logits after text + delimiter), inputs are laid out exactly as the build lays out a document, the
modes place the right SP strings, --eval's numbers equal a hand computation, and every user error is one message."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SOURCES, TOKENIZER, demo_records, write_jsonl

from sptok.cli import main

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
TRAIN_DOCS = (30, 8, 200, 30)     # the first documents of each demo source train the models ...
HELD_OUT = 6                       # ... the last ones are labelled


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sptok.train.config import load_config
    from sptok.train.export import export
    from sptok.train.loop import pretrain

    d = tmp_path_factory.mktemp("label")
    for name, n in zip(SOURCES, TRAIN_DOCS):
        write_jsonl(d / f"{name}.jsonl", demo_records(name, n))
    (d / "m.yaml").write_text("sources:\n" + "".join(
        f"  - {{name: {n}, paths: {n}.jsonl, id_field: id}}\n" for n in SOURCES))
    out = {}
    for name, family, position, steps, policy in (("bert", "bert", "prefix", 30, "keep"),
                                                  ("llama", "llama", "post", 30, "keep"),
                                                  ("t5", "t5", "prefix", 8, "keep"),
                                                  ("bert-nomsp", "bert", "prefix", 2, "msp=0")):
        doc = {"model": {"family": family, **TINY},
               "data": {"build": str(d / f"build-{position}"), "manifest": str(d / "m.yaml"), "sp_policy": policy,
                        "build_args": {"seq_len": 64, "msp_prob": 0.3, "position": position,
                                       "tokenizer": str(TOKENIZER), "workers": 1}},
               "optim": {"lr": 3e-3, "warmup_steps": 2},
               "train": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 8},
               "log": {"dir": str(d / f"log-{name}"), "every": 100, "tensorboard": False},
               "checkpoint": {"dir": str(d / f"ckpt-{name}")}}
        pretrain(load_config(None, [], base=doc), log=lambda m: None)
        out[name] = export(str(d / f"ckpt-{name}"), str(d / name))
    out["build-prefix"], out["build-post"] = str(d / "build-prefix"), str(d / "build-post")
    return out


@pytest.fixture(scope="module")
def held_out():
    """Documents the models never saw, with a source field and fields of several JSON types."""
    rows = []
    for k, name in enumerate(SOURCES):
        for j, r in enumerate(demo_records(name)[-HELD_OUT:]):
            rows.append({"id": r["id"], "text": r["text"], "source": name, "n": j, "ok": j % 2 == 0,
                         "meta": {"tags": [name, j], "none": None}, "score": None if j == 0 else j / 3})
    return rows


def label(*args, ok=True):
    res = CliRunner().invoke(main, ["label", *map(str, args)], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def fails(*args, match: str):
    res = label(*args, ok=False)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.stderr.strip().splitlines()[-1].startswith("error: "), res.stderr
    assert match in res.stderr, res.stderr
    return res.stderr


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in open(path, encoding="utf-8")]


def manual_probs(model_dir: str, ids: list[int], kind: str) -> np.ndarray:
    """P(source) from the exported model's own logits, computed without sptok.label."""
    import transformers as tf

    info = json.load(open(Path(model_dir) / "sptok.json"))
    sp = [e["token_id"] for e in sorted(info["sp_table"], key=lambda e: e["source_id"])]
    x = torch.tensor([ids])
    with torch.no_grad():
        if kind == "bert":
            logits = tf.AutoModelForMaskedLM.from_pretrained(model_dir, local_files_only=True)(x).logits[0, 0]
        elif kind == "llama":
            logits = tf.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)(x).logits[0, -1]
        else:
            m = tf.AutoModelForSeq2SeqLM.from_pretrained(model_dir, local_files_only=True)
            dec = torch.tensor([[m.config.decoder_start_token_id, ids[0]]])
            logits = m(input_ids=x, decoder_input_ids=dec).logits[0, 1]
    return torch.softmax(logits[sp].double(), -1).numpy()


def text_ids(model_dir: str, text: str) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.encode_special_tokens = True          # the build's rule: SP strings in text are text
    return tok.encode(text, add_special_tokens=False).ids


def specials(model_dir: str) -> dict:
    info = json.load(open(Path(model_dir) / "sptok.json"))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    return {"sp": {e["source"]: e["token_id"] for e in info["sp_table"]},
            "sps": {e["source"]: e["sp"] for e in info["sp_table"]},
            "delim": info["delimiter"]["ids"], "eos": info["eos"]["id"], "mask": tok.token_to_id("[MASK]"),
            "vocab": tok.get_vocab_size(with_added_tokens=True)}


# ------------------------------------------------------------------------------------------------ item 1

def test_rows_are_kept_and_predictions_added(models, held_out, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", held_out)
    res = label("--model", models["bert"], "--input", inp, "--out", tmp_path / "out.jsonl")
    assert "labelled 24 rows" in res.stderr and "warning" not in res.stderr
    out = read_jsonl(tmp_path / "out.jsonl")
    assert len(out) == len(held_out)
    for src, got in zip(held_out, out):
        assert {k: got[k] for k in src} == src                       # every field, every JSON type, unchanged
        assert list(got)[: len(src)] == list(src)                    # in their order, the new fields after them
        assert set(got) - set(src) == {"sp_pred", "sp_prob", "sp_topk"}
        top = got["sp_topk"]
        assert [t["source"] for t in top] and len(top) == 4          # --top-k 5, capped at the model's 4 sources
        assert sorted(t["source"] for t in top) == sorted(SOURCES)
        assert abs(sum(t["prob"] for t in top) - 1) < 1e-9          # a distribution over the K sources
        assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
        assert (got["sp_pred"], got["sp_prob"]) == (top[0]["source"], top[0]["prob"])
    label("--model", models["bert"], "--input", inp, "--out", tmp_path / "top2.jsonl", "--top-k", "2", "--quiet")
    two = read_jsonl(tmp_path / "top2.jsonl")
    assert [r["sp_topk"] for r in two] == [r["sp_topk"][:2] for r in out]


def test_encoder_fills_a_masked_sp_slot_laid_out_as_the_build(models, held_out, tmp_path):
    from sptok.label import Scorer, load_table

    s = specials(models["bert"])
    scorer = Scorer(load_table(models["bert"]), device="cpu")
    assert scorer.max_tokens == 64 - 3                     # seq_len less [MASK], delimiter, EOS
    # a literal SP and delimiter in the text stay text: the slot is the only [MASK], no SP id enters the input
    text = "<CODE><SPSEP>def f():\n    return '<PYDOCS>'\n"
    ids, slots = scorer.layout(scorer.encode([text])[0])
    assert ids[:2] == [s["mask"]] + s["delim"] and slots == [0] and ids[-1] == s["eos"]
    assert not set(ids[2:]) & (set(s["sp"].values()) | set(s["delim"]) | {s["mask"]})
    assert ids[2:-1] == text_ids(models["bert"], text)
    from tokenizers import Tokenizer

    parsing = Tokenizer.from_file(str(Path(models["bert"]) / "tokenizer.json"))     # a tokenizer that parses SPs
    assert s["sp"]["code"] in parsing.encode(text, add_special_tokens=False).ids   # would have leaked the answer
    # the layout is the build's document [SP, delim, text, EOS] with [MASK] for the SP
    from shards import documents, mds_samples

    from sptok.sp import doc_hashes

    docs = documents(mds_samples(str(Path(models["build-prefix"]) / "fortunes")))
    rec = next(r for r in demo_records("fortunes", 200) if len(text_ids(models["bert"], r["text"])) < 40)
    built = docs[int(doc_hashes("fortunes", [rec["id"]])[0])]
    assert built[0] == s["sp"]["fortunes"]
    assert scorer.layout(scorer.encode([rec["text"]])[0])[0] == [s["mask"]] + built[1:]
    # the probabilities are the model's logits at the slot over the K SP ids, softmaxed
    rows = held_out[::5] + [{"id": "lit", "text": text, "source": "code"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    for max_tokens in (None, 8):
        extra = ["--max-tokens", max_tokens] if max_tokens else []
        label("--model", models["bert"], "--input", inp, "--out", tmp_path / "o.jsonl", "--batch-size", 3, *extra)
        keep = max_tokens or 61
        for r in read_jsonl(tmp_path / "o.jsonl"):
            t = text_ids(models["bert"], r["text"])
            ids = [s["mask"]] + s["delim"] + t[:keep] + ([s["eos"]] if len(t) <= keep else [])
            want = manual_probs(models["bert"], ids, "bert")
            got = {x["source"]: x["prob"] for x in r["sp_topk"]}
            assert np.allclose([got[n] for n in SOURCES], want, atol=1e-5), (r["id"], got, want)


def test_decoder_scores_the_post_sp_after_text_and_delimiter(models, held_out, tmp_path):
    from shards import documents, mds_samples

    from sptok.label import Scorer, load_table
    from sptok.sp import doc_hashes

    s = specials(models["llama"])
    scorer = Scorer(load_table(models["llama"]), device="cpu")
    assert scorer.max_tokens == 64 - 1                      # seq_len less the delimiter; the SP is scored, not fed
    docs = documents(mds_samples(str(Path(models["build-post"]) / "chinese")))
    rec = next(r for r in demo_records("chinese", 30) if len(text_ids(models["llama"], r["text"])) < 50)
    built = docs[int(doc_hashes("chinese", [rec["id"]])[0])]
    assert built[-2:] == [s["sp"]["chinese"], s["eos"]]    # the build's post layout: text delim SP EOS
    ids, slots = scorer.layout(scorer.encode([rec["text"]])[0])
    assert ids == built[:-2] and slots == [len(ids) - 1]
    inp = write_jsonl(tmp_path / "in.jsonl", held_out[::4])
    res = label("--model", models["llama"], "--input", inp, "--out", tmp_path / "o.jsonl", "--batch-size", 2)
    assert "warning" not in res.stderr
    for r in read_jsonl(tmp_path / "o.jsonl"):
        ids = text_ids(models["llama"], r["text"])[:63] + s["delim"]
        got = {x["source"]: x["prob"] for x in r["sp_topk"]}
        assert np.allclose([got[n] for n in SOURCES], manual_probs(models["llama"], ids, "llama"), atol=1e-5)


def test_encoder_with_sp_before_and_after_masks_both_slots(models, tmp_path):
    import transformers as tf

    from sptok.label import Scorer, load_table

    both = tmp_path / "both"
    shutil.copytree(models["bert"], both)
    info = json.loads((both / "sptok.json").read_text())
    info["options"]["position"] = "both"
    (both / "sptok.json").write_text(json.dumps(info))
    s = specials(models["bert"])
    scorer = Scorer(load_table(str(both)), device="cpu")
    text = "Fortune favours the bold."
    t = text_ids(models["bert"], text)
    ids, slots = scorer.layout(scorer.encode([text])[0])
    assert ids == [s["mask"]] + s["delim"] + t + s["delim"] + [s["mask"], s["eos"]] and slots == [0, len(ids) - 2]
    assert scorer.max_tokens == 64 - 5
    with torch.no_grad():
        logits = tf.AutoModelForMaskedLM.from_pretrained(str(both))(torch.tensor([ids])).logits[0]
    sp = [s["sp"][n] for n in SOURCES]
    joint = torch.log_softmax(logits[0, sp].double(), -1) + torch.log_softmax(logits[-2, sp].double(), -1)
    assert np.allclose(scorer.probs([t])[0], torch.softmax(joint, -1).numpy(), atol=1e-6)


def test_t5_names_the_sp_after_the_first_sentinel(models, held_out, tmp_path):
    s = specials(models["t5"])
    inp = write_jsonl(tmp_path / "in.jsonl", held_out[::6])
    label("--model", models["t5"], "--input", inp, "--out", tmp_path / "o.jsonl", "--max-tokens", 20)
    for r in read_jsonl(tmp_path / "o.jsonl"):
        t = text_ids(models["t5"], r["text"])
        ids = [s["vocab"]] + s["delim"] + t[:20] + ([s["eos"]] if len(t) <= 20 else [])   # sentinel 0 = vocab size
        got = {x["source"]: x["prob"] for x in r["sp_topk"]}
        assert np.allclose([got[n] for n in SOURCES], manual_probs(models["t5"], ids, "t5"), atol=1e-5)


def test_batching_and_device_do_not_change_the_probabilities(models, held_out, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", held_out)
    for name in ("bert", "llama"):
        label("--model", models[name], "--input", inp, "--out", tmp_path / "a.jsonl", "--batch-size", 1, "-q")
        label("--model", models[name], "--input", inp, "--out", tmp_path / "b.jsonl", "--batch-size", 7, "-q",
              "--device", "cpu")
        a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
        pa_ = np.array([[x["prob"] for x in sorted(r["sp_topk"], key=lambda x: x["source"])] for r in a])
        pb_ = np.array([[x["prob"] for x in sorted(r["sp_topk"], key=lambda x: x["source"])] for r in b])
        assert np.allclose(pa_, pb_, atol=1e-5)


def test_parquet_csv_and_compressed_jsonl(models, held_out, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [{"id": r["id"], "text": r["text"], "source": r["source"], "n": r["n"], "score": r["score"]}
            for r in held_out]
    write_jsonl(tmp_path / "ref.jsonl", flat)
    label("--model", models["bert"], "--input", tmp_path / "ref.jsonl", "--out", tmp_path / "ref-out.jsonl", "-q")
    ref = read_jsonl(tmp_path / "ref-out.jsonl")

    def same_predictions(rows):
        for a, b in zip(rows, ref):
            assert a["sp_pred"] == b["sp_pred"] and abs(float(a["sp_prob"]) - b["sp_prob"]) < 1e-6

    # Parquet in, Parquet out: the input columns and their types as they were, the new ones typed
    table = pa.table({"id": [r["id"] for r in flat], "text": [r["text"] for r in flat],
                      "source": [r["source"] for r in flat], "n": pa.array([r["n"] for r in flat], pa.int16()),
                      "tags": [[r["source"], "x"] for r in flat], "score": [r["score"] for r in flat]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=5)
    label("--model", models["bert"], "--input", tmp_path / "in.parquet", "--out", tmp_path / "out.parquet",
          "--mode", "auto", "-q")
    got = pq.read_table(tmp_path / "out.parquet")
    assert got.select(table.column_names).equals(table)
    assert got.schema.field("sp_prob").type == pa.float64()
    assert got.schema.field("sp_topk").type == pa.list_(pa.struct([("source", pa.string()), ("prob", pa.float64())]))
    same_predictions(got.to_pylist())
    # Parquet in, JSONL out (by --out's extension)
    label("--model", models["bert"], "--input", tmp_path / "in.parquet", "--out", tmp_path / "pq.jsonl", "-q")
    same_predictions(read_jsonl(tmp_path / "pq.jsonl"))
    # CSV: every cell kept as the same string (commas, quotes, newlines), the new fields as cells
    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "source", "note"])
        for r in flat:
            w.writerow([r["id"], r["text"], r["source"], 'a, "quoted"\nnote'])
    label("--model", models["bert"], "--input", tmp_path / "in.csv", "--out", tmp_path / "out.csv", "-q")
    rows = list(csv.DictReader(open(tmp_path / "out.csv", newline="", encoding="utf-8")))
    assert [(r["id"], r["text"], r["source"], r["note"]) for r in rows] == \
        [(r["id"], r["text"], r["source"], 'a, "quoted"\nnote') for r in flat]
    assert list(rows[0])[-3:] == ["sp_pred", "sp_prob", "sp_topk"]
    assert json.loads(rows[0]["sp_topk"])[0]["source"] == rows[0]["sp_pred"]
    same_predictions(rows)
    # CSV in, Parquet out; zstd- and gzip-compressed JSONL in
    label("--model", models["bert"], "--input", tmp_path / "in.csv", "--out", tmp_path / "csv.parquet", "-q")
    same_predictions(pq.read_table(tmp_path / "csv.parquet").to_pylist())
    for z in ("zst", "gz"):
        write_jsonl(tmp_path / f"in.jsonl.{z}", flat, compress=z)
        label("--model", models["bert"], "--input", tmp_path / f"in.jsonl.{z}", "--out", tmp_path / f"{z}.jsonl", "-q")
        same_predictions(read_jsonl(tmp_path / f"{z}.jsonl"))


def test_a_pair_of_fields_is_one_document(models, tmp_path):
    rows = [{"premise": "The cat sat.", "hypothesis": "A cat is sitting.", "source": "fortunes"},
            {"premise": "import os", "hypothesis": "print(os.getcwd())", "source": "code"}]
    inp = write_jsonl(tmp_path / "pairs.jsonl", rows)
    joined = write_jsonl(tmp_path / "joined.jsonl", [{"text": r["premise"] + "\n" + r["hypothesis"]} for r in rows])
    label("--model", models["bert"], "--input", inp, "--out", tmp_path / "p.jsonl", "--text-field", "premise",
          "--pair-field", "hypothesis", "--mode", "auto")
    label("--model", models["bert"], "--input", joined, "--out", tmp_path / "j.jsonl")
    p, j = read_jsonl(tmp_path / "p.jsonl"), read_jsonl(tmp_path / "j.jsonl")
    assert [r["sp_topk"] for r in p] == [r["sp_topk"] for r in j]
    sps = specials(models["bert"])["sps"]
    for r in p:   # prefix: the SP before the first segment, the second segment bare
        assert r["sp_input"] == sps[r["sp_pred"]] + "<SPSEP>" + r["premise"]
        assert r["sp_input_pair"] == r["hypothesis"]
    label("--model", models["llama"], "--input", inp, "--out", tmp_path / "d.jsonl", "--text-field", "premise",
          "--pair-field", "hypothesis", "--pair-sep", " ", "--mode", "manual", "--source-field", "source")
    for r in read_jsonl(tmp_path / "d.jsonl"):   # post: the SP after the second segment
        assert r["sp_input"] == r["premise"]
        assert r["sp_input_pair"] == r["hypothesis"] + "<SPSEP>" + sps[r["source"]]


# ------------------------------------------------------------------------------------------------ item 2

def test_modes_write_the_papers_fine_tuning_inputs(models, held_out, tmp_path):
    held = [dict(r, text="<CODE> " + r["text"]) if i == 0 else r for i, r in enumerate(held_out)]
    inp = write_jsonl(tmp_path / "in.jsonl", held)
    s = specials(models["bert"])
    out = {}
    for mode, seed in (("manual", 0), ("auto", 0), ("random", 0), ("random", 1), ("none", 0)):
        label("--model", models["bert"], "--input", inp, "--out", tmp_path / f"{mode}{seed}.jsonl", "--mode", mode,
              "--seed", seed, "--source-field", "source", "--ids", "-q")
        out[mode, seed] = read_jsonl(tmp_path / f"{mode}{seed}.jsonl")
    for mode, rows in out.items():
        for r in rows:
            sp = r["sp_used"]
            assert r["sp_input"] == (r["text"] if sp is None else sp + "<SPSEP>" + r["text"])
            t = text_ids(models["bert"], r["text"])
            # laid out as a build lays out a document: [SP delim] text EOS
            assert r["sp_input_ids"] == (t if sp is None else [s["sp"][_source(s, sp)]] + s["delim"] + t) + [s["eos"]]
    assert [r["sp_used"] for r in out["manual", 0]] == [s["sps"][r["source"]] for r in held]
    assert [r["sp_used"] for r in out["auto", 0]] == [s["sps"][r["sp_pred"]] for r in out["auto", 0]]
    assert all(r["sp_used"] is None for r in out["none", 0])
    # the literal "<CODE> " in the first text stays text in the ids; only the placed SP is an SP id
    first = out["manual", 0][0]["sp_input_ids"]
    assert first[0] == s["sp"]["pydocs"] and s["sp"]["code"] not in first
    # random: seeded, the same for the same seed (any batch size), different across seeds, all sources used
    r0 = [r["sp_used"] for r in out["random", 0]]
    label("--model", models["bert"], "--input", inp, "--out", tmp_path / "again.jsonl", "--mode", "random",
          "--batch-size", 1, "--no-predict", "-q")
    again = read_jsonl(tmp_path / "again.jsonl")
    assert [r["sp_used"] for r in again] == r0 and "sp_pred" not in again[0]
    assert r0 != [r["sp_used"] for r in out["random", 1]] and set(r0) <= set(s["sps"].values())
    from sptok.label.modes import random_sources

    whole, parts = random_sources(7, 0, 10, 4), (random_sources(7, 0, 4, 4), random_sources(7, 4, 6, 4))
    assert whole.tolist() == parts[0].tolist() + parts[1].tolist()
    counts = np.bincount(random_sources(0, 0, 4000, 4), minlength=4)
    assert (counts > 900).all() and (counts < 1100).all()
    # post SP models place it after the text
    label("--model", models["llama"], "--input", inp, "--out", tmp_path / "post.jsonl", "--mode", "manual",
          "--source-field", "source", "--no-predict", "-q")
    assert [r["sp_input"] for r in read_jsonl(tmp_path / "post.jsonl")] == \
        [r["text"] + "<SPSEP>" + s["sps"][r["source"]] for r in held]


def test_the_readmes_sp_input_recipe_and_ids_on_a_literal_sp(models, tmp_path):
    """The README's word on a literal SP string in the text: the exported tokenizer turns it into the SP in
    ``sp_input``, and ``--ids`` keeps it text, as a build does."""
    from conftest import ROOT
    from transformers import AutoTokenizer

    text = "print('<CODE>')  # not the code source"
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": text, "source": "pydocs"}])
    label("--model", models["bert"], "--input", inp, "--out", tmp_path / "o.jsonl", "--mode", "manual",
          "--source-field", "source", "--ids", "--no-predict", "-q")
    row = read_jsonl(tmp_path / "o.jsonl")[0]
    s = specials(models["bert"])
    tok = AutoTokenizer.from_pretrained(models["bert"], local_files_only=True)     # the README's recipe
    ids = tok(row["sp_input"], add_special_tokens=False)["input_ids"]
    assert ids[0] == s["sp"]["pydocs"] and s["sp"]["code"] in ids
    assert row["sp_input_ids"] == [s["sp"]["pydocs"]] + s["delim"] + text_ids(models["bert"], text) + [s["eos"]]
    assert s["sp"]["code"] not in row["sp_input_ids"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "a literal SP string of the text (a `<PYDOCS>` written in the document) becomes that SP too" in readme
    assert "For exact ids, `--ids` adds `sp_input_ids`" in readme


def _source(s, sp):
    return next(k for k, v in s["sps"].items() if v == sp)


def test_a_model_trained_without_msp_is_labelled_with_a_warning(models, held_out, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", held_out[:3])
    res = label("--model", models["bert-nomsp"], "--input", inp, "--out", tmp_path / "o.jsonl")
    assert "warning:" in res.stderr and "trained without masked source prediction" in res.stderr
    assert "load-time SP policy msp=0" in res.stderr and len(read_jsonl(tmp_path / "o.jsonl")) == 3
    # an export without sptok_train.json: the build's msp_prob decides
    old = tmp_path / "old-export"
    shutil.copytree(models["bert"], old)
    (old / "sptok_train.json").unlink()
    assert "warning" not in label("--model", old, "--input", inp, "--out", tmp_path / "o.jsonl").stderr
    info = json.loads((old / "sptok.json").read_text())
    info["options"]["msp_prob"] = 0.0
    (old / "sptok.json").write_text(json.dumps(info))
    res = label("--model", old, "--input", inp, "--out", tmp_path / "o.jsonl")
    assert "build msp_prob 0" in res.stderr and "no sptok_train.json" in res.stderr


# ------------------------------------------------------------------------------------------------ item 3

def test_eval_equals_a_hand_computation(models, held_out, tmp_path):
    rows = held_out + [{"id": "x1", "text": "Unknown source here.", "source": "wiki"},
                       {"id": "x2", "text": "by SP string", "source": "<CODE>"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    res = label("--model", models["bert"], "--input", inp, "--out", tmp_path / "o.jsonl", "--source-field", "source",
                "--eval", "--top-k", 2)
    out = read_jsonl(tmp_path / "o.jsonl")
    ev = json.loads((tmp_path / "o.eval" / "eval.json").read_text())
    assert "1 rows name a source the model does not know (wiki)" in res.stderr
    assert ev["unknown_sources"] == {"wiki": 1}
    known = [r for r in out if r["source"] != "wiki"]
    true = [r["source"] if r["source"] != "<CODE>" else "code" for r in known]
    pred = [r["sp_pred"] for r in known]
    conf = [r["sp_prob"] for r in known]
    n = len(known)
    assert ev["rows"] == n and ev["accuracy"] == pytest.approx(sum(t == p for t, p in zip(true, pred)) / n)
    assert ev["topk_accuracy"] == pytest.approx(
        sum(t in [x["source"] for x in r["sp_topk"]] for t, r in zip(true, known)) / n)
    assert ev["confusion"] == [[sum(t == a and p == b for t, p in zip(true, pred)) for b in SOURCES] for a in SOURCES]
    for s, per in zip(SOURCES, ev["per_source"]):
        tp = sum(t == s and p == s for t, p in zip(true, pred))
        npred, support = pred.count(s), true.count(s)
        assert per["source"] == s and per["support"] == support and per["predicted"] == npred
        assert per["precision"] == (pytest.approx(tp / npred) if npred else None)
        assert per["recall"] == pytest.approx(tp / support)
    ece = 0.0
    for b in range(15):
        inside = [i for i in range(n) if b / 15 < conf[i] <= (b + 1) / 15]
        if inside:
            acc = sum(true[i] == pred[i] for i in inside) / len(inside)
            ece += len(inside) / n * abs(acc - sum(conf[i] for i in inside) / len(inside))
    assert ev["ece"] == pytest.approx(ece)
    assert f"accuracy {ev['accuracy']:.4f}" in res.stdout and "confusion" in res.stdout
    for s in SOURCES:
        assert s in res.stdout
    png = (tmp_path / "o.eval" / "confusion.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "o.eval" / "confusion.png").shape[2] in (3, 4)
    # --eval-out elsewhere
    label("--model", models["bert"], "--input", inp, "--out", tmp_path / "o2.jsonl", "--source-field", "source",
          "--eval", "--eval-out", tmp_path / "ev", "-q")
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["confusion"] == ev["confusion"]


def test_evaluate_on_a_worked_example():
    from sptok.label.evaluate import evaluate, format_report

    probs = np.array([[0.95, 0.05], [0.35, 0.65], [0.15, 0.85], [0.75, 0.25]])
    ev = evaluate(["a", "b"], np.array([0, 0, 1, 1]), probs)       # predicted a, b, b, a
    assert ev["accuracy"] == 0.5 and ev["confusion"] == [[1, 1], [1, 1]]
    assert [(p["precision"], p["recall"], p["f1"]) for p in ev["per_source"]] == [(0.5, 0.5, 0.5)] * 2
    # one row per bin: |1 - .95| + |0 - .65| + |1 - .85| + |0 - .75|, over 4 rows
    assert ev["ece"] == pytest.approx((0.05 + 0.65 + 0.15 + 0.75) / 4)
    ev = evaluate(["a", "b", "c"], np.array([0, 0]), np.array([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]]))
    assert ev["per_source"][1] == {"source": "b", "precision": None, "recall": None, "f1": None, "support": 0,
                                   "predicted": 0}
    assert ev["ece"] == pytest.approx(0.4) and "-" in format_report(ev)


# ------------------------------------------------------------------------------------------------ errors

def test_user_errors_are_one_message(models, held_out, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", held_out[:3])
    m, o = models["bert"], tmp_path / "o.jsonl"
    fails("--model", tmp_path / "nope", "--input", good, "--out", o, match="no such directory")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text('{"model_type": "bert"}')
    fails("--model", tmp_path / "plain", "--input", good, "--out", o, match="no sptok.json, so this is not a model "
                                                                           "exported by sptok")
    fails("--model", m, "--input", tmp_path / "missing.jsonl", "--out", o, match="missing.jsonl: no such file")
    fails("--model", m, "--input", tmp_path / "data.txt", "--out", o, match="cannot tell the format")
    fails("--model", m, "--input", good, "--out", o, "--text-field", "body",
          match="good.jsonl line 1: no field 'body' (--text-field)")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": "b"\n')
    fails("--model", m, "--input", bad, "--out", o, match="bad.jsonl line 3: malformed JSON")
    bad.write_text('{"text": "a"}\n[1, 2]\n')
    fails("--model", m, "--input", bad, "--out", o, match="bad.jsonl line 2: expected a JSON object, got list")
    bad.write_text('{"text": null}\n')
    fails("--model", m, "--input", bad, "--out", o, match="bad.jsonl line 1: field 'text' (--text-field) is null")
    bad.write_bytes(b'{"text": "\xff"}\n')
    fails("--model", m, "--input", bad, "--out", o, match="bad.jsonl line 1: not UTF-8")
    import gzip

    lines = b"".join(b'{"text": "%d"}\n' % (i * 7919 % 100003) for i in range(2000))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines)[:3000])
    fails("--model", m, "--input", tmp_path / "cut.jsonl.gz", "--out", o, match="cut.jsonl.gz after line")
    fails("--model", m, "--input", tmp_path, "--out", o, "--input-format", "jsonl", match="a directory")
    (tmp_path / "empty.jsonl").write_text("\n")
    fails("--model", m, "--input", tmp_path / "empty.jsonl", "--out", o, match="no rows to label")
    (tmp_path / "bad.csv").write_text("text,source\nhello,code\na,b,c\n")
    fails("--model", m, "--input", tmp_path / "bad.csv", "--out", o, match="bad.csv line 3: 3 cells, the header has 2")
    (tmp_path / "bad.parquet").write_text("not parquet")
    fails("--model", m, "--input", tmp_path / "bad.parquet", "--out", o, match="not a readable Parquet file")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    fails("--model", m, "--input", tmp_path / "null.parquet", "--out", o, match="null.parquet row 1: field 'text'")
    fails("--model", m, "--input", good, "--out", o, "--mode", "manual", match="--mode manual needs --source-field")
    fails("--model", m, "--input", good, "--out", o, "--mode", "random", "--seed", "-1", "--no-predict",
          match="--seed: must be an integer from 0 to 2**64 - 1")   # was numpy's OverflowError
    fails("--model", m, "--input", good, "--out", o, "--eval", match="--eval needs --source-field")
    fails("--model", m, "--input", good, "--out", o, "--eval", "--source-field", "source", "--no-predict",
          match="--no-predict skips the model")
    fails("--model", m, "--input", good, "--out", o, "--source-field", "origin", "--eval",
          match="good.jsonl line 1: no field 'origin' (--source-field)")
    unknown = write_jsonl(tmp_path / "unk.jsonl", [{"text": "a", "source": "code"}, {"text": "b", "source": "wiki"}])
    fails("--model", m, "--input", unknown, "--out", o, "--mode", "manual", "--source-field", "source",
          match="unk.jsonl line 2: source 'wiki' (--source-field source) is not one of the model's sources")
    fails("--model", m, "--input", write_jsonl(tmp_path / "w.jsonl", [{"text": "a", "source": "wiki"}]), "--out", o,
          "--eval", "--source-field", "source", match="no row of")
    fails("--model", m, "--input", good, "--out", o, "--max-tokens", 100, match="--max-tokens 100: the model takes at "
                                                                                 "most 64 positions")
    fails("--model", m, "--input", good, "--out", tmp_path / "o.jsonl.gz", match="compressed output")
    fails("--model", m, "--input", good, "--out", good, match="is the input file")
    # a decoder trained with the SP before the text cannot name a source; an unknown architecture is refused
    dec = tmp_path / "prefix-llama"
    shutil.copytree(models["llama"], dec)
    info = json.loads((dec / "sptok.json").read_text())
    info["options"]["position"] = "prefix"
    (dec / "sptok.json").write_text(json.dumps(info))
    fails("--model", dec, "--input", good, "--out", o, match="a decoder never predicts a document's first token")
    cfg = json.loads((dec / "config.json").read_text())
    (dec / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    fails("--model", dec, "--input", good, "--out", o, match="model type 'gpt2' is not one sptok labels with")
    cut = tmp_path / "cut-model"   # weights cut short (a copy interrupted): was safetensors' traceback
    shutil.copytree(m, cut)
    os.truncate(cut / "model.safetensors", 1000)
    fails("--model", cut, "--input", good, "--out", o, match=f"--model {cut}: cannot load the model weights (")
    config = json.loads((cut / "config.json").read_text())   # a config.json of another size: was torch's
    shutil.copyfile(Path(m) / "model.safetensors", cut / "model.safetensors")   # RuntimeError
    (cut / "config.json").write_text(json.dumps(dict(config, hidden_size=2 * config["hidden_size"])))
    fails("--model", cut, "--input", good, "--out", o, match="cannot load the model weights (Error(s) in loading "
                                                              "state_dict")
    (cut / "config.json").write_text(json.dumps(config))
    (cut / "sptok_train.json").write_text('{"config": 3}')   # was an AttributeError
    fails("--model", cut, "--input", good, "--out", o, match="sptok_train.json: its config is not a mapping")
    # a failure after rows were written leaves neither the output nor a partial file
    many = [{"text": f"row {i}"} for i in range(600)] + [{"txt": "no text"}]
    fails("--model", m, "--input", write_jsonl(tmp_path / "late.jsonl", many), "--out", tmp_path / "late-out.jsonl",
          match="late.jsonl line 601: no field 'text'")
    assert not list(tmp_path.glob("late-out*"))
    assert not o.exists()


def test_a_build_or_a_checkpoint_given_as_model_says_what_to_give_instead(models, held_out, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", held_out[:3])
    o = tmp_path / "o.jsonl"
    build = models["build-prefix"]
    fails("--model", build, "--input", good, "--out", o, match=f"--model {build}: this is an sptok build, not a model")
    root = Path(models["bert"]).parent / "ckpt-bert"
    step = sorted(root.glob("step-*"))[-1]
    for ckpt in (root, step):
        err = fails("--model", ckpt, "--input", good, "--out", o, match=f"this is a training checkpoint, not a model: "
                                                                        f"export it with `sptok export {ckpt} --out DIR`")
        assert "tokenizer.json" not in err
    assert not o.exists()


def test_a_phase_sp_policy_counts_as_training_policy():
    """A model built with msp_prob 0, whose data.sp_policy kept that but one of whose data.phases masked SPs at
    load time, did learn MSP: no warning (the phases' policies are among the ones the training used)."""
    from types import SimpleNamespace

    from sptok.label.table import SPTable, training_warning

    build = SimpleNamespace(options={"msp_prob": 0.0, "insert_prob": 1.0}, sources=["web"],
                            sps=["<WEB>"])   # what the warning reads of sptok.json
    phases = [{"until": 0.5, "sp_policy": None}, {"until": 1.0, "sp_policy": "msp=0.2"}]
    table = SPTable(model_dir="m", spec=build, train={"data": {"sp_policy": "keep", "phases": phases}},
                    model_type="bert")
    assert training_warning(table) is None
    table.train["data"]["phases"][1]["sp_policy"] = None
    assert "trained without masked source prediction" in training_warning(table)

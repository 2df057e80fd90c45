"""The validation split (--holdout / --holdout-docs): disjoint from training, complete, deterministic for
any worker count and partitioning, and a build of its own that the readers, verify and stats know."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from conftest import SOURCES, TOKENIZER, demo_corpus, demo_records, tree_bytes, write_jsonl
from shards import documents, mds_samples

from sptok.build import run_build, run_merge
from sptok.cli import main
from sptok.build.manifest import validate_document

FLAGS = dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=64, msp_prob=0.3, unit_size="4KB")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("holdout")
    demo_corpus(d, (30, 8, 300, 30))
    return d


def build(corpus, out, **flags) -> str:
    out = str(corpus / out)
    if not os.path.exists(os.path.join(out, "sptok.json")):
        run_build(str(corpus / "m.yaml"), out, dict(FLAGS, **flags), log=lambda m: None)
    return out


def docs_of(out: str) -> dict[str, dict[int, list[int]]]:
    """source -> {document key: its tokens} over every sample of a build."""
    return {s: documents(mds_samples(os.path.join(out, s))) for s in SOURCES}


@pytest.fixture(scope="module")
def reference(corpus):
    return docs_of(build(corpus, "whole"))


@pytest.mark.parametrize("rule", [dict(holdout="10%"), dict(holdout_docs=7)])
def test_held_out_documents_never_train_and_nothing_is_lost(corpus, reference, rule):
    out = build(corpus, "split-" + "-".join(map(str, rule.values())), **rule)
    train, val = docs_of(out), docs_of(os.path.join(out, "validation"))
    info = json.load(open(os.path.join(out, "sptok.json")))
    for s in SOURCES:
        assert not set(train[s]) & set(val[s]), s                          # disjoint
        assert {**train[s], **val[s]} == reference[s], s                    # every document, token for token
        assert info["holdout"]["docs"][s] == len(val[s])
        if "holdout_docs" in rule:
            assert len(val[s]) == 7, s
    total = sum(map(len, reference.values()))
    held = sum(map(len, val.values()))
    if "holdout" in rule:
        assert 0.04 * total < held < 0.2 * total
    stats = [json.load(open(os.path.join(d, "stats.json")))["sources"] for d in (out, f"{out}/validation")]
    whole = json.load(open(corpus / "whole" / "stats.json"))["sources"]
    for s in SOURCES:
        for k in ("docs", "text_tokens", "text_chars", "sp_inserted", "sp_masked", "eos_tokens"):
            assert stats[0][s][k] + stats[1][s][k] == whole[s][k], (s, k)
        assert [a + b for a, b in zip(stats[0][s]["doc_length_hist"]["counts"],
                                      stats[1][s]["doc_length_hist"]["counts"])] == \
            whole[s]["doc_length_hist"]["counts"]


@pytest.mark.parametrize("rule", [dict(holdout="10%"), dict(holdout_docs=7)])
def test_the_split_depends_on_the_seed_only(corpus, rule, tmp_path):
    for out, flags in (("w1", dict(rule)), ("w2", dict(rule, workers=2)), ("s1", dict(rule, seed=1))):
        run_build(str(corpus / "m.yaml"), str(tmp_path / out), dict(FLAGS, **flags), log=lambda m: None)
    ref = tree_bytes(tmp_path / "w1")
    assert tree_bytes(tmp_path / "w2") == ref
    parts = [str(tmp_path / f"p{i}") for i in range(2)]
    for i, p in enumerate(parts):
        run_build(str(corpus / "m.yaml"), p, dict(FLAGS, **rule), partition=(i, 2), log=lambda m: None)
    run_merge(parts, str(tmp_path / "merged"))
    assert tree_bytes(tmp_path / "merged") == ref
    held = [set(docs_of(str(tmp_path / d / "validation"))["fortunes"]) for d in ("w1", "s1")]
    assert held[0] != held[1]                                   # another seed, another split


def test_the_validation_split_is_a_build_of_its_own(corpus, tmp_path):
    from sptok.data import open_dataset

    out = build(corpus, "split-10%", holdout="10%")
    info = json.load(open(f"{out}/sptok.json"))
    vinfo = json.load(open(f"{out}/validation/sptok.json"))
    validate_document(info, "sptok.schema.json", "sptok.json")
    validate_document(vinfo, "sptok.schema.json", "validation/sptok.json")
    assert vinfo["parent"] == info["fingerprint"] and vinfo["split"] == "validation"
    assert info["holdout"]["fingerprint"] == vinfo["fingerprint"] != info["fingerprint"]
    assert vinfo["tokenizer"]["sha256"] == info["tokenizer"]["sha256"] and vinfo["sp_table"] == info["sp_table"]
    ds = open_dataset(f"{out}/validation", batch_size=4, shuffle=False, weights=False)
    assert len(list(ds)) == sum(c["samples"] for c in vinfo["counts"].values()) > 0

    def cli(*args):
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        return r.exit_code, r.stdout + r.stderr

    code, text = cli("stats", out)
    assert code == 0 and "validation split: " in text and "(10% of each source) held out" in text
    code, text = cli("stats", f"{out}/validation")
    assert code == 0 and f"this is the validation split of build {info['fingerprint'][:12]}" in text
    code, text = cli("verify", out, "--outputs-only")
    assert code == 0, text
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    shard = next(f for f in sorted(os.listdir(copy / "validation" / "code")) if f.endswith(".zstd"))
    with open(copy / "validation" / "code" / shard, "r+b") as f:
        f.seek(20)
        b = f.read(1)
        f.seek(20)
        f.write(bytes([b[0] ^ 1]))
    code, text = cli("verify", copy, "--outputs-only")
    assert code == 2 and f"validation/code/{shard}: changed" in text


def test_holdout_options_are_checked(corpus, tmp_path):
    from sptok.errors import SptokError

    for flags, match in ((dict(holdout="150%"), "--holdout: must be a fraction between 0 and 1"),
                         (dict(holdout="lots"), "--holdout: 'lots' is not a fraction"),
                         (dict(holdout_docs=0), "--holdout-docs: must be a positive number"),
                         (dict(holdout="1%", holdout_docs=3), "give one of them")):
        with pytest.raises(SptokError, match=match):
            run_build(str(corpus / "m.yaml"), str(tmp_path / "x"), dict(FLAGS, **flags), log=lambda m: None)


def test_a_share_that_holds_out_no_document_of_a_source_stops_the_build(corpus, tmp_path):
    """0.5% of a source of 30 documents is none: the build completed with a validation split that streaming then
    refused to open ("Stream contains no samples"), so in-loop evaluation failed with a traceback."""
    from sptok.errors import SptokError
    from sptok.layout import load_build

    out = str(tmp_path / "x")
    with pytest.raises(SptokError, match="the validation split would hold no document of source 'pydocs' "
                                         r"\(--holdout takes each document by its hash, and took none of its 30\)"):
        run_build(str(corpus / "m.yaml"), out, dict(FLAGS, holdout="0.5%"), log=lambda m: None)
    with pytest.raises(SptokError, match="the build failed: the validation split would hold no document"):
        load_build(out)
    run_build(str(corpus / "m.yaml"), out, dict(FLAGS, holdout_docs=1), log=lambda m: None)   # starts over
    assert json.load(open(f"{out}/validation/sptok.json"))["counts"]["pydocs"]["docs"] == 1


def test_a_validation_split_that_tail_drop_leaves_without_a_sample_is_refused(corpus, tmp_path):
    """One short held-out document, its sample dropped: the split's source had no sample, and could not be read."""
    from sptok.errors import SptokError

    out = str(tmp_path / "x")
    flags = dict(FLAGS, holdout_docs=1, tail="drop", seq_len=4096)
    with pytest.raises(SptokError, match=r"the validation split of source '\w+' fills no sample: its [0-9,]+ tokens "
                                         r"are fewer than one sample of --seq-len 4,096, and --tail drop drops them"):
        run_build(str(corpus / "m.yaml"), out, flags, log=lambda m: None)
    assert not os.path.exists(os.path.join(out, "sptok.json"))
    run_build(str(corpus / "m.yaml"), out, dict(flags, tail="pad"), overwrite=True, log=lambda m: None)
    counts = json.load(open(f"{out}/validation/sptok.json"))["counts"]
    assert all(c["samples"] == 1 for c in counts.values())


def test_a_source_whose_training_documents_tail_drop_leaves_without_a_sample_is_refused(tmp_path):
    """The long document held out, the short one trained on and dropped: the source had no training sample."""
    from sptok.errors import SptokError

    write_jsonl(tmp_path / "two.jsonl", [{"id": "long", "text": "word " * 300}, {"id": "short", "text": "tiny one"}])
    write_jsonl(tmp_path / "big.jsonl", demo_records("fortunes", 100))
    (tmp_path / "m.yaml").write_text("sources:\n  - {name: big, paths: big.jsonl}\n"
                                     "  - {name: two, paths: two.jsonl, id_field: id}\n")
    flags = dict(FLAGS, holdout="50%", tail="drop", seq_len=256, seed=2)
    with pytest.raises(SptokError, match="source 'two' fills no sample: its tokens are fewer than one sample of "
                                         "--seq-len 256, and --tail drop drops them"):
        run_build(str(tmp_path / "m.yaml"), str(tmp_path / "o"), flags, log=lambda m: None)
    assert not (tmp_path / "o" / "sptok.json").exists()


def test_the_readme_reads_training_and_validation_apart(corpus, tmp_path):
    """The README's Parquet / Arrow block, run as written on real builds: training rows are the training
    samples only (not the validation split's too), and the validation split is read on its own."""
    import subprocess
    import sys

    pytest.importorskip("datasets")
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    marker = "<!-- tests/test_holdout.py runs this block"
    assert marker in readme, "the README lost its Parquet / Arrow recipe"
    block = readme.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    want = {}
    for fmt, name in (("parquet", "demo-pq"), ("arrow", "demo-arrow")):
        out = build(corpus, f"readme-{fmt}", format=fmt, holdout_docs=3)
        os.makedirs(tmp_path / "out", exist_ok=True)
        os.symlink(out, tmp_path / "out" / name)
        samples = [sum(c["samples"] for c in json.load(open(f"{d}/sptok.json"))["counts"].values())
                   for d in (out, f"{out}/validation")]
        want[fmt] = samples
    code = block + ("\nimport json\nprint(json.dumps({"
                    "'parquet': [train.num_rows, validation.num_rows, splits['train'].num_rows, "
                    "splits['validation'].num_rows], 'arrow': [train_arrow.num_rows, validation_arrow.num_rows, "
                    "splits_arrow['train'].num_rows, splits_arrow['validation'].num_rows]}))")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    for fmt, (train, validation) in want.items():
        assert validation > 0 and got[fmt] == [train, validation, train, validation], (fmt, got, want)

"""`sptok build --append`: a source added to a complete build, every old file left byte for byte, the new SP after
every old id, the result equal to a one-go build made with its own tokenizer, refusals naming what differs, and
the build's guarantees (resume after a kill, any worker count) kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT, TOKENIZER, build_bytes, demo_records, tree_bytes, write_jsonl
from shards import mds_samples

from sptok.build import run_build
from sptok.build.append import run_append
from sptok.build.manifest import validate_document
from sptok.cli import main
from sptok.errors import SptokError
from sptok.layout import load_build
from sptok.verify import verify_build

OLD = ("pydocs", "code", "fortunes")
FLAGS = dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=64, unit_size="8KB")
# what an append writes again; every other file of the build stays as it was
REWRITTEN = {"sptok.json", "index.json", "stats.json", "validation/sptok.json", "validation/index.json",
             "validation/stats.json"}


def corpus(d: Path) -> Path:
    """Three demo sources and a fourth, `poems` (its SP <POEMS> is not in the demo tokenizer), as JSONL files;
    the manifests m3.yaml (the three) and m4.yaml (the three, then poems). Returns ``d``."""
    for name, n in zip(OLD, (30, 8, 300)):
        write_jsonl(d / f"{name}.jsonl", demo_records(name, n))
    write_jsonl(d / "poems.jsonl", demo_records("chinese", 40))
    line = "  - {{name: {0}, paths: {0}.jsonl, id_field: id}}\n"
    (d / "m3.yaml").write_text("sources:\n" + "".join(line.format(n) for n in OLD))
    (d / "m4.yaml").write_text((d / "m3.yaml").read_text() + line.format("poems"))
    return d


def build(d: Path, out: str, manifest: str = "m3.yaml", append: bool = False, **flags):
    run = run_append if append else run_build
    return run(str(d / manifest), str(d / out), dict(FLAGS, **flags), log=lambda m: None)


@pytest.fixture(scope="module")
def appended(tmp_path_factory):
    """(corpus dir, the 3-source build's files, its sptok.json, the appended build's dir) with a validation split."""
    d = corpus(tmp_path_factory.mktemp("append"))
    build(d, "b", holdout_docs=2)
    before, info = tree_bytes(str(d / "b")), load_build(str(d / "b"))
    res = build(d, "b", "m4.yaml", append=True, holdout_docs=2)
    assert not res.skipped and res.info["appended"] == ["poems"]
    return d, before, info, str(d / "b")


def test_old_files_stay_byte_identical_and_the_new_sp_follows_every_old_id(appended):
    d, before, old, out = appended
    after = tree_bytes(out)
    kept = {p: b for p, b in before.items() if p not in REWRITTEN and not p.split("/")[-2:-1] == ["tokenizer"]}
    assert kept and all(after.get(p) == b for p, b in kept.items()), [p for p, b in kept.items() if after.get(p) != b]
    assert any(p.startswith("pydocs/shard.") for p in kept) and any(p.startswith("validation/code/") for p in kept)
    assert {p for p in after if p.startswith("poems/")} and {p for p in after if p.startswith("validation/poems/")}
    info = load_build(out)
    validate_document(info, "sptok.schema.json", "sptok.json")
    validate_document(load_build(os.path.join(out, "validation")), "sptok.schema.json", "validation/sptok.json")
    assert info["parent"] == old["fingerprint"] and info["fingerprint"] != old["fingerprint"]
    assert info["appended"] == ["poems"] and info["sp_table"][:3] == old["sp_table"]
    new = info["sp_table"][3]
    assert (new["source"], new["source_id"], new["sp"]) == ("poems", 3, "<POEMS>")
    assert new["token_id"] == old["tokenizer"]["vocab_size"] == info["tokenizer"]["vocab_size"] - 1
    assert info["tokenizer"]["base_sha256"] == old["tokenizer"]["base_sha256"]
    stats = json.loads(after["stats.json"])
    assert {n: stats["sources"][n] for n in OLD} == json.loads(before["stats.json"])["sources"]
    assert stats["totals"]["samples"] == sum(s["samples"] for s in stats["sources"].values())
    assert info["holdout"]["docs"] == {n: 2 for n in OLD + ("poems",)}
    rep = verify_build(out)
    assert rep.ok, rep.text()
    assert rep.inputs_checked == 4
    samples = mds_samples(out)    # the real StreamingDataset over the merged index.json
    assert Counter(s["source_id"] for s in samples) == {i: stats["sources"][n]["samples"]
                                                        for i, n in enumerate(OLD + ("poems",))}
    assert not os.path.exists(os.path.join(out, ".sptok"))


def test_it_equals_a_one_go_build_with_its_own_tokenizer_and_a_second_run_is_a_no_op(appended):
    d, _, _, out = appended
    one = build(d, "one", "m4.yaml", holdout_docs=2, tokenizer=os.path.join(out, "tokenizer")).out
    a, b = tree_bytes(out), tree_bytes(one)
    # not sptok.json's lineage, nor the decompressed .mds copies streaming leaves beside the shards it read
    kept = lambda tree: {p: v for p, v in tree.items() if p not in {"sptok.json", "validation/sptok.json"}  # noqa: E731
                         and not p.endswith(".mds")}
    assert kept(a) == kept(b) and len(kept(a)) > 30
    ia, ib = load_build(out), load_build(one)
    for k in ("sp_table", "counts", "inputs", "options", "manifest", "delimiter", "eos", "units"):
        assert ia[k] == ib[k], k
    assert ia["tokenizer"]["sha256"] == ib["tokenizer"]["sha256"]
    res = build(d, "b", "m4.yaml", append=True, holdout_docs=2)
    assert res.skipped and res.info["fingerprint"] == ia["fingerprint"] and tree_bytes(out) == a


def test_show_stats_report_and_the_loader_read_it(appended):
    d, _, _, out = appended
    for cmd in (["show", out], ["stats", out], ["report", out, "--out", str(d / "r.html")]):
        res = CliRunner().invoke(main, cmd, catch_exceptions=False)
        assert res.exit_code == 0, (cmd, res.output)
    pytest.importorskip("streaming")
    from sptok.data import open_dataset

    ds = open_dataset(out, weights=False)
    assert ds.build.sources == list(OLD + ("poems",))
    assert len(ds) == sum(c["samples"] for c in ds.build.raw["counts"].values())
    assert {int(ds[i]["source_id"]) for i in range(len(ds))} == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 3-source build without a split, to refuse appends to (each test works on a copy when it writes)."""
    d = corpus(tmp_path_factory.mktemp("refuse"))
    build(d, "b")
    return d


def _refused(d: Path, match: str, manifest: str = "m4.yaml", out: str = "b", **kw):
    before = tree_bytes(str(d / out)) if (d / out).exists() else None
    with pytest.raises(SptokError, match=match) as e:
        build(d, out, manifest, append=True, **kw)
    assert "\n" not in e.value.message
    if before is not None:
        assert tree_bytes(str(d / out)) == before   # a refused append touches nothing
    return e.value.message


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.replace("code.jsonl, id_field: id", "code.jsonl, id_field: id, weight: 2"),
     r"source 'code' changed: weight 1\.0 -> 2\.0"),
    (lambda m: m.replace("  - {name: code, paths: code.jsonl, id_field: id}\n", ""),
     r"source 'code' of the build was removed"),
    (lambda m: m.replace("pydocs", "TMP").replace("code", "pydocs").replace("TMP", "code"),
     r"source 'pydocs' moved from position 0 to 1"),
])
def test_a_changed_removed_or_reordered_old_source_is_refused(base, edit, match):
    (base / "edited.yaml").write_text(edit((base / "m4.yaml").read_text()))
    message = _refused(base, rf"--append: .*edited\.yaml: {match}; list the build's sources unchanged", "edited.yaml")
    assert "then the new ones" in message


def test_other_options_another_tokenizer_and_changed_inputs_are_refused(base, tmp_path):
    _refused(base, r"--append: other options than the build in .* \(seq_len: 64 -> 128\); an append keeps the "
                   r"build's options", seq_len=128)
    _refused(base, r"--append: other options than the build in .* \(holdout_docs: None -> 2\)", holdout_docs=2)
    other = json.loads((TOKENIZER / "tokenizer.json").read_text())
    other["added_tokens"] = other["added_tokens"][:-1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(other))
    _refused(base, r"--append: --tokenizer .*tokenizer\.json is another tokenizer than the build in .* started "
                   r"from \(sha256 [0-9a-f]{12}, the build's [0-9a-f]{12}, .*\); an append extends the build's own",
             tokenizer=str(tmp_path / "tokenizer.json"))
    # the build's own tokenizer, and none at all, are the build's
    for tok in (str(base / "b" / "tokenizer"), None):
        shutil.rmtree(base / "c", ignore_errors=True)
        shutil.copytree(base / "b", base / "c")
        assert build(base, "c", "m4.yaml", append=True, tokenizer=tok).info["appended"] == ["poems"]
    shutil.copytree(base / "b", base / "touched")
    st = os.stat(base / "fortunes.jsonl")
    os.utime(base / "fortunes.jsonl", ns=(1, 1))
    try:
        _refused(base, r"--append: input files of the build's sources changed since it was built: fortunes\.jsonl; "
                       r"an append leaves the old sources as built", out="touched")
    finally:
        os.utime(base / "fortunes.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns))
        shutil.rmtree(base / "touched")


def test_the_base_tokenizer_is_known_by_its_bytes_alone(base, monkeypatch):
    """--tokenizer naming the tokenizer the build started from is recognised by its file's sha256: it is not read
    as a tokenizer once more to be compared (a 128K vocabulary takes a fraction of a second to read)."""
    import sptok.build.append as append

    read = []
    monkeypatch.setattr(append, "load_tokenizer", lambda p, real=append.load_tokenizer: read.append(p) or real(p))
    shutil.copytree(base / "b", base / "d")
    try:
        assert build(base, "d", "m4.yaml", append=True).info["appended"] == ["poems"]
    finally:
        shutil.rmtree(base / "d")
    assert read == []


def test_no_complete_build_a_partition_overwrite_or_misplaced_names_are_refused(base, tmp_path):
    _refused(base, r"--append needs a complete build in --out: .*nowhere: no such build directory", out="nowhere")
    with pytest.raises(SptokError, match=r"--append with --partition: an append runs on one machine"):
        run_append(str(base / "m4.yaml"), str(base / "b"), dict(FLAGS), partition=(0, 2))
    with pytest.raises(SptokError, match=r"--append and --overwrite: give one"):
        run_append(str(base / "m4.yaml"), str(base / "b"), dict(FLAGS), overwrite=True)
    d = corpus(tmp_path)
    build(d, "m", policy="misplaced")
    _refused(d, r"--append: with the new sources, --policy misplaced names source '\w+' <\w+>, not <\w+> as in the "
                r"build; an append keeps every SP", out="m", policy="misplaced")
    res = CliRunner().invoke(main, ["build", str(base / "m4.yaml"), "--out", str(base / "b"), "--append",
                                    "--seq-len", "32"])
    assert res.exit_code == 2 and res.output.startswith("error: --append: other options") and \
        res.output.count("\n") == 1, res.output


def test_an_appended_build_takes_another_append(base):
    shutil.copytree(base / "b", base / "twice")
    first = build(base, "twice", "m4.yaml", append=True).info
    before = tree_bytes(str(base / "twice"))
    write_jsonl(base / "quotes.jsonl", demo_records("fortunes", 500)[300:])
    (base / "m5.yaml").write_text((base / "m4.yaml").read_text() + "  - {name: quotes, paths: quotes.jsonl, "
                                                                   "id_field: id}\n")
    info = build(base, "twice", "m5.yaml", append=True).info
    assert info["parent"] == first["fingerprint"] and info["appended"] == ["quotes"]
    assert [e["token_id"] for e in info["sp_table"][3:]] == [first["tokenizer"]["vocab_size"] - 1,
                                                             first["tokenizer"]["vocab_size"]]
    after = tree_bytes(str(base / "twice"))
    assert all(after[p] == b for p, b in before.items() if p not in REWRITTEN and not p.startswith("tokenizer/"))
    assert verify_build(str(base / "twice")).ok


def test_an_append_whose_new_source_gives_no_document_says_how_to_go_on(base):
    """Not "incomplete: run the same command again" (it fails again), nor a plain build (it refuses to resume)."""
    shutil.copytree(base / "b", base / "blank")
    before = tree_bytes(str(base / "blank"))
    (base / "blank.jsonl").write_text('{"text": "  "}\n' * 2000)   # several units, not one document
    (base / "mb.yaml").write_text((base / "m3.yaml").read_text() + "  - {name: blank, paths: blank.jsonl}\n")
    way_out = f"for an append, that is `sptok build MANIFEST --out {base / 'blank'} --append` with the fixed"
    with pytest.raises(SptokError, match="source 'blank' produced no documents") as e:
        build(base, "blank", "mb.yaml", append=True)
    assert way_out in e.value.message
    with pytest.raises(SptokError, match="an append to the build failed: source 'blank' produced no documents") as e:
        load_build(str(base / "blank"))
    assert way_out in e.value.message
    assert build(base, "blank", "m3.yaml", append=True).skipped   # given up: the build as it was
    assert tree_bytes(str(base / "blank")) == before


def test_the_manifest_as_built_is_a_no_op(base):
    before = tree_bytes(str(base / "b"))
    assert build(base, "b", "m3.yaml", append=True).skipped
    assert tree_bytes(str(base / "b")) == before


ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_a_killed_append_resumes_to_the_bytes_of_one_run_whatever_the_workers(tmp_path):
    """Killed once a unit of the new source is committed, the build reads as incomplete (never complete with a mix);
    the same command, with 2 workers, finishes it with the bytes of an uninterrupted 1-worker append."""
    d = corpus(tmp_path)
    write_jsonl(d / "poems.jsonl", demo_records("chinese"))   # enough units to be caught in the middle
    build(d, "ref")
    shutil.copytree(d / "ref", d / "b")
    shutil.copytree(d / "ref", d / "joining")
    build(d, "ref", "m4.yaml", append=True)
    old = tree_bytes(str(d / "b"))
    units = d / "b" / ".sptok" / "append" / ".sptok" / "units"
    kill_append(d / "b", lambda: units.is_dir() and any((u / "result.json").exists() for u in units.iterdir()),
                "--encoder", "hf")
    left = tree_bytes(str(d / "b"))
    assert "sptok.json" not in left and ".sptok/parent/sptok.json" in left
    assert all(left[p] == b for p, b in old.items() if p != "sptok.json")   # nothing old was touched
    with pytest.raises(SptokError, match=r"the build is incomplete \(no sptok.json\); run the same `sptok build` "):
        load_build(str(d / "b"))
    with pytest.raises(SptokError, match=r"cannot resume: .*run the original command to finish it"):
        build(d, "b", "m4.yaml")   # a plain build does not take the append over
    shutil.copytree(d / "b", d / "given-up")
    assert build(d, "given-up", "m3.yaml", append=True).skipped   # the build's own manifest gives the append up
    assert tree_bytes(str(d / "given-up")) == old
    logs = []
    res = run_append(str(d / "m4.yaml"), str(d / "b"), dict(FLAGS, workers=2, quiet=False), log=logs.append)
    assert any(m.startswith("resuming: ") for m in logs), logs
    assert res.info["appended"] == ["poems"] and res.committed == res.total_units > 1
    assert build_bytes(str(d / "b")) == build_bytes(str(d / "ref"))
    assert verify_build(str(d / "b")).ok
    # killed once the new source is complete apart (the kill lands before or in the join): the same bytes
    kill_append(d / "joining", lambda: (d / "joining" / ".sptok" / "append" / "sptok.json").exists())
    try:
        assert load_build(str(d / "joining"))["parent"]   # the join was over
    except SptokError as e:
        assert "the build is incomplete" in e.message
    build(d, "joining", "m4.yaml", append=True, workers=2)
    assert build_bytes(str(d / "joining")) == build_bytes(str(d / "ref"))


def kill_append(out: Path, when, *extra) -> None:
    """Run the append of m4.yaml to ``out`` in a child process and kill it (SIGKILL) as soon as ``when()``."""
    args = [sys.executable, "-m", "sptok", "build", out.parent / "m4.yaml", "--out", out, "--append", "--workers",
            "1", "--quiet", "--tokenizer", TOKENIZER, "--seq-len", "64", "--unit-size", "8KB", *extra]
    proc = subprocess.Popen(list(map(str, args)), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not when():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.001)
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_pretrain_trains_on_every_source_of_an_appended_build(appended, tmp_path):
    pytest.importorskip("torch")
    from sptok.train.config import load_config
    from sptok.train.loop import pretrain

    _, _, _, out = appended
    doc = {"model": {"family": "bert", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
           "data": {"build": out, "num_workers": 0}, "optim": {"lr": 3e-3, "warmup_steps": 2},
           "train": {"steps": 8, "global_batch_size": 8, "micro_batch_size": 8},
           "log": {"dir": str(tmp_path / "log"), "every": 1, "tensorboard": False},
           "checkpoint": {"dir": str(tmp_path / "ckpt")}}
    recs = pretrain(load_config(None, [], base=doc), log=lambda m: None)
    assert len(recs) == 8 and all(r["loss"] > 0 for r in recs)
    assert all(any(r["loss_by_source"][k] is not None for r in recs) for k in range(4))   # poems, appended, too


def test_a_metadata_build_takes_a_source_with_metadata_and_one_without_none(tmp_path):
    d = corpus(tmp_path)
    build(d, "meta", metadata="url:host")
    before = tree_bytes(str(d / "meta"))
    info = build(d, "meta", "m4.yaml", append=True, metadata="url:host").info
    assert set(info["options"]["metadata"]) == set(OLD) | {"poems"}
    after = tree_bytes(str(d / "meta"))
    kept = [p for p in before if p not in REWRITTEN and not p.startswith("tokenizer/")]
    assert any(p.startswith("pydocs/shard.") for p in kept) and all(after[p] == before[p] for p in kept)
    assert verify_build(str(d / "meta")).ok
    spans = [s["meta_spans"] for s in mds_samples(str(d / "meta" / "poems"))]
    assert any(len(x) for x in spans)        # the new source's documents carry their host too
    _refused(d, r"--append: other metadata options for source '\w+' than the build in .*"
                r"an append keeps the build's options", out="meta", metadata="topic")
    build(d, "plain")
    _refused(d, r"--append: source 'pydocs' would get metadata, but the build in .* has none: its shards have no "
                r"meta_spans column", out="plain", metadata="url:host")


def test_an_append_of_one_unit_starts_no_worker_process(tmp_path):
    """What the new sources need decides the pool, as for a build: one unit of new input holds every new record,
    so the append runs in this process whatever --workers says (the build of the old sources had workers)."""
    import subprocess
    import sys

    d = corpus(tmp_path)
    build(d, "b", workers=2, unit_size="64MB")
    code = (f"import sys; from sptok.build.append import run_append; run_append({str(d / 'm4.yaml')!r}, "
            f"{str(d / 'b')!r}, dict(tokenizer={str(TOKENIZER)!r}, quiet=True, workers=2, seq_len=64, "
            f"unit_size='64MB'), log=lambda m: None); print('concurrent.futures.process' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split()[-1] == "False", r.stdout
    assert load_build(str(d / "b"))["appended"] == ["poems"]

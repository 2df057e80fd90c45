"""`sptok verify`: a tampered shard, data file or tokenizer and a changed, touched, missing or new input are
caught and named; `--hash-inputs` fingerprints inputs by content and is part of the build's identity."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from conftest import TOKENIZER, small_sources

from sptok.build import run_build
from sptok.cli import main
from sptok.errors import SptokError
from sptok.build.manifest import validate_document


def sptok(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def verify(out, *extra):
    return sptok("verify", out, *extra)


def _build(m, out, **flags):
    flags = dict(dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=64), **flags)
    return run_build(str(m), str(out), flags, log=lambda m: None).info


def _flip(path, at: int | None = None) -> None:
    data = bytearray(open(path, "rb").read())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    open(path, "wb").write(bytes(data))


@pytest.fixture
def built(tmp_path, manifest, small_corpus):
    m = manifest(small_sources(tmp_path))
    return m, str(tmp_path / "out")


def test_a_fresh_build_verifies(built):
    m, out = built
    _build(m, out)
    code, stdout, stderr = verify(out)
    assert code == 0, stderr
    assert stdout.startswith(f"ok: {out} (fingerprint ") and "4 input files (size + mtime) match the build" in stdout
    code, stdout, _ = verify(out, "--json")
    rep = json.loads(stdout)
    assert code == 0 and rep["ok"] and rep["problems"] == [] and rep["inputs_checked"] == 4
    assert rep["outputs_checked"] == sum(len(json.load(open(f"{out}/{s}/index.json"))["shards"])
                                         for s in ("pydocs", "code", "fortunes", "chinese")) + 1   # + tokenizer


def test_tampered_mds_shard_is_named(built):
    m, out = built
    _build(m, out)
    _flip(f"{out}/code/shard.00000.mds.zstd")
    code, stdout, stderr = verify(out)
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    assert stderr.startswith(f"error: {out} (fingerprint ") and "1 problem" in stderr
    assert "shard     code/shard.00000.mds.zstd: changed: xxh64 " in stderr
    assert "differs from code/index.json's" in stderr
    code, stdout, _ = verify(out, "--json")
    rep = json.loads(stdout)
    assert code == 2 and not rep["ok"]
    assert [(p["kind"], p["path"], p["what"]) for p in rep["problems"]] == [("shard", "code/shard.00000.mds.zstd",
                                                                             "changed")]


def test_a_build_that_was_read_still_verifies(built):
    """Reading an MDS build (as the README shows) makes streaming decompress each shard beside it; verify
    knows those copies, checks them against the index too, and names a changed one."""
    from sptok.data import open_dataset

    m, out = built
    _build(m, out)
    ds = open_dataset(out, batch_size=8, shuffle=True)
    assert sum(1 for _ in ds) == len(ds) > 0
    del ds
    copies = sorted(f"{s}/{f}" for s in ("pydocs", "code", "fortunes", "chinese") for f in os.listdir(f"{out}/{s}")
                    if f.endswith(".mds"))
    assert copies, "streaming decompressed no shard: the test would prove nothing"
    code, stdout, stderr = verify(out, "--outputs-only")
    assert code == 0, stderr
    shards = sum(len(json.load(open(f"{out}/{s}/index.json"))["shards"]) for s in ("pydocs", "code", "fortunes",
                                                                                   "chinese"))
    assert f"{shards + len(copies) + 1} output files" in stdout   # zstd shards, their copies, the tokenizer
    _flip(f"{out}/{copies[0]}")
    code, _, stderr = verify(out, "--outputs-only")
    assert code == 2 and f"{copies[0]}: changed: " in stderr and "decompressed copy" in stderr
    assert "1 problem" in stderr


def test_missing_and_unlisted_shards_and_a_changed_tokenizer(built):
    m, out = built
    _build(m, out)
    os.remove(f"{out}/pydocs/shard.00000.mds.zstd")
    shutil.copy(f"{out}/code/shard.00000.mds.zstd", f"{out}/code/shard.00099.mds.zstd")
    tok = json.load(open(f"{out}/tokenizer/tokenizer.json"))
    tok["added_tokens"][-1]["content"] = "<OTHER>"
    json.dump(tok, open(f"{out}/tokenizer/tokenizer.json", "w"))
    code, _, err = verify(out, "--outputs-only")
    assert code == 2
    assert "pydocs/shard.00000.mds.zstd: missing: listed in pydocs/index.json, not on disk" in err
    assert "code/shard.00099.mds.zstd: unlisted" in err
    assert "tokenizer/tokenizer.json: changed: sha256" in err
    assert "input" not in err.split("\n", 1)[1]   # --outputs-only


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_tampered_table_file_is_named(built, fmt):
    m, out = built
    _build(m, out, format=fmt)
    files = json.load(open(f"{out}/fortunes/_files.json"))
    validate_document(files, "files.schema.json", "_files.json")
    assert [f["basename"] for f in files["files"]] == sorted(x for x in os.listdir(f"{out}/fortunes")
                                                            if x.startswith("data-"))
    assert verify(out)[0] == 0
    _flip(f"{out}/fortunes/data-00000.{fmt}", at=100)
    code, _, err = verify(out)
    assert code == 2 and f"shard     fortunes/data-00000.{fmt}: changed: xxh64 " in err
    assert "differs from fortunes/_files.json's" in err


def test_changed_touched_missing_and_new_inputs_are_named(tmp_path, manifest, small_corpus):
    (tmp_path / "more").mkdir()
    shutil.copy(tmp_path / "code.jsonl", tmp_path / "more" / "a.jsonl")
    srcs = small_sources(tmp_path) + [{"name": "more", "paths": "more/*.jsonl", "id_field": "id"}]
    out = tmp_path / "out"
    _build(manifest(srcs), out)
    assert verify(out)[0] == 0
    with open(tmp_path / "code.jsonl", "a") as f:                 # a line appended
        f.write(json.dumps({"id": "new", "text": "one more document"}) + "\n")
    st = os.stat(tmp_path / "pydocs.jsonl")                       # touched: same bytes, newer mtime
    os.utime(tmp_path / "pydocs.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.remove(tmp_path / "chinese.jsonl")                         # gone
    shutil.copy(tmp_path / "code.jsonl", tmp_path / "more" / "b.jsonl")   # the glob now matches one more
    code, stdout, err = verify(out)
    assert code == 2 and stdout == ""
    lines = err.splitlines()
    assert any(x.strip().startswith("input     code.jsonl: changed: size ") for x in lines), err
    assert any(x.strip().startswith("input     pydocs.jsonl: changed: modified ") and "same size" in x
               for x in lines), err
    assert any(x.strip().startswith("input     chinese.jsonl: missing: ") for x in lines), err
    assert any(x.strip().startswith("input     more/b.jsonl: new: now matched by the paths of source 'more'") for x in lines), err
    assert "fortunes.jsonl" not in err and "more/a.jsonl" not in err   # unchanged files are not named
    rep = json.loads(verify(out, "--json")[1])
    assert sorted((p["path"], p["what"]) for p in rep["problems"] if p["kind"] == "input") == [
        ("chinese.jsonl", "missing"), ("code.jsonl", "changed"), ("more/b.jsonl", "new"), ("pydocs.jsonl", "changed")]


def test_inputs_dir_after_the_corpus_moved(tmp_path, manifest, small_corpus):
    m = manifest(small_sources(tmp_path))
    out = tmp_path / "out"
    _build(m, out)
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in os.listdir(tmp_path):
        if name.endswith((".jsonl", ".yaml")):
            shutil.copy2(tmp_path / name, moved / name)            # copy2 keeps mtimes
            os.remove(tmp_path / name)
    code, _, err = verify(out)
    assert code == 2 and "input     code.jsonl: missing" in err
    code, stdout, err = verify(out, "--inputs", moved)
    assert code == 0, err


def test_hash_inputs_compares_content(tmp_path, manifest, small_corpus):
    m = manifest(small_sources(tmp_path))
    out = tmp_path / "out"
    info = _build(m, out, hash_inputs=True)
    validate_document(info, "sptok.schema.json", "sptok.json")
    assert info["options"]["hash_inputs"] is True
    assert all(r[2].startswith("xxh64:") and len(r[2]) == 22 for r in info["inputs"])
    p = tmp_path / "fortunes.jsonl"
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # touched only: the content is the same
    code, stdout, err = verify(out)
    assert code == 0 and "(xxh64 of the content)" in stdout, err
    data = p.read_bytes()
    i = data.index(b'"text": "') + 9
    p.write_bytes(data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:])   # one letter's case: same size
    assert os.path.getsize(p) == st.st_size
    code, _, err = verify(out)
    assert code == 2 and "input     fortunes.jsonl: changed: content xxh64:" in err and "size" not in err


def test_hash_inputs_is_part_of_the_identity(tmp_path, manifest, small_corpus):
    m = manifest(small_sources(tmp_path))
    out = str(tmp_path / "out")
    flags = dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=64, unit_size="4KB")
    run_build(str(m), out, flags, partition=(0, 2), log=lambda m: None)           # "interrupted"
    with pytest.raises(SptokError, match="cannot resume: the --hash-inputs option changed"):
        run_build(str(m), out, dict(flags, hash_inputs=True), log=lambda m: None)
    a = run_build(str(m), out, flags, log=lambda m: None).info
    with pytest.raises(SptokError, match="already holds a complete build .*the --hash-inputs option changed"):
        run_build(str(m), out, dict(flags, hash_inputs=True), log=lambda m: None)
    b = run_build(str(m), str(tmp_path / "h"), dict(flags, hash_inputs=True), log=lambda m: None).info
    assert a["fingerprint"] != b["fingerprint"] and a["counts"] == b["counts"]
    # the manifest's build: section may ask for it too
    m2 = manifest(small_sources(tmp_path), name="h.yaml", hash_inputs=True)
    c = run_build(str(m2), str(tmp_path / "h2"), flags, log=lambda m: None).info
    assert c["options"]["hash_inputs"] is True and c["inputs"] == b["inputs"]


def test_cli_flag_and_errors(tmp_path, manifest, small_corpus):
    m = manifest(small_sources(tmp_path))
    code, _, err = sptok("build", m, "--out", tmp_path / "o", "--tokenizer", TOKENIZER, "--quiet", "--workers", "1",
                         "--seq-len", "64", "--hash-inputs")
    assert code == 0, err
    assert json.load(open(tmp_path / "o" / "sptok.json"))["options"]["hash_inputs"] is True
    code, _, err = verify(tmp_path / "nothing")
    assert code == 2 and err == f"error: {tmp_path / 'nothing'}: no such build directory\n"
    (tmp_path / "half" / ".sptok").mkdir(parents=True)
    code, _, err = verify(tmp_path / "half")
    assert code == 2 and "the build is incomplete" in err


def test_a_damaged_index_is_named_not_a_traceback(built):
    m, out = built
    _build(m, out)
    open(f"{out}/fortunes/index.json", "w").write("{not json")
    idx = json.load(open(f"{out}/chinese/index.json"))
    del idx["shards"][0]["zip_data"]["hashes"]
    json.dump(idx, open(f"{out}/chinese/index.json", "w"))
    code, _, err = verify(out, "--outputs-only")
    assert code == 2 and "Traceback" not in err
    assert "index     fortunes/index.json: corrupt: cannot read it" in err
    assert "index     chinese/index.json: corrupt: cannot read it (an entry lacks" in err
    assert "index     index.json: mismatch: the merged index differs" in err


@pytest.fixture
def with_rejects(tmp_path):
    """A build whose one source has 9 bad lines among real documents: (out, its quarantine file)."""
    from conftest import demo_records

    lines = [json.dumps(r) for r in demo_records("fortunes", 30)] + [f'{{"id": "bad{i}", "text": ' for i in range(9)]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "m.yaml").write_text("sources:\n  - {name: s, paths: s.jsonl, id_field: id}\n")
    out = tmp_path / "out"
    _build(tmp_path / "m.yaml", out)
    return str(out), out / "rejects" / "s.jsonl.zst"


def test_rejects_files_are_checked_against_stats(with_rejects):
    """A quarantine file cut short, deleted, replaced by garbage or by a valid file of fewer records is named:
    it must not hide records the build skipped (stats.json records its size and xxh64)."""
    import zstandard

    out, path = with_rejects
    stats = json.load(open(f"{out}/stats.json"))
    assert sum(stats["sources"]["s"]["rejected"].values()) == 9
    assert stats["sources"]["s"]["rejects_file"]["bytes"] == path.stat().st_size
    validate_document(stats, "stats.schema.json", "stats.json")
    code, stdout, stderr = verify(out)
    assert code == 0, stderr
    good = path.read_bytes()
    fewer = zstandard.ZstdCompressor().compress(b"".join(zstandard.ZstdDecompressor().stream_reader(
        good, read_across_frames=True).read().splitlines(keepends=True)[:4]))
    for damaged, what in ((good[:100], "changed"), (None, "missing"), (b"garbage" * 30, "changed"),
                          (fewer, "changed")):
        path.unlink(missing_ok=True)
        if damaged is not None:
            path.write_bytes(damaged)
        code, _, stderr = verify(out, "--outputs-only")
        assert code == 2 and f"rejects   rejects/s.jsonl.zst: {what}: " in stderr, stderr
    # a build before stats.json recorded the file: the count of its records is checked
    del stats["sources"]["s"]["rejects_file"]
    json.dump(stats, open(f"{out}/stats.json", "w"))
    for damaged, why in ((good[:100], "corrupt: unreadable quarantine file (zstd archive ends in the middle"),
                         (b"garbage" * 30, "corrupt: unreadable quarantine file (corrupt zstd data"),
                         (fewer, "mismatch: holds 4 records, stats.json counts 9 rejected records of source 's'")):
        path.write_bytes(damaged)
        code, _, stderr = verify(out, "--outputs-only")
        assert code == 2 and f"rejects/s.jsonl.zst: {why}" in stderr, stderr
    path.write_bytes(good)
    assert verify(out)[0] == 0


def test_a_moved_corpus_is_one_summed_up_line_and_a_hint(tmp_path):
    """Every input gone is one fact: a line with the count and a few names, and one line naming --inputs."""
    from conftest import demo_records

    corpus = tmp_path / "corpus"
    (corpus / "many").mkdir(parents=True)
    for i, r in enumerate(demo_records("fortunes", 40)):
        (corpus / "many" / f"f{i:03}.txt").write_text(r["text"])
    (corpus / "m.yaml").write_text("sources:\n  - {name: many, paths: many}\n")
    out = tmp_path / "out"
    _build(corpus / "m.yaml", out)
    shutil.move(corpus, tmp_path / "moved")
    code, _, err = verify(out)
    lines = err.splitlines()
    assert code == 2 and len(lines) <= 6, err
    assert "  input     40 files missing: many/f000.txt, many/f001.txt, many/f002.txt and 37 more (--json lists " \
           "each)" in lines, err
    assert lines[-1] == (f"hint: 40 of 40 input files are gone from {corpus}; if the corpus moved, pass --inputs DIR, "
                         f"the manifest's directory now"), err
    rep = json.loads(verify(out, "--json")[1])
    assert sum(p["what"] == "missing" for p in rep["problems"]) == 40 and "--inputs DIR" in rep["hint"]
    assert verify(out, "--inputs", tmp_path / "moved")[0] == 0

"""Nothing lost, nothing unaccounted: every bad record of every input format ends in OUT/rejects/<source>.jsonl.zst,
as found, with its reason and location; per source, records in = documents built + records rejected; and
`sptok rejects` lists them."""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from click.testing import CliRunner
from conftest import TOKENIZER, demo_records

from sptok.build import run_build
from sptok.cli import main
from sptok.rejects import raw_bytes, rejects_path

UNIT = 2048   # small units: bad records land in several byte-range units / row groups of one file


def sptok(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def _half(data: bytes, kind: str) -> bytes:
    comp = zstandard.ZstdCompressor().compress(data) if kind == "zst" else gzip.compress(data)
    return comp[: len(comp) // 2]


def _decoded_prefix(cut: bytes, kind: str) -> bytes:
    d = zstandard.ZstdDecompressor().decompressobj() if kind == "zst" else zlib.decompressobj(wbits=47)
    return d.decompress(cut)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text with one bad record of every kind per format; returns (out, expected) where expected maps each
    source to (records in, the rejects it must have: dicts of reason / location / raw bytes)."""
    d = tmp_path_factory.mktemp("bad")
    good = demo_records("fortunes")
    exp = {}

    # JSONL, plain: every kind of bad line, spread over several byte-range units
    bad = [
        ("malformed_json", b'{"id": "broken", "text": "no closing brace"'),
        ("invalid_utf8", b'{"id": "latin1", "text": "caf\xe9"}'),
        ("missing_field", b'{"id": "nofield", "body": "x"}'),
        ("non_string_text", b'{"id": "num", "text": 42}'),
        ("not_an_object", b'["not", "an", "object"]'),
        ("empty_text", b'{"id": "empty", "text": ""}'),
        ("invalid_utf8", b'{"id": "surrogate", "text": "\\ud800 lone"}'),
        ("missing_field", b'{"text": "an id_field is missing"}'),
        ("not_an_object", b'"just a string"'),
    ]
    lines, rejects, k = [], [], 0
    for i, r in enumerate(good[:60]):
        lines.append(json.dumps(r).encode())
        if i % 6 == 5 and k < len(bad):
            lines.append(bad[k][1])
            k += 1
    lines.insert(10, b"")   # a blank line is not a record
    offset = 0
    for n, line in enumerate(lines, 1):
        for reason, raw in bad:
            if line == raw:
                rejects.append({"reason": reason, "file": "bad.jsonl", "line": n, "byte": offset, "raw": raw})
        offset += len(line) + 1
    (d / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    exp["jsonl"] = (sum(1 for x in lines if x.strip()), rejects)

    # JSONL, truncated .zst and .gz: the complete lines before the break are kept, the break is recorded
    data = b"".join(json.dumps(r).encode() + b"\n" for r in good)
    for kind in ("zst", "gz"):
        cut = _half(data, kind)
        (d / f"cut.jsonl.{kind}").write_bytes(cut)
        got = _decoded_prefix(cut, kind)
        complete = got.count(b"\n")
        partial = got[got.rfind(b"\n") + 1:]
        exp[kind] = (complete, [{"reason": "truncated_archive", "file": f"cut.jsonl.{kind}", "line": complete + 1,
                                 "byte": len(got), "raw": partial or None}])

    # plain text files (one document per file)
    t = d / "txt"
    t.mkdir()
    texts = [r["text"] for r in good]
    (t / "a.txt").write_text(texts[0])
    (t / "b.txt").write_bytes(b"ok so far \xff\xfe then not")
    (t / "c.txt").write_bytes(b"")
    whole = "\n\n".join(texts).encode()
    (t / "d.txt.zst").write_bytes(_half(whole, "zst"))
    (t / "e.txt.gz").write_bytes(_half(whole, "gz"))
    # several zstd frames in one file: every frame is read (not only the first)
    (t / "f.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(texts[1].encode()) +
                                  zstandard.ZstdCompressor().compress(texts[2].encode()))
    (t / "g.txt").write_text(texts[3])
    kept = {n: codecs.getincrementaldecoder("utf-8")().decode(_decoded_prefix(_half(whole, k), k))
            for n, k in (("d", "zst"), ("e", "gz"))}
    exp["text"] = (7, [
        {"reason": "invalid_utf8", "file": "txt/b.txt", "byte": 10, "raw": None},
        {"reason": "empty_text", "file": "txt/c.txt", "raw": None},
        {"reason": "truncated_archive", "file": "txt/d.txt.zst", "byte": len(_decoded_prefix(_half(whole, "zst"), "zst")),
         "raw": None},
        {"reason": "truncated_archive", "file": "txt/e.txt.gz", "byte": len(_decoded_prefix(_half(whole, "gz"), "gz")),
         "raw": None},
    ])
    text_chars = len(texts[0]) + len(kept["d"]) + len(kept["e"]) + len(texts[1]) + len(texts[2]) + len(texts[3])

    # Parquet: invalid UTF-8 in a string column, a null, an empty string, a null id; several row groups
    ids, vals, prows = [], [], []
    for i, r in enumerate(good[:40]):
        ids.append(r["id"])
        vals.append(r["text"].encode())
    bad_rows = {7: ("invalid_utf8", b"caf\xe9 au lait"), 15: ("missing_field", None), 23: ("empty_text", b""),
                31: ("missing_field", "id")}
    for row, (reason, raw) in bad_rows.items():
        if raw == "id":
            ids[row] = None
            prows.append({"reason": reason, "file": "bad.parquet", "row": row, "raw": None})
        else:
            vals[row] = raw
            prows.append({"reason": reason, "file": "bad.parquet", "row": row, "raw": raw})
    text_col = pa.array(vals, pa.binary()).view(pa.string())   # a string column holding invalid bytes
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "text": text_col}), d / "bad.parquet",
                   row_group_size=4)
    exp["parquet"] = (40, prows)

    m = d / "m.yaml"
    m.write_text("sources:\n"
                 "  - {name: jsonl, paths: bad.jsonl, id_field: id}\n"
                 "  - {name: zst, paths: cut.jsonl.zst, id_field: id}\n"
                 "  - {name: gz, paths: cut.jsonl.gz, id_field: id}\n"
                 "  - {name: text, paths: txt}\n"
                 "  - {name: parquet, paths: bad.parquet, id_field: id}\n")
    out = str(d / "out")
    info = run_build(str(m), out, dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=64,
                                       unit_size=UNIT), log=lambda m: None).info
    assert info is not None
    return out, exp, text_chars


def _quarantine(out: str, source: str) -> list[dict]:
    with open(rejects_path(out, source), "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    return [json.loads(x) for x in data.splitlines()]


SOURCES = ("jsonl", "zst", "gz", "text", "parquet")


@pytest.mark.parametrize("source", SOURCES)
def test_counts_add_up_per_source(corpus, source):
    """records in = documents built + records rejected (the break of an archive is not a record)."""
    out, exp, _ = corpus
    stats = json.load(open(f"{out}/stats.json"))["sources"][source]
    records_in, rejects = exp[source]
    rejected_records = sum(v for k, v in stats["rejected"].items() if k != "truncated_archive")
    assert stats["records"] == stats["docs"] + rejected_records == records_in
    assert stats["rejected"] == dict(Counter(r["reason"] for r in rejects))
    assert stats["docs"] > 0


@pytest.mark.parametrize("source", SOURCES)
def test_every_reject_is_quarantined_as_found(corpus, source):
    """One quarantined record per rejected item, in input order, with its reason, location and exact bytes."""
    out, exp, _ = corpus
    got = _quarantine(out, source)
    want = exp[source][1]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["source"] == source
        assert {k: g.get(k) for k in w if k != "raw"} == {k: v for k, v in w.items() if k != "raw"}, g
        assert raw_bytes(g) == w["raw"], g
        if w["raw"] is not None and w["reason"] == "invalid_utf8" and b"\\ud800" not in w["raw"]:
            assert "raw_b64" in g and "raw" not in g   # bytes that are not UTF-8 are kept exactly, in base64
        assert g["where"].startswith(w["file"]) and g["detail"]


def test_truncated_text_keeps_what_came_before_the_break(corpus):
    """A truncated .txt.zst / .txt.gz is kept up to the break (a character cut in half is dropped), and a
    file of several zstd frames is read whole."""
    out, _, text_chars = corpus
    stats = json.load(open(f"{out}/stats.json"))["sources"]["text"]
    assert stats["docs"] == 5
    assert stats["text_chars"] == text_chars


def test_stats_command_shows_the_reasons(corpus):
    out = corpus[0]
    code, stdout, _ = sptok("stats", out)
    assert code == 0
    assert "skipped records (see rejects/<source>.jsonl.zst)" in stdout
    assert "parquet: empty_text 1, invalid_utf8 1, missing_field 2" in stdout


# ---------------------------------------------------------------------------------------- sptok rejects

def test_rejects_lists_everything_in_build_order(corpus):
    out, exp, _ = corpus
    code, stdout, stderr = sptok("rejects", out, "--json")
    assert code == 0
    recs = [json.loads(x) for x in stdout.splitlines()]
    assert recs == [r for s in SOURCES for r in _quarantine(out, s)]
    assert len(recs) == sum(len(exp[s][1]) for s in SOURCES)


def test_rejects_text_output_is_short_and_located(corpus):
    out = corpus[0]
    code, stdout, stderr = sptok("rejects", out, "--source", "jsonl", "--reason", "malformed_json")
    assert code == 0
    assert stdout.splitlines()[0].startswith("jsonl  malformed_json  bad.jsonl line ")
    assert '    {"id": "broken", "text": "no closing brace"' in stdout
    assert "1 of 1 rejected records shown" in stderr
    code, stdout, _ = sptok("rejects", out, "--source", "parquet", "--reason", "invalid_utf8")
    assert "bad.parquet row 7" in stdout and r"bytes caf\xe9 au lait" in stdout
    code, stdout, _ = sptok("rejects", out, "--source", "zst")
    head, raw = stdout.splitlines()
    assert "truncated_archive  cut.jsonl.zst line" in head
    assert raw.endswith("more characters)") or len(raw) <= 4 + 120


def test_rejects_filters_and_limit(corpus):
    out, exp, _ = corpus
    code, stdout, stderr = sptok("rejects", out, "--reason", "missing_field", "--reason", "empty_text", "--json")
    recs = [json.loads(x) for x in stdout.splitlines()]
    want = [r for s in SOURCES for r in exp[s][1] if r["reason"] in ("missing_field", "empty_text")]
    assert [(r["source"], r["reason"]) for r in recs] == \
           [(s, r["reason"]) for s in SOURCES for r in exp[s][1] if r["reason"] in ("missing_field", "empty_text")]
    assert len(recs) == len(want)
    code, stdout, stderr = sptok("rejects", out, "--limit", "2")
    total = sum(len(rejects) for _, rejects in exp.values())   # every bad record the corpus was made with
    heads = [line for line in stdout.splitlines() if not line.startswith("    ")]   # one per record shown
    assert code == 0 and len(heads) == 2 and f"2 of {total} rejected records shown" in stderr
    code, stdout, stderr = sptok("rejects", out, "--source", "text", "--source", "gz", "--json")
    assert [json.loads(x)["source"] for x in stdout.splitlines()] == ["gz", "text", "text", "text", "text"]


def test_rejects_errors_name_what_is_valid(corpus, tmp_path):
    out = corpus[0]
    code, _, err = sptok("rejects", out, "--source", "nope")
    assert code == 2 and "no source 'nope'; its sources are: jsonl, zst, gz, text, parquet" in err
    code, _, err = sptok("rejects", out, "--reason", "bogus")
    assert code == 2 and "'bogus' is not a reject reason; the reasons are: malformed_json" in err
    code, _, err = sptok("rejects", tmp_path / "none")
    assert code == 2 and "no such build directory" in err
    (tmp_path / "half" / ".sptok").mkdir(parents=True)
    code, _, err = sptok("rejects", tmp_path / "half")
    assert code == 2 and "the build is incomplete" in err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    code, _, err = sptok("rejects", tmp_path / "foreign")
    assert code == 2 and "not an sptok build" in err and "Traceback" not in err


def test_a_clean_source_has_no_rejects(tmp_path, manifest, small_corpus, build):
    from conftest import small_sources

    out, _ = build(manifest(small_sources(tmp_path)), seq_len=64)
    code, stdout, stderr = sptok("rejects", out)
    assert code == 0 and stdout == "" and "no rejected records" in stderr


def test_a_missing_quarantine_file_is_an_error(corpus, tmp_path):
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(corpus[0], out)
    (out / "rejects" / "parquet.jsonl.zst").unlink()
    code, _, err = sptok("rejects", out, "--source", "parquet")
    assert code == 2 and "parquet.jsonl.zst: missing, but stats.json counts 4 rejected records of source 'parquet'" in err


@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_every_frame_is_read_when_one_ends_on_a_feed_boundary(tmp_path, monkeypatch, kind):
    """Several zstd frames / gzip members, the first ending exactly where a slice fed to the decompressor ends."""
    import io

    from sptok.build import readers

    a, b = b"first frame\n" * 50, b"second frame\n" * 50
    comp = (zstandard.ZstdCompressor().compress if kind == "zst" else gzip.compress)
    first = comp(a)
    monkeypatch.setattr(readers, "FEED_SLICE", len(first))
    dec = readers._Decompressed(io.BytesIO(first + comp(b)), first[:4])
    assert b"".join(dec) == a + b and dec.broken is None


@pytest.mark.parametrize("damage", ["cut", "garbage", "fewer"])
def test_a_damaged_quarantine_file_is_an_error(corpus, tmp_path, damage):
    """A quarantine file cut to 100 bytes, replaced by garbage, or holding fewer records than stats.json counts
    is one error line, not a shorter list ("0 of 9 shown")."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(corpus[0], out)
    path = out / "rejects" / "jsonl.jsonl.zst"
    good = path.read_bytes()
    fewer = zstandard.ZstdCompressor().compress(b"".join(
        json.dumps(r).encode() + b"\n" for r in _quarantine(corpus[0], "jsonl")[:3]))
    path.write_bytes({"cut": good[:100], "garbage": b"garbage" * 30, "fewer": fewer}[damage])
    code, stdout, err = sptok("rejects", out, "--source", "jsonl")
    assert code == 2 and err.startswith(f"error: {path}: ") and err.count("\n") == 1, err
    assert {"cut": "zstd archive ends in the middle of a frame (truncated)", "garbage": "corrupt zstd data",
            "fewer": "holds 3 records, but stats.json counts 9 rejected records of source 'jsonl'"}[damage] in err

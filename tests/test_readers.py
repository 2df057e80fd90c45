"""Readers: byte-range units own every line exactly once; each format yields the same documents."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import demo_records, write_jsonl

from sptok.build.manifest import load_manifest, plan_units
from sptok.build.readers import Rejects, read_unit


def _docs(units, text_field="text", id_field="id"):
    keys, texts, rejects = [], [], Rejects(source="s")
    for u in units:
        for b in read_unit(u, text_field, id_field, rejects, batch_bytes=4096):
            keys += b.keys
            texts += b.texts
    return keys, texts, rejects


@pytest.mark.parametrize("unit_size", [13, 97, 1000, 4096, 1 << 20])
def test_byte_range_units_partition_lines(tmp_path, manifest, unit_size):
    recs = demo_records("fortunes", 300)
    write_jsonl(tmp_path / "f.jsonl", recs)
    m = load_manifest(manifest([{"name": "s", "paths": "f.jsonl", "id_field": "id"}]))
    units = plan_units(m, unit_size)
    size = (tmp_path / "f.jsonl").stat().st_size
    assert len(units) == -(-size // unit_size)
    keys, texts, rejects = _docs(units)
    assert keys == [r["id"] for r in recs]          # every line exactly once, in order
    assert texts == [r["text"] for r in recs]
    assert not rejects.counts


@pytest.mark.parametrize("chunk", [1, 7, 300])
def test_lines_longer_than_a_read_come_whole_from_every_unit_split(tmp_path, manifest, monkeypatch, chunk):
    """Lines spanning many reads (a long document is joined once, when its line ends), a BOM and a last line
    without a newline: every unit split still gives every line exactly once."""
    import sptok.build.readers

    monkeypatch.setattr(sptok.build.readers, "READ_CHUNK", chunk)
    recs = demo_records("fortunes", 60)
    (tmp_path / "f.jsonl").write_bytes(("\ufeff" + "\n".join(json.dumps(r) for r in recs)).encode())
    m = load_manifest(manifest([{"name": "s", "paths": "f.jsonl", "id_field": "id"}]))
    for unit_size in (13, 500, 1 << 20):
        keys, texts, rejects = _docs(plan_units(m, unit_size))
        assert keys == [r["id"] for r in recs] and texts == [r["text"] for r in recs], unit_size
        assert not rejects.counts


def test_line_numbers_are_file_lines_in_later_units(tmp_path, manifest):
    recs = demo_records("fortunes", 200)
    lines = [json.dumps(r) for r in recs]
    lines[150] = '{"id": "bad" "text": 1}'
    (tmp_path / "f.jsonl").write_text("\n".join(lines) + "\n")
    m = load_manifest(manifest([{"name": "s", "paths": "f.jsonl", "id_field": "id"}]))
    _, _, rejects = _docs(plan_units(m, 2000))
    assert rejects.counts == {"malformed_json": 1}
    assert rejects.examples["malformed_json"].startswith("f.jsonl line 151: malformed JSON")


def test_bom_crlf_and_blank_lines(tmp_path, manifest):
    recs = demo_records("fortunes", 5)
    data = "\ufeff" + "\r\n".join(json.dumps(r) for r in recs) + "\r\n\r\n"
    (tmp_path / "f.jsonl").write_bytes(data.encode())
    m = load_manifest(manifest([{"name": "s", "paths": "f.jsonl", "id_field": "id"}]))
    keys, texts, rejects = _docs(plan_units(m, 1 << 20))
    assert texts == [r["text"] for r in recs] and not rejects.counts


def test_whitespace_only_documents_are_empty_in_every_format(tmp_path, manifest):
    """A document of blanks would be just SP, delimiter and EOS: skipped as empty_text, like ""."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["real text", "   \n\t  ", "", "\u3000\u00a0", " padded "]
    write_jsonl(tmp_path / "f.jsonl", [{"text": t} for t in texts])
    pq.write_table(pa.table({"text": texts}), tmp_path / "f.parquet")
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i}.txt").write_text(t)
    for paths in ("f.jsonl", "f.parquet", "txt"):
        m = load_manifest(manifest([{"name": "s", "paths": paths}]))
        _, got, rejects = _docs(plan_units(m, 1 << 20), id_field=None)
        assert got == ["real text", " padded "], paths
        assert rejects.counts == {"empty_text": 3}, paths
        assert "only whitespace" in rejects.examples["empty_text"], paths


def test_key_without_id_field_is_file_and_byte(tmp_path, manifest):
    recs = demo_records("fortunes", 3)
    write_jsonl(tmp_path / "f.jsonl", recs)
    m = load_manifest(manifest([{"name": "s", "paths": "f.jsonl"}]))
    keys, _, _ = _docs(plan_units(m, 1 << 20), id_field=None)
    offsets = np.cumsum([0] + [len(json.dumps(r).encode()) + 1 for r in recs[:-1]])
    assert keys == [f"f.jsonl:{o}" for o in offsets]


def test_parquet_row_groups_become_units(tmp_path, manifest):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = demo_records("fortunes", 100)
    pq.write_table(pa.table({"id": [r["id"] for r in recs], "text": [r["text"] for r in recs]}),
                   tmp_path / "f.parquet", row_group_size=10)
    m = load_manifest(manifest([{"name": "s", "paths": "f.parquet", "id_field": "id"}]))
    units = plan_units(m, 1500)
    assert len(units) > 3
    keys, texts, _ = _docs(units)
    assert keys == [r["id"] for r in recs]


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_one_table_column_in_two_roles(tmp_path, manifest, fmt):
    """text_field, id_field and the metadata field may name one column: Parquet's reader gives it once, and
    reading the columns by position then failed with an IndexError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["one doc", "another doc"], "url": ["https://a.org/x", "https://b.org/y"]})
    path = "t.parquet" if fmt == "parquet" else "t"
    if fmt == "parquet":
        pq.write_table(table, tmp_path / path)
    else:
        import datasets

        datasets.Dataset(table).save_to_disk(str(tmp_path / path))
    m = load_manifest(manifest([{"name": "s", "paths": path, "format": fmt}]))
    units = plan_units(m, 1 << 20)
    keys, texts, _ = _docs(units, id_field="text")
    assert keys == texts == ["one doc", "another doc"]
    batch = next(read_unit(units[0], "url", "url", Rejects(source="s"), meta_field="url"))
    assert batch.keys == batch.texts == batch.meta == ["https://a.org/x", "https://b.org/y"]


def test_zstd_that_opens_with_a_skippable_frame_is_zstd(tmp_path, manifest):
    """``pzstd`` writes a skippable frame before every frame: such a file was read as plain text, every line of
    compressed bytes a reject."""
    import struct

    import zstandard

    recs = demo_records("fortunes", 40)
    frames = []
    for half in (recs[:20], recs[20:]):
        data = b"".join(json.dumps(r).encode() + b"\n" for r in half)
        frames.append(struct.pack("<II", 0x184D2A50, 4) + b"\0\0\0\0" + zstandard.ZstdCompressor().compress(data))
    (tmp_path / "p.jsonl.zst").write_bytes(b"".join(frames))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt.zst").write_bytes(frames[1])
    m = load_manifest(manifest([{"name": "s", "paths": "p.jsonl.zst", "id_field": "id"},
                                {"name": "t", "paths": "txt", "format": "text"}]))
    units = plan_units(m, 1 << 10)
    keys, texts, rejects = _docs([u for u in units if u.source == "s"])
    assert keys == [r["id"] for r in recs] and not rejects.counts
    _, texts, rejects = _docs([u for u in units if u.source == "t"], id_field=None)
    assert texts == ["".join(json.dumps(r) + "\n" for r in recs[20:])] and not rejects.counts


def test_a_dictionary_encoded_text_column_is_text(tmp_path, manifest):
    """A pandas categorical column (Arrow dictionary<string>) was refused as "not a string column"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sptok.build.driver import _probe_sources

    texts = ["alpha beta", "gamma", "alpha beta", None]
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), tmp_path / "c.parquet")
    m = load_manifest(manifest([{"name": "s", "paths": "c.parquet"}]))
    units = plan_units(m, 1 << 20)
    _probe_sources(m, units)   # the schema check made before a build
    _, got, rejects = _docs(units, id_field=None)
    assert got == texts[:3] and rejects.counts == {"missing_field": 1}


def test_parquet_bad_values_and_columns(tmp_path, manifest):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sptok.errors import SptokError

    pq.write_table(pa.table({"text": ["ok", None, ""], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    m = load_manifest(manifest([{"name": "s", "paths": "a.parquet"}]))
    keys, texts, rejects = _docs(plan_units(m, 1 << 20), id_field=None)
    assert texts == ["ok"] and rejects.counts == {"missing_field": 1, "empty_text": 1}
    assert keys == ["a.parquet:0"]
    with pytest.raises(SptokError, match="a.parquet: no column 'body' \\(text_field\\); columns are: text, n"):
        _docs(plan_units(m, 1 << 20), text_field="body", id_field=None)
    with pytest.raises(SptokError, match="column 'n' \\(text_field\\) has type int64, expected a string"):
        _docs(plan_units(m, 1 << 20), text_field="n", id_field=None)


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_a_prefix_read_gives_the_exact_start_of_a_long_record_cut_anywhere(tmp_path, manifest, ensure_ascii):
    """The checks before a build read a prefix of a unit: a record cut there (in an escape, in a character, in
    a surrogate pair) gives the start of its text, exactly, and holds no more than the prefix."""
    from sptok.build.readers import read_prefix

    text = ("line one\n\t\"quoted\" \\ é 中文 😀 " * 400)[:9000]
    (tmp_path / "f.jsonl").write_text(json.dumps({"id": 1, "meta": {"a": [1, "}"]}, "text": text},
                                                 ensure_ascii=ensure_ascii) + "\n" + json.dumps({"text": "next"}))
    (tmp_path / "f.txt").write_text(text)
    for paths in ("f.jsonl", "f.txt"):
        unit = plan_units(load_manifest(manifest([{"name": "s", "paths": paths}])), 1 << 20)[0]
        seen = set()
        for nbytes in range(40, 3000, 7):
            got, whole = read_prefix(unit, "text", None, Rejects(source="s"), nbytes=nbytes)
            assert not whole and len(got) <= 1
            if got:
                assert text.startswith(got[0]) and len(got[0].encode()) <= nbytes, (paths, nbytes)
                seen.add(len(got[0]))
        assert len(seen) > 100, paths   # most cuts tell a text, and a longer one the further they go
    got, whole = read_prefix(unit, "text", None, Rejects(source="s"), nbytes=1 << 20)
    assert got == [text] and whole


def test_a_prefix_read_tells_nothing_it_cannot_see(tmp_path, manifest):
    """A record whose text lies beyond the prefix, or whose prefix is blank, is no document yet and no reject:
    the build decides about it when it reads it whole."""
    from sptok.build.readers import read_prefix

    long = "x" * 5000
    for rec in ({"meta": long, "text": "t"}, {"text": " " * 5000 + "t"}, {"id": [long], "text": "t"}):
        (tmp_path / "f.jsonl").write_text(json.dumps(rec) + "\n")
        unit = plan_units(load_manifest(manifest([{"name": "s", "paths": "f.jsonl"}])), 1 << 20)[0]
        rejects = Rejects(source="s")
        assert read_prefix(unit, "text", None, rejects, nbytes=1000) == ([], False)
        assert not rejects.counts


@pytest.mark.parametrize("unit_size", [13, 97, 1000, 30000])
def test_starts_a_record_is_whether_a_unit_yields_one(tmp_path, manifest, unit_size):
    """A byte range inside one long line starts no record: such units are built without a worker."""
    from sptok.build.readers import starts_a_record

    recs = demo_records("fortunes", 40)
    recs[7]["text"] *= 300   # a line longer than several units
    write_jsonl(tmp_path / "f.jsonl", recs)
    m = load_manifest(manifest([{"name": "s", "paths": "f.jsonl", "id_field": "id"}]))
    units = plan_units(m, unit_size)
    assert [starts_a_record(u) for u in units] == [bool(_docs([u])[0]) for u in units]
    assert unit_size > 1000 or not all(starts_a_record(u) for u in units)


def test_lone_surrogates_are_rejected_however_written(tmp_path, manifest):
    """A lone surrogate, escaped or as raw UTF-8-style bytes (which json.loads lets through), is invalid UTF-8;
    a pair is a character. A text is searched for one only where its line could hold one."""
    lines = [b'{"text": "ok \\ud83d\\ude00 pair"}', b'{"text": "lone \\ud800 escape"}', b'{"text": "lone \\uDBFF"}',
             b'{"text": "lone \xed\xa0\x80 bytes"}', '{"text": "plain é \\u00e9"}'.encode()]
    (tmp_path / "f.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    unit = plan_units(load_manifest(manifest([{"name": "s", "paths": "f.jsonl"}])), 1 << 20)[0]
    quarantined = []
    rejects = Rejects(source="s", sink=quarantined.append)
    texts = [t for b in read_unit(unit, "text", None, rejects) for t in b.texts]
    assert texts == ["ok \U0001F600 pair", "plain é é"]
    assert rejects.counts == {"invalid_utf8": 3}
    assert [r["detail"] for r in quarantined] == ["field 'text' holds a lone surrogate escape (not valid UTF-8)"] * 3
    import base64
    assert [base64.b64decode(r["raw_b64"]) if "raw_b64" in r else r["raw"].encode() for r in quarantined] == lines[1:4]

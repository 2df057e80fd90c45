"""Metadata conditioning at build time (issue 25): each document's own metadata before its text, its positions in
the ``meta_spans`` column, read back by the real StreamingDataset and `datasets`, the same bytes however the build
runs, and one line for each bad input."""

from __future__ import annotations

import json
import os
from urllib.parse import urlsplit

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SOURCES, TOKENIZER, build_bytes, demo_records, small_sources, write_jsonl
from shards import mds_samples, table_samples

from sptok.build import run_build, run_merge
from sptok.build.manifest import validate_document
from sptok.build.metadata import form_value
from sptok.build.options import check_metadata, unescape
from sptok.cli import main
from sptok.errors import SptokError
from sptok.shards import ShardReader, as_arrays
from sptok.sp import SLOT_META, decide, doc_hashes, uniforms

META = dict(metadata="url:host", metadata_template="URL: {}\\n\\n")   # as typed on the command line


def _tok():
    from tokenizers import Tokenizer

    from sptok.build.tokenizer import text_encoder

    return text_encoder(Tokenizer.from_file(str(TOKENIZER / "tokenizer.json")))


def _host(url: str) -> str:
    h = urlsplit(url).hostname
    return h[4:] if h.startswith("www.") else h


def _expected(info, recs_by_source, position, formed, template, max_tokens=64, prob=1.0):
    """Each document's tokens and where its metadata lies in them, computed apart from sptok.build (the
    contract: [SP delim] META text [delim SP] EOS, META the template filled and tokenized on its own)."""
    enc = _tok()
    sp_of = {e["source"]: e["token_id"] for e in info["sp_table"]}
    delim, eos, o = info["delimiter"]["ids"], info["eos"]["id"], info["options"]
    out = {}
    for name, recs in recs_by_source.items():
        h = doc_hashes(name, [str(r["id"]) for r in recs])
        ins = decide(h, o["seed"], o["insert_prob"], o["msp_prob"]).inserted
        drawn = uniforms(h, o["seed"], SLOT_META) < prob
        for r, key, i, d in zip(recs, h, ins, drawn):
            meta = enc.encode(template.replace("{}", formed(r["url"])), add_special_tokens=False).ids[:max_tokens] \
                if d else []
            pre = [sp_of[name]] + delim if i and position in ("prefix", "both") else []
            post = delim + [sp_of[name]] if i and position in ("post", "both") else []
            out[int(key)] = (pre + meta + enc.encode(r["text"], add_special_tokens=False).ids + post + [eos],
                             [(len(pre), len(pre) + len(meta))] if meta else [])
    return out


def documents_and_spans(samples) -> dict[int, tuple[list[int], list[tuple[int, int]]]]:
    """doc key -> (its tokens joined over samples, its metadata spans in those tokens: a span cut by a sample
    edge joined again)."""
    docs: dict[int, tuple[list, list]] = {}
    for s in samples:
        ends = list(s["doc_offsets"][1:]) + [len(s["input_ids"])]
        for start, end, key in zip(s["doc_offsets"], ends, s["doc_keys"]):
            toks, spans = docs.setdefault(int(key), ([], []))
            base = len(toks) - start
            for a, b in s["meta_spans"]:
                if start <= a < end:
                    assert b <= end, "a metadata span crosses into another document"
                    if spans and spans[-1][1] == a + base:     # the rest of a span cut by the sample's edge
                        spans[-1] = (spans[-1][0], b + base)
                    else:
                        spans.append((a + base, b + base))
            toks.extend(s["input_ids"][start:end].tolist())
    return docs


@pytest.mark.parametrize("position", ["prefix", "post", "both"])
def test_roundtrip_through_streaming_dataset(tmp_path, small_corpus, manifest, build, position):
    """Every document reads back as SP + META + text + SP + EOS through the real StreamingDataset, and its
    spans decode to the template filled with the URL's host."""
    out, info = build(manifest(small_sources(tmp_path)), position=position, seq_len=48, insert_prob=0.7, seed=3,
                      **META)
    assert info["options"]["metadata"]["code"] == {"field": "url", "form": "host", "template": "URL: {}\n\n",
                                                    "prob": 1.0, "max_tokens": 64}
    samples = mds_samples(out)
    got = documents_and_spans(samples)
    assert got == {k: (t, s) for k, (t, s) in _expected(info, small_corpus, position, _host, "URL: {}\n\n").items()}
    enc = _tok()
    cut = 0
    for s in samples:
        assert s["meta_spans"].dtype == np.int64 and s["meta_spans"].shape[1] == 2
        for a, b in s["meta_spans"]:
            text = enc.decode(s["input_ids"][a:b].tolist(), skip_special_tokens=False)
            if a > 0 and b < len(s["input_ids"]):
                assert text in ("URL: docs.python.org\n\n", "URL: github.com\n\n", "URL: salsa.debian.org\n\n")
            cut += a == 0 or b == len(s["input_ids"])
    assert cut, "no span was cut by a sample edge: the test would not see one"


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_table_formats_have_the_same_spans(tmp_path, small_corpus, manifest, build, fmt):
    import pyarrow as pa
    import pyarrow.dataset as pads

    m = manifest(small_sources(tmp_path))
    out, info = build(m, out=tmp_path / "t", format=fmt, seq_len=48, **META)
    ref, _ = build(m, out=tmp_path / "m", seq_len=48, **META)
    rows, mds = table_samples(out, fmt), mds_samples(ref)
    assert len(rows) == len(mds) and any(len(r["meta_spans"]) for r in rows)
    for a, b in zip(rows, mds):
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    table = pads.dataset(os.path.join(out, "code"), format="ipc" if fmt == "arrow" else "parquet").to_table()
    assert table.schema.field("meta_spans").type == pa.list_(pa.uint32())
    reader = ShardReader(os.path.join(out, "code"), fmt)   # sptok's own reader (show, report) agrees
    assert np.array_equal(as_arrays(reader[0])["meta_spans"], rows[info["counts"]["pydocs"]["samples"]]["meta_spans"])


def test_builds_without_metadata_are_unchanged(tmp_path, small_corpus, manifest, build):
    """No column, no options key, no stats key; as_arrays gives an empty (0, 2) array; a build with metadata is
    another build (another fingerprint)."""
    m = manifest(small_sources(tmp_path))
    out, info = build(m, out=tmp_path / "plain", seq_len=64)
    assert "metadata" not in info["options"]
    assert "meta_spans" not in json.load(open(os.path.join(out, "code", "index.json")))["shards"][0]["column_names"]
    assert "metadata" not in json.load(open(os.path.join(out, "stats.json")))["sources"]["code"]
    assert as_arrays(ShardReader(os.path.join(out, "code"), "mds")[0])["meta_spans"].shape == (0, 2)
    _, with_meta = build(m, out=tmp_path / "meta", seq_len=64, metadata="url")
    assert with_meta["fingerprint"] != info["fingerprint"]


def test_prob_draw_missing_empty_and_non_string_values(tmp_path, manifest, build):
    """--metadata-prob is a keyed draw; a record without the field or with an empty value has no metadata
    (counted), a non-string value is a reject with its reason; stats.json and its schema say so."""
    recs = demo_records("fortunes", 200)
    for i, r in enumerate(recs):
        if i % 10 == 1:
            del r["topic"]
        elif i % 10 == 2:
            r["topic"] = "  "
        elif i % 10 == 3:
            r["topic"] = 7
    write_jsonl(tmp_path / "f.jsonl", recs)
    with open(tmp_path / "f.jsonl", "ab") as f:   # a lone surrogate: no text for the tokenizer
        f.write(b'{"id": "lone", "text": "a fortune", "topic": "\\ud800"}\n')
    m = manifest([{"name": "fortunes", "paths": "f.jsonl", "id_field": "id"}])
    out, info = build(m, seq_len=64, metadata="topic", metadata_prob=0.5, metadata_max_tokens=2)
    stats = json.load(open(os.path.join(out, "stats.json")))
    validate_document(stats, "stats.schema.json", "stats.json")
    validate_document(info, "sptok.schema.json", "sptok.json")
    s = stats["sources"]["fortunes"]
    meta = s["metadata"]
    assert s["rejected"] == {"non_string_metadata": 20, "invalid_utf8": 1} and s["docs"] == 180
    assert "field 'topic' (metadata) holds int" in s["reject_examples"]["non_string_metadata"]
    kept = [r for r in recs if not isinstance(r.get("topic", ""), int)]
    valued = [r for r in kept if r.get("topic", "").strip()]
    drawn = uniforms(doc_hashes("fortunes", [r["id"] for r in valued]), 0, SLOT_META) < 0.5
    assert (meta["missing"], meta["empty"]) == (20, 20)
    assert (meta["docs"], meta["undrawn"]) == (int(drawn.sum()), int((~drawn).sum()))
    assert 0.3 < drawn.mean() < 0.7
    assert meta["tokens"] <= 2 * meta["docs"] and meta["share"] == pytest.approx(meta["tokens"] / s["sample_tokens"])
    tops = dict(map(tuple, meta["top"]))
    assert meta["distinct"] == len({r["topic"] for r in valued}) and sum(tops.values()) <= len(valued)
    assert tops == {t: sum(r["topic"] == t for r in valued) for t in tops}   # few values: the counts are exact
    spans = np.concatenate([as_arrays(ShardReader(os.path.join(out, "fortunes"), "mds")[i])["meta_spans"]
                            for i in range(info["counts"]["fortunes"]["samples"])])
    assert len(spans) >= meta["docs"] and np.all(np.diff(spans, axis=1) <= 2)   # cut to --metadata-max-tokens


def _bytes(out) -> dict:
    """build_bytes, the validation split's sptok.json less its encoder record too (it copies the build's)."""
    got = build_bytes(out)
    info = json.loads(got["validation/sptok.json"])
    assert info.pop("encoder")
    got["validation/sptok.json"] = json.dumps(info, sort_keys=True).encode()
    return got


def test_same_bytes_for_workers_partitions_resume_and_encoders(tmp_path, small_corpus, manifest, build):
    m = manifest(small_sources(tmp_path))
    flags = dict(seq_len=48, unit_size="2KB", msp_prob=0.3, metadata="url:url", metadata_prob=0.8, holdout="20%")
    ref, info = build(m, out=tmp_path / "ref", **flags)
    assert info["units"] >= 8
    want = _bytes(ref)
    build(m, out=tmp_path / "w2", workers=2, encoder="hf", **flags)
    assert _bytes(tmp_path / "w2") == want
    parts = [str(tmp_path / f"p{i}") for i in range(2)]
    for i, p in enumerate(parts):
        build(m, out=p, partition=(i, 2), **flags)
    run_merge(parts, str(tmp_path / "merged"), log=lambda m: None)
    assert _bytes(tmp_path / "merged") == want
    # a resume: half the units committed by a partition run, the rest by a whole build in the same directory
    build(m, out=tmp_path / "resumed", partition=(1, 2), encoder="hf", **flags)
    logs = []
    run_build(str(m), str(tmp_path / "resumed"), dict(tokenizer=str(TOKENIZER), workers=1, **flags), log=logs.append)
    assert any(line.startswith("resuming:") for line in logs)
    assert _bytes(tmp_path / "resumed") == want


def test_holdout_documents_keep_their_metadata(tmp_path, small_corpus, manifest, build):
    """Validation documents are laid out as training ones, metadata included; both splits add up to the build
    without a split, span for span."""
    m = manifest(small_sources(tmp_path))
    whole, _ = build(m, out=tmp_path / "whole", seq_len=48, **META)
    split, info = build(m, out=tmp_path / "split", seq_len=48, holdout_docs=3, unit_size="2KB", **META)
    ref = documents_and_spans(mds_samples(whole))
    train, val = documents_and_spans(mds_samples(split)), documents_and_spans(mds_samples(f"{split}/validation"))
    assert not train.keys() & val.keys() and {**train, **val} == ref
    assert sum(bool(spans) for _, spans in val.values()) == len(val) == 3 * len(SOURCES)
    vstats = json.load(open(os.path.join(split, "validation", "stats.json")))
    validate_document(vstats, "stats.schema.json", "validation stats.json")
    assert {n: s["metadata"]["docs"] for n, s in vstats["sources"].items()} == dict.fromkeys(SOURCES, 3)
    tstats = json.load(open(os.path.join(split, "stats.json")))["sources"]
    assert all(tstats[n]["metadata"]["docs"] == tstats[n]["docs"] for n in SOURCES)


def test_a_literal_sp_in_a_value_stays_text(tmp_path, manifest, build):
    recs = [{"id": str(i), "text": f"document {i} text", "tag": "<FORTUNES> and <SPSEP>"} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", recs)
    m = manifest([{"name": "fortunes", "paths": "a.jsonl", "id_field": "id"}])
    out, info = build(m, seq_len=16, metadata="tag")
    special = {e["token_id"] for e in info["sp_table"]} | set(info["delimiter"]["ids"])
    for s in mds_samples(out):
        for a, b in s["meta_spans"]:
            assert not special & set(s["input_ids"][a:b].tolist())


def test_forms_and_template_escapes():
    assert form_value("https://www.docs.python.org/3.11/library/os.html", "host") == "docs.python.org"
    assert form_value("https://www.docs.python.org/3.11/library/os.html", "url") == \
        "www.docs.python.org/3.11/library/os.html"
    assert form_value("github.com/python/cpython", "host") == "github.com"
    assert form_value("HTTP://User@Example.ORG:8080/x", "host") == "example.org"
    assert form_value(" art ", "value") == "art" and form_value("no host here", "host") == "no host here"
    assert form_value("http://[::1", "host") == ""
    assert unescape(r"URL: {}\n\t\\n") == "URL: {}\n\t\\n"
    assert check_metadata({"field": "url"}, "x") == {"field": "url", "form": "value", "template": "{}\n\n",
                                                     "prob": 1.0, "max_tokens": 64}


@pytest.mark.parametrize("args, message", [
    (["--metadata", "url:hostname"], "error: --metadata: form 'hostname' (metadata of source 'pydocs') is not one of "
                                     "value, host, url"),
    (["--metadata", "url", "--metadata-template", "URL: "], "error: --metadata-template: 'URL: ' (metadata of source "
                                                            "'pydocs') must hold {} exactly once"),
    (["--metadata", "url", "--metadata-template", "{}{}"], "must hold {} exactly once"),
    (["--metadata", "url", "--metadata-prob", "1.5"], "error: --metadata-prob: must be a probability in [0, 1]"),
    (["--metadata", "url", "--metadata-max-tokens", "0"], "error: --metadata-max-tokens: must be a positive number"),
    (["--metadata-prob", "0.5"], "error: --metadata-prob: no source has a metadata field; give --metadata"),
    (["--metadata", "nowhere"], "error: source 'pydocs': no record has the metadata field 'nowhere'; set "
                                "metadata.field to a field its records have"),
])
def test_bad_metadata_input_is_one_line(tmp_path, small_corpus, manifest, args, message):
    m = manifest(small_sources(tmp_path))
    r = CliRunner().invoke(main, ["build", str(m), "--out", str(tmp_path / "o"), "--tokenizer", str(TOKENIZER),
                                  "--workers", "1", "-q", *args])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert message in r.output and r.output.count("\n") == 1, r.output


def test_a_source_that_cannot_have_the_field_is_refused_before_building(tmp_path, manifest, build):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("a plain text document")
    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "a.parquet")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "url": "https://a.org/b"}])
    m = manifest([{"name": "plain", "paths": "t"}, {"name": "table", "paths": "a.parquet"},
                  {"name": "json", "paths": "a.jsonl", "metadata": {"field": "url", "form": "host"}}])
    with pytest.raises(SptokError, match=r"source 'plain': metadata field 'url': plain text files have no fields"):
        build(m, out=tmp_path / "o1", metadata="url")
    m2 = manifest([{"name": "plain", "paths": "t", "metadata": False}, {"name": "table", "paths": "a.parquet"}],
                  name="m2.yaml", metadata={"field": "url"})
    with pytest.raises(SptokError, match=r"source 'table': metadata field 'url' is a column of none of its files"):
        build(m2, out=tmp_path / "o2")
    # per source: `metadata: false` and a source's own options; the plain text source builds without
    m3 = manifest([{"name": "plain", "paths": "t"}, {"name": "json", "paths": "a.jsonl",
                                                     "metadata": {"field": "url", "form": "host", "prob": 1}}],
                  name="m3.yaml")
    out, info = build(m3, out=tmp_path / "o3", seq_len=16)
    assert info["options"]["metadata"] == {"plain": None, "json": {"field": "url", "form": "host",
                                                                   "template": "{}\n\n", "prob": 1.0, "max_tokens": 64}}
    stats = json.load(open(os.path.join(out, "stats.json")))["sources"]
    assert "metadata" not in stats["plain"] and stats["json"]["metadata"]["top"] == [["a.org", 1]]


def test_show_report_stats_and_verify(tmp_path, small_corpus, manifest, build):
    out, _ = build(manifest(small_sources(tmp_path)), seq_len=64, **META)
    r = CliRunner().invoke(main, ["show", out, "--source", "pydocs", "-n", "1000", "--no-color"])
    assert r.exit_code == 0 and "[META URL: docs.python.org\\n\\n]" in r.output and "[META x] metadata" in r.output
    r = CliRunner().invoke(main, ["stats", out])
    assert r.exit_code == 0 and "pydocs: url:host on 12 documents" in r.output
    assert "1 distinct value, the most frequent (documents with it): docs.python.org (12)" in r.output
    r = CliRunner().invoke(main, ["report", out, "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "r.html").read_text()
    assert 'id=metadata' in html and "salsa.debian.org (120)" in html
    r = CliRunner().invoke(main, ["verify", out])
    assert r.exit_code == 0, r.output


def test_verify_finds_bad_spans():
    from sptok.verify import meta_spans_problem

    ids = np.array([5, 1, 2, 3, 9, 4, 9])   # 5: an SP, 9: EOS
    ok = np.array([[1, 4], [5, 6]])
    assert meta_spans_problem(ok, ids, [0], 9) is None
    assert "outside the sample" in meta_spans_problem(np.array([[5, 8]]), ids, [0], 9)
    assert "not sorted and apart" in meta_spans_problem(np.array([[2, 4], [1, 3]]), ids, [0], 9)
    assert "cover an SP or EOS" in meta_spans_problem(np.array([[0, 2]]), ids, [0], 9)
    assert "cover an SP or EOS" in meta_spans_problem(np.array([[3, 5]]), ids, [0], 9)


def test_table_inputs_give_their_column(tmp_path, manifest, build):
    """A Parquet source's metadata column: null is no field, "" is empty; a column of numbers is rejected row by
    row; a file without the column gives its rows none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [r["text"] for r in demo_records("fortunes", 6)]
    pq.write_table(pa.table({"text": texts[:4], "url": ["https://www.a.org/x", None, "", "b.net/y"]}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": texts[4:]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": texts[:2], "url": [1, 2]}), tmp_path / "c.parquet")
    m = manifest([{"name": "ab", "paths": ["a.parquet", "b.parquet"]}, {"name": "c", "paths": "c.parquet"}])
    with pytest.raises(SptokError, match=r"source 'c' produced no documents: every record was skipped: "
                                         r"non_string_metadata x2 \(first: c.parquet row 0: field 'url' \(metadata\) "
                                         r"holds int, expected a string\)"):
        build(m, out=tmp_path / "o1", seq_len=32, metadata="url:host")
    m = manifest([{"name": "ab", "paths": ["a.parquet", "b.parquet"]},
                  {"name": "c", "paths": "c.parquet", "metadata": False}], name="m2.yaml")
    out, _ = build(m, out=tmp_path / "o2", seq_len=32, metadata="url:host")
    s = json.load(open(os.path.join(out, "stats.json")))["sources"]
    assert (s["ab"]["metadata"]["docs"], s["ab"]["metadata"]["missing"], s["ab"]["metadata"]["empty"]) == (2, 3, 1)
    assert s["ab"]["metadata"]["top"] == [["a.org", 1], ["b.net", 1]] and "metadata" not in s["c"]
    mixed = manifest([{"name": "c", "paths": ["a.parquet", "c.parquet"]}], name="m3.yaml")
    out, _ = build(mixed, out=tmp_path / "o3", seq_len=32, metadata="url")
    assert json.load(open(os.path.join(out, "stats.json")))["sources"]["c"]["rejected"] == {"non_string_metadata": 2}

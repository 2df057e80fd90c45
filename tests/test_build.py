"""End-to-end builds on real text, read back by the real StreamingDataset and `datasets`."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
from conftest import SOURCES, TOKENIZER, small_sources, tree_bytes
from shards import documents, mds_samples, streaming_dataset, table_samples

from sptok.errors import SptokError
from sptok.build.manifest import validate_document
from sptok.sp import decide, doc_hashes
from sptok.stats import table_rows


def _tok():
    from tokenizers import Tokenizer

    from sptok.build.tokenizer import text_encoder

    return text_encoder(Tokenizer.from_file(str(TOKENIZER / "tokenizer.json")))


def _expected(info, recs_by_source, position):
    """Each document's tokens as the contract says they must be, computed independently of sptok.build.pack."""
    enc = _tok()
    sp_of = {e["source"]: e["token_id"] for e in info["sp_table"]}
    delim = info["delimiter"]["ids"]
    eos = info["eos"]["id"]
    o = info["options"]
    out = {}
    for name, recs in recs_by_source.items():
        keys = [str(r["id"]) for r in recs]
        h = doc_hashes(name, keys)
        dec = decide(h, o["seed"], o["insert_prob"], o["msp_prob"])
        for r, key, ins in zip(recs, h, dec.inserted):
            text = enc.encode(r["text"], add_special_tokens=False).ids
            pre = [sp_of[name]] + delim if ins and position in ("prefix", "both") else []
            post = delim + [sp_of[name]] if ins and position in ("post", "both") else []
            out[int(key)] = (pre + text + post + [eos], r["text"], len(pre), len(text))
    return out


@pytest.mark.parametrize("position", ["prefix", "post", "both"])
def test_roundtrip_through_streaming_dataset(tmp_path, small_corpus, manifest, build, position):
    """Decoding the samples gives every document's exact text, with SP + delimiter where recorded."""
    m = manifest(small_sources(tmp_path))
    out, info = build(m, position=position, seq_len=128, insert_prob=0.7, msp_prob=0.3, seed=3)
    samples = mds_samples(out)
    assert len(samples) == sum(c["samples"] for c in info["counts"].values())
    got = documents(samples)
    want = _expected(info, small_corpus, position)
    assert got.keys() == want.keys()
    enc = _tok()
    for key, (tokens, text, npre, ntext) in want.items():
        assert got[key] == tokens
        assert enc.decode(tokens[npre:npre + ntext], skip_special_tokens=False) == text   # exact for byte-level BPE
    sp_ids = {e["token_id"]: e["source_id"] for e in info["sp_table"]}
    for s in samples:
        ids = s["input_ids"]
        # every recorded SP position holds the SP of the sample's source, and no SP id sits anywhere else
        assert all(sp_ids[int(ids[p])] == s["source_id"] for p in s["sp_positions"])
        assert set(np.flatnonzero(np.isin(ids, list(sp_ids)))) == set(s["sp_positions"].tolist())
        assert len(s["msp_mask"]) == len(s["sp_positions"])
        assert s["doc_offsets"][0] == 0 and np.all(np.diff(s["doc_offsets"]) > 0)
    # only the last sample of each source may be short (--tail keep)
    by_source = {}
    for s in samples:
        by_source.setdefault(s["source_id"], []).append(len(s["input_ids"]))
    for lens in by_source.values():
        assert all(n == 128 for n in lens[:-1])


def test_each_source_is_a_stream(tmp_path, small_corpus, manifest, build):
    from streaming import Stream

    out, info = build(manifest(small_sources(tmp_path)), seq_len=64)
    for e in info["sp_table"]:
        samples = mds_samples(os.path.join(out, e["source"]))
        assert len(samples) == info["counts"][e["source"]]["samples"]
        assert {s["source_id"] for s in samples} == {e["source_id"]}
    streams = [Stream(local=os.path.join(out, n), proportion=0.25) for n in SOURCES]
    with streaming_dataset(streams=streams, shuffle=False, batch_size=1, epoch_size=40) as ds:
        # one StreamingDataset over the per-source directories: its epoch takes a quarter from each source
        assert Counter(int(x["source_id"]) for x in ds) == {e["source_id"]: 10 for e in info["sp_table"]}


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_table_formats_read_by_datasets_and_pyarrow(tmp_path, small_corpus, manifest, build, fmt):
    import pyarrow.dataset as pads

    m = manifest(small_sources(tmp_path))
    out, info = build(m, out=tmp_path / "t", format=fmt, seq_len=96, msp_prob=0.5)
    ref, _ = build(m, out=tmp_path / "m", format="mds", seq_len=96, msp_prob=0.5)
    rows = table_samples(out, fmt)
    mds = mds_samples(ref)
    assert len(rows) == len(mds)
    for a, b in zip(rows, mds):   # same samples, same order, whatever the format
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    table = pads.dataset(os.path.join(out, "code"), format="ipc" if fmt == "arrow" else "parquet").to_table()
    assert table.num_rows == info["counts"]["code"]["samples"]
    assert set(table.column_names) == {"input_ids", "source_id", "doc_offsets", "doc_keys", "sp_positions", "msp_mask"}


def test_outputs_match_schemas_and_stats_add_up(tmp_path, small_corpus, manifest, build):
    out, info = build(manifest(small_sources(tmp_path)), seq_len=100)
    stats = json.load(open(os.path.join(out, "stats.json")))
    validate_document(info, "sptok.schema.json", "sptok.json")
    validate_document(stats, "stats.schema.json", "stats.json")
    for name, recs in small_corpus.items():
        s = stats["sources"][name]
        assert s["docs"] == len(recs) == s["records"]
        tokens = s["text_tokens"] + s["sp_inserted"] + s["delimiter_tokens"] + s["eos_tokens"]
        assert s["sample_tokens"] == tokens   # nothing lost, nothing invented
        assert sum(s["doc_length_hist"]["counts"]) == len(recs)
    assert info["input_ids_dtype"] == "uint16"


def test_same_seed_same_bytes_other_seed_other_decisions(tmp_path, small_corpus, manifest, build):
    m = manifest(small_sources(tmp_path))
    a, _ = build(m, out=tmp_path / "a", insert_prob=0.5, msp_prob=0.5, seq_len=64)
    b, _ = build(m, out=tmp_path / "b", insert_prob=0.5, msp_prob=0.5, seq_len=64)
    c, _ = build(m, out=tmp_path / "c", insert_prob=0.5, msp_prob=0.5, seq_len=64, seed=1)
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert ta == tb
    assert tree_bytes(c)["pydocs/shard.00000.mds.zstd"] != ta["pydocs/shard.00000.mds.zstd"]


def test_policies_name_sps(tmp_path, small_corpus, manifest, build):
    srcs = small_sources(tmp_path)
    for s, sp in zip(srcs, ["<DOC>", "<PY>", "<FUN>", "<ZH>"]):
        s["sp"] = sp
    m = manifest(srcs)
    table = {}
    for policy in ("abbreviation", "alphabet", "misplaced", "custom"):
        _, info = build(m, out=tmp_path / policy, policy=policy, seq_len=64)
        table[policy] = [e["sp"] for e in info["sp_table"]]
    assert table["abbreviation"] == ["<PYDOCS>", "<CODE>", "<FORTUNES>", "<CHINESE>"]
    assert table["alphabet"] == ["<A>", "<B>", "<C>", "<D>"]
    assert sorted(table["misplaced"]) == sorted(table["abbreviation"])
    assert all(a != b for a, b in zip(table["misplaced"], table["abbreviation"]))
    assert table["custom"] == ["<DOC>", "<PY>", "<FUN>", "<ZH>"]


def test_plain_text_delimiter_and_no_delimiter(tmp_path, small_corpus, manifest, build):
    m = manifest(small_sources(tmp_path))
    enc = _tok()
    for delim in (": ", ""):
        out, info = build(m, out=tmp_path / f"d{len(delim)}", delimiter=delim, seq_len=4096)
        assert info["delimiter"]["special"] is False
        assert info["delimiter"]["ids"] == (enc.encode(delim, add_special_tokens=False).ids if delim else [])
        s = mds_samples(os.path.join(out, "fortunes"))[0]
        first = s["input_ids"][: 1 + len(info["delimiter"]["ids"])].tolist()
        sp = next(e["token_id"] for e in info["sp_table"] if e["source"] == "fortunes")
        assert first == [sp] + info["delimiter"]["ids"]


def test_measured_rates_match_requested(tmp_path, manifest, build):
    """Insert and MSP rates over ~2,000 real documents fall within 4 standard deviations."""
    from conftest import demo_records, write_jsonl

    recs = demo_records("fortunes")
    write_jsonl(tmp_path / "f.jsonl", recs)
    m = manifest([{"name": "fortunes", "paths": "f.jsonl", "id_field": "id"}])
    q, p = 0.6, 0.3
    out, info = build(m, insert_prob=q, msp_prob=p, position="both", seq_len=512)
    stats = json.load(open(os.path.join(out, "stats.json")))["sources"]["fortunes"]
    n = len(recs)
    inserted_docs = stats["sp_inserted"] / 2
    assert abs(inserted_docs - n * q) < 4 * np.sqrt(n * q * (1 - q))
    k = stats["sp_inserted"]
    assert abs(stats["sp_masked"] - k * p) < 4 * np.sqrt(k * p * (1 - p))
    samples = mds_samples(out)
    assert sum(int(s["msp_mask"].sum()) for s in samples) == stats["sp_masked"]
    assert sum(len(s["sp_positions"]) for s in samples) == k


def test_literal_sp_in_text_is_ordinary_text(tmp_path, manifest, build):
    from conftest import write_jsonl

    recs = [{"id": i, "text": f"the tag <PYDOCS> and <SPSEP> and <CODE> appear as text {i}"} for i in range(20)]
    write_jsonl(tmp_path / "a.jsonl", recs)
    write_jsonl(tmp_path / "b.jsonl", recs)
    m = manifest([{"name": "pydocs", "paths": "a.jsonl", "id_field": "id"},
                  {"name": "code", "paths": "b.jsonl", "id_field": "id"}])
    out, info = build(m, seq_len=64, insert_prob=0.0)
    sp_ids = {e["token_id"] for e in info["sp_table"]} | set(info["delimiter"]["ids"])
    samples = mds_samples(out)
    assert not any(np.isin(s["input_ids"], list(sp_ids)).any() for s in samples)
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["totals"]["sp_literals"] == 2 * 20 * 3


def test_literal_counts_are_str_count_s():
    """sp_literals counts each SP / delimiter string as str.count does, in one regex pass where no occurrences can
    overlap and string by string where they can (a custom SP may be any text)."""
    from sptok.build.unit import literal_counter

    texts = ["<A><A>>><<A>B", "aaaa aaa", "abab aba", "<SPSEP><PYDOCS<SPSEP><PYDOCS>", "", "中<文>x", "xx"]
    for lits in (["<A>", "<SPSEP>", "<PYDOCS>", "<文>"], ["[A]", "<A>"], ["aa"], ["ab", "ba"], ["<A>", "<A>B"],
                 ["aba", "b"], ["x"], []):
        count = literal_counter(lits)
        assert [count(t) for t in texts] == [sum(t.count(s) for s in lits) for t in texts], lits


@pytest.mark.parametrize("tail", ["keep", "pad", "drop"])
def test_tail_policies(tmp_path, small_corpus, manifest, build, tail):
    out, info = build(manifest(small_sources(tmp_path)), tail=tail, seq_len=256)
    stats = json.load(open(os.path.join(out, "stats.json")))
    for e in info["sp_table"]:
        lens = [len(s["input_ids"]) for s in mds_samples(os.path.join(out, e["source"]))]
        s = stats["sources"][e["source"]]
        if tail == "keep":
            assert all(n == 256 for n in lens[:-1]) and lens[-1] <= 256
        else:
            assert all(n == 256 for n in lens)
        if tail == "pad":
            assert s["sample_tokens"] == 256 * len(lens)
            # padding is not data: the table's tokens and shares leave it out
            row = next(r for r in table_rows(info, stats) if r["source"] == e["source"])
            assert row["tokens"] == s["sample_tokens"] - s["padding_tokens"] and s["padding_tokens"] > 0
            t = stats["totals"]
            assert row["share"] == row["tokens"] / (t["sample_tokens"] - t["padding_tokens"])
        if tail == "drop":
            assert s["dropped_tokens"] < 256 and s["sample_tokens"] == 256 * len(lens)


def test_complete_build_is_kept_unless_overwrite(tmp_path, small_corpus, manifest, build):
    m = manifest(small_sources(tmp_path))
    out, info = build(m, seq_len=64)
    again, same = build(m, out=out, seq_len=64)              # the same build: nothing to do
    assert same["fingerprint"] == info["fingerprint"]
    with pytest.raises(SptokError, match="already holds a complete build.*seq_len: 64 -> 128.*--overwrite"):
        build(m, out=out, seq_len=128)
    _, new = build(m, out=out, seq_len=128, overwrite=True)
    assert new["options"]["seq_len"] == 128


def test_foreign_directory_is_never_touched(tmp_path, small_corpus, manifest, build):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(SptokError, match="not empty and holds no sptok build"):
        build(manifest(small_sources(tmp_path)), out=foreign, overwrite=True)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_other_input_formats(tmp_path, manifest, build):
    """Parquet, plain text files, JSONL.gz/.zst and a `datasets` save_to_disk directory give the same docs."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import demo_records, write_jsonl

    recs = demo_records("fortunes", 30)
    pq.write_table(pa.table({"id": [r["id"] for r in recs], "text": [r["text"] for r in recs]}),
                   tmp_path / "f.parquet", row_group_size=7)
    (tmp_path / "txt").mkdir()
    for r in recs:
        (tmp_path / "txt" / f"{r['id']}.txt").write_text(r["text"])
    write_jsonl(tmp_path / "f.jsonl.gz", recs, compress="gz")
    write_jsonl(tmp_path / "f.jsonl.zst", recs, compress="zst")
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "hf"))
    m = manifest([{"name": "parquet", "paths": "f.parquet", "id_field": "id"},
                  {"name": "text", "paths": "txt"},
                  {"name": "gz", "paths": "f.jsonl.gz", "id_field": "id"},
                  {"name": "zst", "paths": "f.jsonl.zst", "format": "jsonl.zst", "id_field": "id"},
                  {"name": "hf", "paths": "hf", "id_field": "id"}])
    out, info = build(m, seq_len=4096, unit_size=2000)
    formats = [s["format"] for s in info["manifest"]["sources"]]
    assert formats == ["parquet", "text", "jsonl", "jsonl", "hf"]
    enc = _tok()
    want = sorted(r["text"] for r in recs)
    for e in info["sp_table"]:
        docs = documents(mds_samples(os.path.join(out, e["source"])))
        texts = sorted(enc.decode(t[2:-1], skip_special_tokens=False) for t in docs.values())
        assert texts == want, e["source"]


def test_wordpiece_tokenizer_and_uint32_ids(tmp_path, small_corpus, manifest, build):
    """A non-BPE tokenizer works, and a vocabulary over 65,535 switches input_ids to uint32."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(70000)}
    vocab.update({"[UNK]": 70000, "<|endoftext|>": 70001})
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "big.json"))
    out, info = build(manifest(small_sources(tmp_path)), tokenizer=str(tmp_path / "big.json"), seq_len=64)
    assert info["input_ids_dtype"] == "uint32"
    s = mds_samples(os.path.join(out, "code"))[0]
    assert s["input_ids"][0] == info["sp_table"][1]["token_id"] >= 70000


def _one_document(d, text: str):
    """A manifest of one source holding one document, ``text``."""
    d.mkdir()
    (d / "doc.jsonl").write_text(json.dumps({"id": "one", "text": text}, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    (d / "m.yaml").write_text("sources:\n  - {name: one, paths: doc.jsonl}\n")
    return d / "m.yaml"


def _peak_rss_of_build(manifest_path, out) -> int:
    """Peak RSS (bytes) of a process that builds ``manifest_path`` with one worker (so the whole build is one
    process, whose peak getrusage reports) and the defaults otherwise."""
    import subprocess
    import sys

    code = ("import resource, sys; from sptok.build import run_build\n"
            f"run_build({str(manifest_path)!r}, {str(out)!r}, dict(tokenizer={str(TOKENIZER)!r}, workers=1, "
            "quiet=True))\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1]) << 10


def _long_text(nbytes: int, ascii: bool = True) -> str:
    """Real text (the demo slice), ``nbytes`` characters long: ASCII only (Python holds it at one byte per
    character), or as written (two bytes per character: the Chinese source's characters)."""
    from conftest import demo_records

    one = "\n\n".join(r["text"] for n in SOURCES for r in demo_records(n))
    if ascii:
        one = one.encode("ascii", "ignore").decode()
    return (one * (nbytes // len(one) + 1))[:nbytes]


@pytest.mark.parametrize("ascii", [True, False])
def test_a_long_document_builds_in_memory_bounded_by_its_size(tmp_path, ascii):
    """A one-document corpus of 8 MB builds within 4x its bytes over what a one-document corpus of 20 KB takes
    (interpreter, tokenizer, encoders): no stage holds the reference's encoding of the whole document (~100
    bytes per byte), an index per token, or several copies of the text: as a line, decoded and parsed, that
    is three, and at two bytes per character already 4.7x."""
    text = _long_text(8 << 20, ascii)
    big = _peak_rss_of_build(_one_document(tmp_path / "big", text), tmp_path / "big-out")
    tiny = _peak_rss_of_build(_one_document(tmp_path / "tiny", text[:20 << 10]), tmp_path / "tiny-out")
    nbytes = len(text.encode())
    assert big - tiny <= 4 * nbytes, f"{(big - tiny) / nbytes:.1f}x the document's bytes"


def test_the_encoder_check_reads_a_prefix_of_a_long_document(tmp_path):
    from sptok.build.driver import corpus_sample
    from sptok.build.manifest import load_manifest, plan_units

    m = load_manifest(str(_one_document(tmp_path / "c", _long_text(1 << 20))))
    sample = corpus_sample(m, plan_units(m, 1 << 30))
    assert sample == [_long_text(1 << 20)[:32 << 10]]


def test_the_checks_before_a_build_hold_a_prefix_of_a_long_document(tmp_path):
    """The source probe and the encoder sample read a few hundred KB of a 16 MB document, never all of it."""
    import tracemalloc

    from sptok.build.driver import _probe_sources, source_samples
    from sptok.build.manifest import load_manifest, plan_units

    text = _long_text(16 << 20)
    m = load_manifest(str(_one_document(tmp_path / "c", text)))
    units = plan_units(m, 1 << 30)
    tracemalloc.start()
    try:
        _probe_sources(m, units)
        samples = source_samples(m, units)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert samples == {"one": [text[:32 << 10]]}
    assert peak < 2 << 20, f"{peak / 1e6:.1f} MB held"


def test_a_build_of_one_long_line_needs_no_worker_process(tmp_path):
    """A long line split into several byte-range units: only its first unit holds a record, so the build runs
    in this process whatever --workers says (and starts no worker); a file of many lines needs workers."""
    from sptok.build.manifest import load_manifest, plan_units
    from sptok.build.runner import needs_workers

    m = _one_document(tmp_path / "one", _long_text(1 << 20))
    units = plan_units(load_manifest(str(m)), 300 << 10)
    assert len(units) == 4 and not needs_workers(units)
    import subprocess
    import sys

    for workers in (1, 2):   # the pool's module is imported when a pool starts: with 2 workers it never was
        code = (f"import sys; from sptok.build import run_build; run_build({str(m)!r}, {str(tmp_path / str(workers))!r}, "
                f"dict(tokenizer={str(TOKENIZER)!r}, workers={workers}, unit_size='300KB', quiet=True)); "
                f"print('concurrent.futures.process' in sys.modules)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert r.stdout.split()[-1] == "False", r.stdout
    assert tree_bytes(tmp_path / "2") == tree_bytes(tmp_path / "1")
    d = tmp_path / "many"
    d.mkdir()
    text = _long_text(2000)
    (d / "doc.jsonl").write_text("".join(json.dumps({"text": text[:1000 + i]}) + "\n" for i in range(1000)))
    (d / "m.yaml").write_text("sources:\n  - {name: many, paths: doc.jsonl}\n")
    assert needs_workers(plan_units(load_manifest(str(d / "m.yaml")), 300 << 10))

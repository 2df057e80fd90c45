"""Every error a user can cause ends in one readable message naming the file / line / key, exit code 2,
and no traceback; bad records inside good files are skipped, counted, quarantined and reported."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib

import pytest
import zstandard
from click.testing import CliRunner
from conftest import TOKENIZER, demo_records, small_sources, tmpfs, write_jsonl

from sptok.cli import main


def sptok(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output


def fails(*args, match: str):
    code, out = sptok(*args)
    assert code == 2, out
    assert "Traceback" not in out
    assert out.startswith("error: "), out
    assert match in out, out
    return out


def build_args(m, out, *extra):
    return ["build", m, "--out", out, "--tokenizer", TOKENIZER, "--quiet", "--workers", "1", *extra]


# ------------------------------------------------------------------------------------------- manifest

def test_missing_manifest(tmp_path):
    fails(*build_args(tmp_path / "nope.yaml", tmp_path / "o"), match="manifest not found: ")


def test_unreadable_manifest(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("sources: []")
    p.chmod(0)
    if os.access(p, os.R_OK):   # root reads anything: use a directory instead, also unreadable as a manifest
        p = tmp_path
        fails(*build_args(p, tmp_path / "o"), match="is a directory")
    else:
        fails(*build_args(p, tmp_path / "o"), match="cannot read manifest")


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("sources:\n  - name: a\n    paths: [x\n")
    fails(*build_args(p, tmp_path / "o"), match="line 4")


def test_schema_violation_names_key(tmp_path, manifest):
    m = manifest([{"name": "a", "paths": "a.jsonl", "fromat": "jsonl"}])
    out = fails(*build_args(m, tmp_path / "o"), match="sources[0]")
    assert "fromat" in out and "allowed keys" in out
    m = manifest([{"name": "a", "paths": "a.jsonl", "weight": -1}], name="w.yaml")
    fails(*build_args(m, tmp_path / "o"), match="sources[0].weight")
    m = manifest([{"name": "a", "paths": "a.jsonl", "format": "csv"}], name="f.yaml")
    fails(*build_args(m, tmp_path / "o"), match="'csv' is not one of")
    m = manifest([{"name": "a", "paths": "a.jsonl"}], name="b.yaml", seq_len="long")
    fails(*build_args(m, tmp_path / "o"), match="build.seq_len")


def test_a_yaml_exponent_without_a_dot_is_named_as_text(tmp_path, manifest):
    """YAML 1.1 reads 1e-3 as a string: "'1e-3' is not of type 'number'" left the user puzzled."""
    (tmp_path / "m.yaml").write_text("sources:\n  - {name: a, paths: a.jsonl, weight: 1e-3}\nbuild: {seq_len: 1e3}\n")
    out = fails(*build_args(tmp_path / "m.yaml", tmp_path / "o"), match="2 problems")
    assert "build.seq_len: '1e3' is text to YAML, not a number: write 1000" in out
    assert "sources[0].weight: '1e-3' is text to YAML, not a number: write 1.0e-3" in out


def test_a_weight_of_nan_or_inf_is_refused(tmp_path, manifest, small_corpus):
    """YAML's .nan and .inf pass every bound of the schema: a NaN weight was built into sptok.json (invalid
    JSON for strict readers) and `sptok report` drew it with a traceback."""
    for i, w in enumerate([float("nan"), float("inf")]):
        m = manifest([{"name": "code", "paths": "code.jsonl", "weight": w}], name=f"w{i}.yaml")
        fails(*build_args(m, tmp_path / "o"), match=f"sources[0].weight: {w} is not a finite number")
    assert not (tmp_path / "o").exists()


def test_unknown_format(tmp_path, manifest):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    m = manifest([{"name": "a", "paths": "a.csv"}])
    fails(*build_args(m, tmp_path / "o"), match="cannot infer the format of a.csv")


def test_glob_matches_nothing(tmp_path, manifest):
    m = manifest([{"name": "a", "paths": "data/*.jsonl"}])
    fails(*build_args(m, tmp_path / "o"), match="no files match 'data/*.jsonl'")


def test_missing_file(tmp_path, manifest):
    m = manifest([{"name": "a", "paths": ["gone.jsonl"]}])
    fails(*build_args(m, tmp_path / "o"), match="file not found: 'gone.jsonl'")


def test_duplicate_source_names(tmp_path, manifest, small_corpus):
    m = manifest([{"name": "a", "paths": "code.jsonl"}, {"name": "a", "paths": "pydocs.jsonl"}])
    fails(*build_args(m, tmp_path / "o"), match="duplicate source name 'a'")


def test_reserved_source_name(tmp_path, manifest, small_corpus):
    m = manifest([{"name": "tokenizer", "paths": "code.jsonl"}])
    fails(*build_args(m, tmp_path / "o"), match="reserved")


def test_text_field_missing_everywhere(tmp_path, manifest, small_corpus):
    m = manifest([{"name": "a", "paths": "code.jsonl", "text_field": "body"}])
    out = fails(*build_args(m, tmp_path / "o"), match="no field 'body' (text_field)")
    assert "code.jsonl line 1" in out and "id, text" in out


def test_sp_clashes(tmp_path, manifest, small_corpus):
    m = manifest([{"name": "web-en", "paths": "code.jsonl"}, {"name": "web_en", "paths": "pydocs.jsonl"}])
    fails(*build_args(m, tmp_path / "o"), match="SP token clash: sources 'web-en' and 'web_en' would both use <WEB_EN>")
    m = manifest([{"name": "a", "paths": "code.jsonl", "sp": "[MASK]"}, {"name": "b", "paths": "pydocs.jsonl",
                                                                          "sp": "<B>"}], name="c.yaml")
    fails(*build_args(m, tmp_path / "o", "--policy", "custom"), match="SP token clash: SP [MASK] is the tokenizer's own")
    m = manifest([{"name": "a", "paths": "code.jsonl", "sp": "the"}, {"name": "b", "paths": "pydocs.jsonl",
                                                                       "sp": "<B>"}], name="d.yaml")
    fails(*build_args(m, tmp_path / "o", "--policy", "custom"), match="is an ordinary token of the tokenizer")
    m = manifest([{"name": "a", "paths": "code.jsonl"}], name="e.yaml")
    fails(*build_args(m, tmp_path / "o", "--policy", "custom"), match="has no `sp:`")
    fails(*build_args(m, tmp_path / "o", "--policy", "misplaced"), match="needs at least two sources")


def test_a_delimiter_clash_is_about_the_delimiter(tmp_path, manifest, small_corpus):
    m = manifest(small_sources(tmp_path))
    out = fails(*build_args(m, tmp_path / "o", "--delimiter", "[SEP]"),
                match="delimiter clash: --delimiter [SEP] is the tokenizer's own special token; choose another "
                      "delimiter")
    assert "--policy" not in out and "SP token" not in out
    fails(*build_args(m, tmp_path / "o", "--delimiter", "<CODE>"),
          match="delimiter clash: --delimiter <CODE> is also the SP of a source; choose another delimiter")


def test_an_eos_that_is_an_sp_or_the_delimiter_is_refused(tmp_path, manifest, small_corpus):
    """One id in two roles would be read wrongly: the SP policy `strip` removes every EOS that is the delimiter."""
    m = manifest(small_sources(tmp_path))
    fails(*build_args(m, tmp_path / "o", "--eos", "<SPSEP>"),
          match="EOS clash: --eos <SPSEP> is also the delimiter; choose another --eos")
    fails(*build_args(m, tmp_path / "o", "--eos", "<CODE>"),
          match="EOS clash: --eos <CODE> is also the SP of a source; choose another --eos")
    fails(*build_args(m, tmp_path / "o", "--eos", ""), match="--eos: empty; give a token of the tokenizer")
    assert not (tmp_path / "o").exists()


def test_an_empty_metadata_flag_is_refused(tmp_path, manifest, small_corpus):
    """`--metadata "$FIELD"` with FIELD unset built without metadata, saying nothing."""
    m = manifest(small_sources(tmp_path))
    fails(*build_args(m, tmp_path / "o", "--metadata", ""),
          match="field must be the name of a record field (e.g. url), got ''")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("env, name", [({"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "2"},
                                          "SLURM_ARRAY_TASK_ID='abc'"),
                                         ({"RANK": "1", "WORLD_SIZE": "x"}, "WORLD_SIZE='x'")])
def test_a_partition_variable_that_is_no_integer_is_one_line(tmp_path, manifest, small_corpus, monkeypatch, env, name):
    """A Slurm or torchrun variable set wrong was a ValueError traceback from int()."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    m = manifest(small_sources(tmp_path))
    fails(*build_args(m, tmp_path / "o"), match=f"{name}: expected an integer (it picks this machine's partition)")


def test_local_with_a_local_out_is_refused(tmp_path, manifest, small_corpus):
    """--local stages a remote --out; with a local --out it was silently ignored."""
    m = manifest(small_sources(tmp_path))
    fails(*build_args(m, tmp_path / "o", "--local", tmp_path / "stage"),
          match=f"--local {tmp_path / 'stage'}: the staging directory of a remote --out")
    assert not (tmp_path / "o").exists() and not (tmp_path / "stage").exists()


def test_toggling_hash_inputs_is_named_as_such(tmp_path, manifest, small_corpus):
    m = manifest(small_sources(tmp_path))
    assert sptok(*build_args(m, tmp_path / "o", "--seq-len", "64"))[0] == 0
    out = fails(*build_args(m, tmp_path / "o", "--seq-len", "64", "--hash-inputs"),
                match="the --hash-inputs option changed: inputs were fingerprinted by size + mtime, now by content")
    assert "input files changed" not in out
    (tmp_path / "code.jsonl").write_text((tmp_path / "code.jsonl").read_text() + '{"text": "one more"}\n')
    fails(*build_args(m, tmp_path / "o", "--seq-len", "64", "--hash-inputs"), match="input files changed: code.jsonl")


def test_bad_flags(tmp_path, manifest, small_corpus):
    m = manifest(small_sources(tmp_path))
    fails(*build_args(m, tmp_path / "o", "--msp-prob", "1.5"), match="--msp-prob: must be a probability")
    fails(*build_args(m, tmp_path / "o", "--seq-len", "2"), match="--seq-len")
    fails(*build_args(m, tmp_path / "o", "--unit-size", "lots"), match="--unit-size: 'lots' is not a size")
    fails(*build_args(m, tmp_path / "o", "--partition", "3/2"), match="--partition: partition 3/2 is out of range")
    fails("build", m, "--out", tmp_path / "o", "--tokenizer", tmp_path / "none.json", match="no such file")
    code, out = sptok(*build_args(m, tmp_path / "o", "--policy", "bogus"))
    assert code == 2 and "Traceback" not in out


def test_empty_source(tmp_path, manifest, small_corpus):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    m = manifest([{"name": "code", "paths": "code.jsonl"}, {"name": "nothing", "paths": "empty.jsonl"}])
    fails(*build_args(m, tmp_path / "o"), match="source 'nothing' produced no documents")
    assert not (tmp_path / "o").exists()   # known before anything is written: the source was read whole


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_a_wrong_text_field_of_a_table_source_writes_nothing(tmp_path, manifest, small_corpus, fmt):
    """Checked in every file's schema before anything is written, so the corrected manifest builds."""
    import datasets

    recs = demo_records("code", 4)
    table = datasets.Dataset.from_list([{"body": r["text"]} for r in recs])
    path = "t.parquet" if fmt == "parquet" else "t_hf"
    table.to_parquet(str(tmp_path / path)) if fmt == "parquet" else table.save_to_disk(str(tmp_path / path))
    m = manifest([{"name": "a", "paths": "code.jsonl"}, {"name": "t", "paths": path}])
    fails(*build_args(m, tmp_path / "o"), match=f"manifest {m}: source 't': ")
    out = fails(*build_args(m, tmp_path / "o"), match="no column 'text' (text_field); columns are: body")
    assert "set text_field" in out
    assert not (tmp_path / "o").exists()
    m = manifest([{"name": "a", "paths": "code.jsonl"}, {"name": "t", "paths": path, "text_field": "body"}])
    code, out = sptok(*build_args(m, tmp_path / "o"))
    assert code == 0, out
    assert json.load(open(tmp_path / "o" / "sptok.json"))["counts"]["t"]["docs"] == len(recs)


def test_a_source_without_documents_stops_early_and_says_the_truth(tmp_path, manifest, small_corpus):
    """Every record skipped, in a source of several units: the build stops when that source's last unit
    commits, and every command reading the directory says why and how out; the fixed source builds."""
    blanks = [{"text": " \n\t "}] * 400     # whitespace only: no document
    write_jsonl(tmp_path / "zero.jsonl", blanks)
    m = manifest([{"name": "zero", "paths": "zero.jsonl"}, {"name": "code", "paths": "code.jsonl"}])
    args = build_args(m, tmp_path / "o", "--unit-size", "2KB")
    out = fails(*args, match="source 'zero' produced no documents: every record was skipped: empty_text x400")
    assert "only whitespace" in out and "then run `sptok build` again" in out
    units = os.listdir(tmp_path / "o" / ".sptok" / "units")
    n_zero = len([u for u in json.load(open(tmp_path / "o" / ".sptok" / "plan.json"))["units"]
                  if u["source"] == "zero"])
    assert n_zero > 1 and len(units) == n_zero     # the other source was never tokenized
    for cmd in (["show", tmp_path / "o"], ["verify", tmp_path / "o"], ["report", tmp_path / "o", "-o",
                                                                        tmp_path / "r.html"]):
        out = fails(*cmd, match="the build failed: source 'zero' produced no documents")
        assert "resume" not in out
    fails(*args, match="source 'zero' produced no documents")     # the same command: the same truth
    write_jsonl(tmp_path / "zero.jsonl", [{"text": f"line {i}"} for i in range(400)])   # fixed
    code, out = sptok(*args)
    assert code == 0, out
    assert json.load(open(tmp_path / "o" / "sptok.json"))["counts"]["zero"]["docs"] == 400


def test_a_source_that_tail_drop_leaves_without_a_sample_stops_the_build(tmp_path, manifest, small_corpus):
    """Its one short sample dropped, the source had no sample: the build completed and verified, and reading it
    failed (streaming: "Stream contains no samples")."""
    write_jsonl(tmp_path / "tiny.jsonl", [{"text": "a short one"}])
    m = manifest(small_sources(tmp_path) + [{"name": "tiny", "paths": "tiny.jsonl"}])
    args = build_args(m, tmp_path / "o", "--seq-len", "64", "--tail", "drop")
    fails(*args, match="source 'tiny' fills no sample: its 6 tokens are fewer than one sample of --seq-len 64, and "
                       "--tail drop drops them")
    fails("show", tmp_path / "o", match="the build failed: source 'tiny' fills no sample")
    code, out = sptok(*build_args(m, tmp_path / "o", "--seq-len", "64", "--tail", "pad"))
    assert code == 0, out
    assert json.load(open(tmp_path / "o" / "stats.json"))["sources"]["tiny"]["samples"] == 1


def test_out_is_a_file(tmp_path, manifest, small_corpus):
    m = manifest(small_sources(tmp_path))
    (tmp_path / "f").write_text("x")
    fails(*build_args(m, tmp_path / "f"), match="exists and is not a directory")
    fails(*build_args(m, tmp_path / "f" / "sub"), match="Not a directory")
    fails("merge", tmp_path / "p0", "--out", tmp_path / "f", match="not a partition")
    assert (tmp_path / "f").read_text() == "x"


def test_a_damaged_partition_is_named_by_merge(tmp_path, manifest, small_corpus):
    """Partitions travel between machines: a unit's shard cut short was merged into a build that looked complete,
    and an unreadable result.json or tail.npz was a traceback. Rebuilding the unit as told fixes the merge."""
    import shutil

    m = manifest(small_sources(tmp_path))
    parts = [tmp_path / "p0", tmp_path / "p1"]
    for i, p in enumerate(parts):
        assert sptok(*build_args(m, p, "--seq-len", "64", "--partition", f"{i}/2"))[0] == 0
    unit = next((parts[1] / ".sptok" / "units").iterdir())
    pristine = tmp_path / "pristine"
    shutil.copytree(unit, pristine)
    shard = next(f for f in unit.iterdir() if f.name.startswith("shard."))
    damage = {shard.name: lambda f: f.write_bytes(f.read_bytes()[:100]),
              "result.json": lambda f: f.write_text("{"), "tail.npz": lambda f: f.write_text("junk")}
    for name, spoil in damage.items():
        spoil(unit / name)
        fails("merge", *parts, "--out", tmp_path / "m", match=f"cannot merge: the committed unit {unit} is damaged: ")
        assert not (tmp_path / "m" / "sptok.json").exists()
        shutil.copy(pristine / name, unit / name)
    shutil.rmtree(unit)
    assert sptok(*build_args(m, parts[1], "--seq-len", "64", "--partition", "1/2"))[0] == 0
    assert sptok("merge", *parts, "--out", tmp_path / "m", "-q")[0] == 0


def test_strict_on_a_complete_build_rechecks(tmp_path, manifest):
    _bad_corpus(tmp_path)
    m = manifest([{"name": "f", "paths": "bad.jsonl", "id_field": "id"}])
    assert sptok(*build_args(m, tmp_path / "o", "--seq-len", "64"))[0] == 0
    out = fails(*build_args(m, tmp_path / "o", "--seq-len", "64", "--strict"),
                match="--strict: ")
    assert "skipped 7 records" in out and "bad.jsonl line 4" in out and "sptok rejects" in out
    write_jsonl(tmp_path / "good.jsonl", demo_records("fortunes", 10))
    m = manifest([{"name": "f", "paths": "good.jsonl", "id_field": "id"}], name="good.yaml")
    assert sptok(*build_args(m, tmp_path / "g", "--seq-len", "64"))[0] == 0
    code, out = sptok(*build_args(m, tmp_path / "g", "--seq-len", "64", "--strict"))
    assert code == 0 and "already holds this exact build" in out


def test_manifest_problems_come_all_at_once_and_readable(tmp_path, manifest, small_corpus):
    m = manifest([{"name": "a", "path": "code.jsonl"}, {"name": "中文源", "paths": "code.jsonl", "sp": " the"}])
    out = fails(*build_args(m, tmp_path / "o"), match="3 problems:")
    assert "sources[0]: unknown key 'path' (did you mean 'paths'?)" in out
    assert "missing key 'paths'" not in out                   # explained by the misspelling
    assert "sources[1].name: '中文源': a source name is 1 to 64 ASCII letters" in out and "because" in out
    assert "sources[1].sp: ' the': an SP is written without whitespace" in out
    assert "^" not in out                                      # no raw regex


def test_complete_build_refused_without_overwrite(tmp_path, manifest, small_corpus):
    m = manifest(small_sources(tmp_path))
    assert sptok(*build_args(m, tmp_path / "o", "--seq-len", "64"))[0] == 0
    fails(*build_args(m, tmp_path / "o", "--seq-len", "32"), match="already holds a complete build")
    assert sptok(*build_args(m, tmp_path / "o", "--seq-len", "32", "--overwrite"))[0] == 0


def test_overwrite_keeps_files_it_did_not_write(tmp_path, manifest, small_corpus):
    """--overwrite removed everything in --out, unfinished or complete: a user's file put there went too."""
    m = manifest(small_sources(tmp_path))
    assert sptok(*build_args(m, tmp_path / "o", "--seq-len", "64", "--partition", "0/2"))[0] == 0   # unfinished
    (tmp_path / "o" / "NOTES.md").write_text("mine")
    fails(*build_args(m, tmp_path / "o", "--seq-len", "32", "--overwrite"),
          match="holds NOTES.md, which no sptok build wrote there, beside an unfinished build; --overwrite would "
                "remove them with it: move them out first")
    assert (tmp_path / "o" / "NOTES.md").read_text() == "mine"
    (tmp_path / "o" / "NOTES.md").unlink()
    assert sptok(*build_args(m, tmp_path / "o", "--seq-len", "32", "--overwrite"))[0] == 0
    (tmp_path / "o" / "NOTES.md").write_text("mine")   # beside a complete build: swapped out and removed with it
    fails(*build_args(m, tmp_path / "o", "--seq-len", "64", "--overwrite"),
          match="holds NOTES.md, which no sptok build wrote there, beside a complete build")
    assert (tmp_path / "o" / "NOTES.md").read_text() == "mine"


def test_commands_on_a_non_build(tmp_path):
    fails("stats", tmp_path / "nothing", match="no such build directory")
    fails("stats", tmp_path, match="not an sptok build")


# ------------------------------------------------------------------------------ bad records, counted

def _bad_corpus(tmp_path):
    good = demo_records("fortunes", 10)
    lines = [json.dumps(r).encode() for r in good[:3]]
    lines.append(b'{"id": "broken", "text": "no closing brace"')          # malformed JSON, line 4
    lines.append(b'{"id": "latin1", "text": "caf\xe9"}')                  # invalid UTF-8, line 5
    lines.append(b'{"id": "nofield", "body": "x"}')                       # missing field, line 6
    lines.append(b'{"id": "num", "text": 42}')                            # non-string text, line 7
    lines.append(b'["not", "an", "object"]')                              # line 8
    lines.append(b'{"id": "empty", "text": ""}')                          # line 9
    lines.append(b'{"id": "surrogate", "text": "\\ud800 lone"}')          # line 10
    lines += [json.dumps(r).encode() for r in good[3:]]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return good


def test_bad_records_are_skipped_counted_and_quarantined(tmp_path, manifest):
    good = _bad_corpus(tmp_path)
    m = manifest([{"name": "f", "paths": "bad.jsonl", "id_field": "id"}])
    code, out = sptok(*build_args(m, tmp_path / "o", "--seq-len", "64"))
    assert code == 0, out
    stats = json.load(open(tmp_path / "o" / "stats.json"))["sources"]["f"]
    assert stats["docs"] == len(good)
    assert stats["rejected"] == {"malformed_json": 1, "invalid_utf8": 2, "missing_field": 1, "non_string_text": 1,
                                 "not_an_object": 1, "empty_text": 1}
    assert stats["records"] == len(good) + 7
    assert "bad.jsonl line 4: malformed JSON" in stats["reject_examples"]["malformed_json"]
    assert "skipped records" in out and "malformed_json 1" in out
    raw = zstandard.ZstdDecompressor().stream_reader(open(tmp_path / "o" / "rejects" / "f.jsonl.zst", "rb")).read()
    rejects = [json.loads(x) for x in raw.splitlines()]
    assert [r["line"] for r in rejects] == [4, 5, 6, 7, 8, 9, 10]
    assert rejects[0]["raw"] == '{"id": "broken", "text": "no closing brace"'
    assert "raw_b64" in rejects[1]    # the invalid bytes are kept exactly


def test_strict_stops_at_first_bad_record(tmp_path, manifest):
    _bad_corpus(tmp_path)
    m = manifest([{"name": "f", "paths": "bad.jsonl", "id_field": "id"}])
    fails(*build_args(m, tmp_path / "o", "--strict"), match="bad.jsonl line 4: malformed JSON")
    assert not (tmp_path / "o" / "sptok.json").exists()


@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_truncated_archive_keeps_what_came_before(tmp_path, manifest, kind):
    recs = demo_records("fortunes")   # several zstd blocks, so half the file decodes to many lines
    data = b"".join(json.dumps(r).encode() + b"\n" for r in recs)
    comp = zstandard.ZstdCompressor().compress(data) if kind == "zst" else gzip.compress(data)
    (tmp_path / f"t.jsonl.{kind}").write_bytes(comp[: len(comp) // 2])
    m = manifest([{"name": "t", "paths": f"t.jsonl.{kind}", "id_field": "id"}])
    code, out = sptok(*build_args(m, tmp_path / "o", "--seq-len", "64"))
    assert code == 0, out
    stats = json.load(open(tmp_path / "o" / "stats.json"))["sources"]["t"]
    assert stats["rejected"] == {"truncated_archive": 1}
    # every complete line before the break is kept
    prefix = comp[: len(comp) // 2]
    d = zstandard.ZstdDecompressor().decompressobj() if kind == "zst" else zlib.decompressobj(wbits=47)
    got = d.decompress(prefix)
    assert stats["docs"] == got.count(b"\n") > 0
    assert "truncated" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("t "))
    assert row[3] == "0"                     # the "skipped" column counts records, and a break is not one
    assert "t: archive breaks 1 (truncated_archive: not records" in out
    fails(*build_args(m, tmp_path / "o2", "--strict"), match="truncated")


@pytest.mark.parametrize("kind", ["gz", "zst"])
@pytest.mark.parametrize("after", [b"GARBAGE", bytes(1000)], ids=["garbage", "zeros"])
def test_bytes_after_a_whole_archive_keep_every_record(tmp_path, manifest, kind, after):
    """A complete archive followed by trailing bytes (garbage, or the zero padding of a block device): the break
    is reported at the archive's end and every record kept. The slice holding the archive's end and the junk
    was dropped whole: a small file lost every record, "line 1 (decompressed byte 0)"."""
    recs = demo_records("fortunes", 50)
    data = b"".join(json.dumps(r).encode() + b"\n" for r in recs)
    comp = zstandard.ZstdCompressor().compress(data) if kind == "zst" else gzip.compress(data)
    (tmp_path / f"t.jsonl.{kind}").write_bytes(comp + after)
    m = manifest([{"name": "t", "paths": f"t.jsonl.{kind}", "id_field": "id"}])
    code, out = sptok(*build_args(m, tmp_path / "o", "--seq-len", "64"))
    assert code == 0, out
    stats = json.load(open(tmp_path / "o" / "stats.json"))["sources"]["t"]
    assert stats["docs"] == 50 and stats["rejected"] == {"truncated_archive": 1}
    assert stats["reject_examples"]["truncated_archive"].startswith(
        f"t.jsonl.{kind} line 51 (decompressed byte {len(data)}): corrupt ")


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MB filesystem (tmpfs) to fill: skipped where mounting is not allowed."""
    with tmpfs(tmp_path / "small", "4m") as mnt:
        yield mnt


def fill(disk, leave: int):
    """Fill ``disk`` up to ``leave`` bytes free; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            f.write(b"x" * max(0, os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - leave))
        except OSError:
            pass
    return filler


def test_disk_full_is_a_clear_error_and_resumable(tmp_path, manifest, small_corpus, small_disk):
    filler = fill(small_disk, 200 << 10)   # the build needs more
    m = manifest(small_sources(tmp_path))
    fails(*build_args(m, small_disk / "o", "--seq-len", "64"), match="disk full")
    assert not (small_disk / "o" / "sptok.json").exists()
    filler.unlink()
    code, out = sptok(*build_args(m, small_disk / "o", "--seq-len", "64"))
    assert code == 0, out
    assert (small_disk / "o" / "sptok.json").exists()


def test_disk_full_in_finalize_is_one_line(tmp_path, manifest, small_corpus, small_disk):
    """The shards fit, the tokenizer copy does not: the full disk is met in finalize (where shutil.copytree
    used to hide its errno), and still reads as one line."""
    m = manifest(small_sources(tmp_path))
    parts = [tmp_path / f"p{i}" for i in range(2)]
    for i, p in enumerate(parts):
        assert sptok(*build_args(m, p, "--seq-len", "64", "--partition", f"{i}/2"))[0] == 0
    code, _ = sptok("merge", *parts, "--out", tmp_path / "whole", "--quiet")
    assert code == 0
    tok_bytes = sum(f.stat().st_size for f in (tmp_path / "whole" / "tokenizer").iterdir())
    rest = sum(f.stat().st_size + 4096 for f in (tmp_path / "whole").rglob("*") if f.is_file()) - tok_bytes
    fill(small_disk, rest + tok_bytes // 2)
    out = fails("merge", *parts, "--out", small_disk / "o", match=f"disk full ({small_disk / 'o'}")
    assert len(out.strip().splitlines()) == 1, out
    assert not (small_disk / "o" / "sptok.json").exists()


def test_a_full_disk_in_any_copytree_is_one_line(tmp_path, small_disk):
    """shutil.copytree gathers its OSErrors into one shutil.Error without errno: the CLI still reads a full disk
    in it (the checkpoint's copy of the tokenizer uses it)."""
    import shutil

    import click

    from sptok.cli import _Group

    @click.group(cls=_Group)
    def group():
        pass

    @group.command()
    def copy():
        shutil.copytree(TOKENIZER, small_disk / "tok")

    fill(small_disk, 64 << 10)
    res = CliRunner().invoke(group, ["copy"], catch_exceptions=False)
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: disk full ({small_disk / 'tok'}") and len(res.output.splitlines()) == 1


def test_no_traceback_from_real_process(tmp_path):
    """The installed entry point, in a real process: a bad manifest gives one line and exit 2."""
    p = tmp_path / "m.json"
    p.write_text("{not json")
    r = subprocess.run([sys.executable, "-m", "sptok", "build", str(p), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: manifest {p} line 1 column 2: invalid JSON")

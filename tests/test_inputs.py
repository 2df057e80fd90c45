"""What a build takes as input: the files a source's paths expand to (hidden entries, symlinks, never the
output directory), the records it reads from them (ids, JSON arrays, nesting), the manifests and options it
accepts, and the tokenizers it can use. Each refusal is one line naming what to change."""

from __future__ import annotations

import json
import os

import pytest
import zstandard
from click.testing import CliRunner
from conftest import TOKENIZER, demo_records, write_jsonl

from sptok.cli import main
from sptok.errors import SptokError


def sptok(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output


def fails(*args, match: str) -> str:
    code, out = sptok(*args)
    assert code == 2 and "Traceback" not in out and out.startswith("error: "), out
    assert match in out, out
    return out


def build_cli(m, out, *extra):
    return ["build", m, "--out", out, "--tokenizer", TOKENIZER, "--quiet", "--workers", "1", "--seq-len", "64",
            *extra]


def stats_of(out) -> dict:
    return json.loads((out / "stats.json").read_text())


# ------------------------------------------------------------------------------------------------ records

def test_deeply_nested_json_is_a_malformed_record(tmp_path, manifest, build):
    """100,000 levels of nesting raised RecursionError in the probe and in the worker: now one reject."""
    recs = demo_records("fortunes", 6)
    lines = [json.dumps(r) for r in recs]
    lines.insert(0, "[" * 100_000 + "]" * 100_000)        # the source's first record: the probe reads it
    lines.insert(3, '{"id": "deep", "text": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (tmp_path / "f.jsonl").write_text("\n".join(lines) + "\n")
    out, _ = build(manifest([{"name": "s", "paths": "f.jsonl", "id_field": "id"}]), seq_len=64)
    stats = stats_of(tmp_path / "out")["sources"]["s"]
    assert stats["docs"] == 6 and stats["rejected"] == {"malformed_json": 2}
    data = zstandard.ZstdDecompressor().stream_reader(open(tmp_path / "out/rejects/s.jsonl.zst", "rb")).read()
    quarantined = [json.loads(line) for line in data.splitlines()]
    assert [r["line"] for r in quarantined] == [1, 4]
    assert "nested too deeply" in quarantined[0]["detail"]


@pytest.mark.parametrize("layout", ["pretty", "one line"])
def test_a_json_array_file_is_named_not_rejected_line_by_line(tmp_path, manifest, layout):
    recs = demo_records("fortunes", 5)
    text = json.dumps(recs, indent=2) if layout == "pretty" else json.dumps(recs)
    (tmp_path / "f.json").write_text(text)
    m = manifest([{"name": "s", "paths": "f.json"}])
    out = fails(*build_cli(m, tmp_path / "o"), match="f.json: holds a JSON array, not JSON Lines")
    assert "jq -c '.[]' f.json" in out and out.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_ids_objects_are_rejects_and_duplicates_are_counted(tmp_path, manifest, build):
    """A dict id was its Python repr; `5` and "5" were one id, silently. Now an object id is a reject with its
    reason, and ids compared as text are counted when they repeat (each document is still built)."""
    recs = demo_records("fortunes", 8)
    recs[1]["id"] = {"a": 1}
    recs[2]["id"] = True
    recs[3]["id"], recs[4]["id"] = 5, "5"
    recs[6]["id"] = recs[5]["id"]
    write_jsonl(tmp_path / "f.jsonl", recs[:6])
    write_jsonl(tmp_path / "g.jsonl", recs[6:])               # a duplicate across files (units) too
    m = manifest([{"name": "s", "paths": ["f.jsonl", "g.jsonl"], "id_field": "id"}])
    out, _ = build(m, seq_len=64)
    s = stats_of(tmp_path / "out")["sources"]["s"]
    assert s["rejected"] == {"invalid_id": 2} and s["docs"] == 6
    assert s["duplicate_ids"] == 2
    assert "holds an object" in s["reject_examples"]["invalid_id"]
    code, table = sptok("stats", out)
    assert code == 0 and "duplicate document ids (each document was still built): s 2" in table


def test_unique_string_ids_leave_stats_as_they_were(tmp_path, manifest, build):
    write_jsonl(tmp_path / "f.jsonl", demo_records("fortunes", 8))
    build(manifest([{"name": "s", "paths": "f.jsonl", "id_field": "id"}]), seq_len=64)
    assert "duplicate_ids" not in stats_of(tmp_path / "out")["sources"]["s"]


# ------------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("flag, value, match", [
    ("--seed", "99999999999999999999999", "--seed: must be an integer from 0 to 2**64 - 1"),
    ("--workers", "99999999999999999999", "--workers: must be an integer from 0"),
    ("--seq-len", "99999999999999999999", "--seq-len: must be an integer from 8 to"),
    ("--holdout-docs", "99999999999999999999999", "--holdout-docs: must be a positive number"),
    ("--unit-size", "9" * 400, "--unit-size: must be a positive size below 8 EiB, got '999"),
])
def test_numeric_build_options_out_of_range_are_one_line(tmp_path, manifest, flag, value, match):
    write_jsonl(tmp_path / "f.jsonl", demo_records("fortunes", 4))
    m = manifest([{"name": "s", "paths": "f.jsonl"}])
    args = build_cli(m, tmp_path / "o")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    out = fails(*args, match=match)
    assert out.count("\n") == 1 and len(out) < 300, out


def test_the_largest_seed_builds(tmp_path, manifest, build):
    write_jsonl(tmp_path / "f.jsonl", demo_records("fortunes", 4))
    _, info = build(manifest([{"name": "s", "paths": "f.jsonl"}]), seq_len=64, seed=(1 << 64) - 1)
    assert info["options"]["seed"] == (1 << 64) - 1


# ------------------------------------------------------------------------------------------------- paths

def _corpus(d, names=("a", "sub/b")):
    for n in names:
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(d / f"{n}.jsonl", demo_records("fortunes", 3))


def test_an_out_inside_a_recursive_glob_is_refused_before_overwrite_removes_anything(tmp_path, manifest, build):
    """The build succeeded and ingested its own rejects on the next run; --overwrite then deleted the good
    build and failed. The output tree is never an input, so such an --out is refused up front."""
    _corpus(tmp_path / "data")
    (tmp_path / "data" / "bad.jsonl").write_text("not json\n" + json.dumps({"text": "ok"}) + "\n")
    narrow = manifest([{"name": "s", "paths": "data/*.jsonl"}], name="narrow.yaml")
    out, _ = build(narrow, out=tmp_path / "data" / "built", seq_len=64)       # a good build there
    before = sorted(p.name for p in (tmp_path / "data" / "built").iterdir())
    wide = manifest([{"name": "s", "paths": "data/**/*.jsonl*"}], name="wide.yaml")
    msg = fails(*build_cli(wide, out, "--overwrite"), match=f"--out {out} is inside what source 's' reads")
    assert "'data/**/*.jsonl*'" in msg and msg.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "data" / "built").iterdir()) == before
    directory = manifest([{"name": "s", "paths": "data", "format": "jsonl"}], name="dir.yaml")
    fails(*build_cli(directory, tmp_path / "data" / "x" / "o"), match="is inside what source 's' reads")
    code, _ = sptok(*build_cli(wide, tmp_path / "elsewhere"))
    assert code == 0


def test_an_out_that_holds_the_inputs_is_named_as_such(tmp_path, manifest):
    """--out . beside the data: refused, saying that --out holds the inputs (it said --out was inside them)."""
    _corpus(tmp_path / "data")
    m = manifest([{"name": "s", "paths": "data/a.jsonl"}])
    for out in (tmp_path / "data", tmp_path):
        fails(*build_cli(m, out), match=f"--out {out} holds input files of source 's' (first: data/a.jsonl): a build "
                                        f"writes and removes files in --out; choose an --out that holds no input")


def test_a_pipe_among_the_inputs_is_refused_not_waited_on(tmp_path, manifest):
    """A named pipe in a source's directory (or listed itself): the build blocked forever opening it."""
    import subprocess
    import sys

    _corpus(tmp_path / "data")
    os.mkfifo(tmp_path / "data" / "pipe.jsonl")
    for paths in ("data", "data/pipe.jsonl"):
        m = manifest([{"name": "s", "paths": paths}], name=f"m{len(paths)}.yaml")
        r = subprocess.run([sys.executable, "-m", "sptok", *build_cli(m, tmp_path / "o")], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "data/pipe.jsonl is not a regular file (a pipe, device or socket)" in r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_directory_sources_skip_hidden_directories(tmp_path, manifest):
    from sptok.build.manifest import load_manifest

    _corpus(tmp_path / "data")
    (tmp_path / "data" / ".git").mkdir()
    (tmp_path / "data" / ".git" / "config").write_text("[core]\n\tbare = false\n")
    (tmp_path / "data" / ".cache" / "x").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / ".cache" / "x" / "c.jsonl", demo_records("code", 1))
    m = load_manifest(manifest([{"name": "s", "paths": "data", "format": "jsonl"}]))
    assert [os.path.relpath(f, tmp_path) for f in m.sources[0].files] == ["data/a.jsonl", "data/sub/b.jsonl"]


def test_symlink_loops_and_second_links_give_each_file_once(tmp_path, manifest):
    """A `**` glob followed a directory link to its parent round and round: 121 files for 2 real ones."""
    from sptok.build.manifest import load_manifest

    _corpus(tmp_path / "data")
    os.symlink("..", tmp_path / "data" / "sub" / "loop")
    os.symlink("a.jsonl", tmp_path / "data" / "a-again.jsonl")
    for paths, fmt in (("data/**/*.jsonl", None), ("data", "jsonl")):
        m = load_manifest(manifest([{"name": "s", "paths": paths, **({"format": fmt} if fmt else {})}]))
        files = [os.path.relpath(f, tmp_path) for f in m.sources[0].files]
        assert files == ["data/a-again.jsonl", "data/sub/b.jsonl"] or files == ["data/a.jsonl", "data/sub/b.jsonl"]
        assert len({os.path.realpath(f) for f in m.sources[0].files}) == len(files) == 2


def test_a_symlink_out_of_the_source_directory_needs_links_outside(tmp_path, manifest):
    from sptok.build.manifest import load_manifest

    _corpus(tmp_path / "data")
    _corpus(tmp_path / "private", names=("secret",))
    os.symlink(tmp_path / "private" / "secret.jsonl", tmp_path / "data" / "s.jsonl")
    for paths, n in (("data", 3), ("data/*.jsonl", 2), ("data/**/*.jsonl", 3)):
        m = manifest([{"name": "s", "paths": paths, "format": "jsonl"}])
        fails(*build_cli(m, tmp_path / "o"), match=f"paths: data/s.jsonl is a symlink to {tmp_path}/private/secret.jsonl, "
                                                     f"outside")
        m = manifest([{"name": "s", "paths": paths, "format": "jsonl", "links_outside": True}])
        assert len(load_manifest(m).sources[0].files) == n
    m = manifest([{"name": "s", "paths": ["data/a.jsonl", "data/s.jsonl"]}])   # named: read wherever it leads
    assert len(load_manifest(m).sources[0].files) == 2


# ------------------------------------------------------------------------------------- hostile manifests

LAUGHS = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 10))


@pytest.mark.parametrize("key", ["paths", "sp"])
def test_nested_yaml_aliases_are_refused_in_one_line(tmp_path, key):
    """600 bytes of nested anchors as `paths:` or `sp:` ran 40 s to a MemoryError."""
    import time

    text = "anchors:\n" + "".join("  " + ln + "\n" for ln in ('l0: &l0 "lol"\n' + LAUGHS).splitlines())
    value = "*l9"
    text += "sources:\n  - name: a\n" + (f"    paths: {value}\n" if key == "paths" else f"    paths: a.jsonl\n    sp: {value}\n")
    write_jsonl(tmp_path / "a.jsonl", demo_records("fortunes", 2))
    (tmp_path / "m.yaml").write_text(text)
    t0 = time.time()
    out = fails(*build_cli(tmp_path / "m.yaml", tmp_path / "o"), match=f"manifest {tmp_path / 'm.yaml'}: the YAML aliases")
    assert time.time() - t0 < 5 and out.count("\n") == 1 and len(out) < 400


def test_a_yaml_alias_inside_its_own_anchor_is_refused(tmp_path):
    (tmp_path / "m.yaml").write_text("sources: &s\n  - name: a\n    paths: *s\n")
    fails(*build_cli(tmp_path / "m.yaml", tmp_path / "o"), match="a YAML alias refers to its own anchor")


def test_a_few_aliases_still_load(tmp_path, manifest):
    from sptok.build.manifest import load_manifest

    write_jsonl(tmp_path / "a.jsonl", demo_records("fortunes", 2))
    (tmp_path / "m.yaml").write_text("sources:\n  - &a {name: a, paths: a.jsonl, text_field: text}\n"
                                     "  - {<<: *a, name: b}\n")
    assert [s.name for s in load_manifest(tmp_path / "m.yaml").sources] == ["a", "b"]


def test_a_key_given_twice_is_refused_naming_its_lines(tmp_path):
    """YAML keeps the last of two equal keys silently: a source's second `weight:` won without a word."""
    from sptok.train.config import load_config

    write_jsonl(tmp_path / "a.jsonl", demo_records("fortunes", 2))
    (tmp_path / "m.yaml").write_text("sources:\n  - name: a\n    paths: a.jsonl\n    weight: 2\n    weight: 0.5\n")
    fails(*build_cli(tmp_path / "m.yaml", tmp_path / "o"),
          match=f"manifest {tmp_path / 'm.yaml'} line 5: the key 'weight' is given twice in one mapping "
                "(first on line 4)")
    (tmp_path / "c.yaml").write_text("train:\n  steps: 10\ntrain:\n  steps: 20\n")
    with pytest.raises(SptokError, match=r"config .*c.yaml line 3: the key 'train' is given twice"):
        load_config(str(tmp_path / "c.yaml"))


def test_training_config_aliases_are_refused(tmp_path):
    from sptok.train.config import load_config

    (tmp_path / "c.yaml").write_text("x:\n" + "".join("  " + ln + "\n" for ln in ('l0: &l0 1\n' + LAUGHS).splitlines())
                                     + "train:\n  steps: *l9\n")
    with pytest.raises(SptokError, match=r"config .*c.yaml: the YAML aliases"):
        load_config(str(tmp_path / "c.yaml"))


@pytest.mark.parametrize("key", ["sp", "text_field", "id_field"])
def test_huge_names_are_refused_with_the_value_shortened(tmp_path, key):
    write_jsonl(tmp_path / "a.jsonl", demo_records("fortunes", 2))
    value = "<" + "X" * 1_000_000 + ">"
    (tmp_path / "m.yaml").write_text(f"sources:\n  - {{name: a, paths: a.jsonl, {key}: '{value}'}}\n")
    out = fails(*build_cli(tmp_path / "m.yaml", tmp_path / "o", "--policy", "custom"),
                match=f"sources[0].{key}: '<XXXX")
    assert "(1,000,002 characters) is longer than" in out and len(out) < 400


def test_huge_delimiter_and_sp_flags_are_one_line(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", demo_records("fortunes", 2))
    (tmp_path / "m.yaml").write_text("sources:\n  - {name: a, paths: a.jsonl}\n")
    out = fails(*build_cli(tmp_path / "m.yaml", tmp_path / "o", "--delimiter", "<" + "D" * 100_000 + ">"),
                match="--delimiter: must be a string of at most 128 characters")
    assert len(out) < 300
    out = fails("tokenizer", "extend", TOKENIZER, "--out", tmp_path / "t", "--sp", "<" + "S" * 100_000 + ">",
                match="is 100,002 characters long; an SP or delimiter is one token of at most 128")
    assert len(out) < 300


# ------------------------------------------------------------------------------------------------ tokenizer

def _tokenizer(path, model) -> str:
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("kind, says", [("a only", "become no token (dropped)"),
                                        ("a for all", "become one token, id 0 ('a')"),
                                        ("unk", "become [UNK] or no token")])
def test_a_tokenizer_that_cannot_encode_the_text_is_warned_about_and_strict_refuses(tmp_path, kind, says):
    from tokenizers import models

    model = {"a only": lambda: models.BPE({"a": 0}, []),
             "a for all": lambda: models.WordLevel({"a": 0}, unk_token="a"),
             "unk": lambda: models.WordLevel({"a": 0, "the": 1, "[UNK]": 2}, unk_token="[UNK]")}[kind]()
    tok = _tokenizer(tmp_path / "tokenizer.json", model)
    write_jsonl(tmp_path / "a.jsonl", demo_records("fortunes", 20))
    write_jsonl(tmp_path / "b.jsonl", demo_records("chinese", 5))
    (tmp_path / "m.yaml").write_text("sources:\n  - {name: a, paths: a.jsonl}\n  - {name: b, paths: b.jsonl}\n")
    res = CliRunner().invoke(main, [str(a) for a in build_cli(tmp_path / "m.yaml", tmp_path / "o", "--tokenizer", tok)])
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert [w.split(":")[1] for w in warnings] == [" source 'a'", " source 'b'"], res.stderr   # one line per source
    assert "the tokenizer cannot encode its text" in warnings[0]
    assert says in warnings[0]
    fails(*build_cli(tmp_path / "m.yaml", tmp_path / "o2", "--strict", "--tokenizer", tok),
          match="--strict: source 'a': the tokenizer cannot encode its text")
    assert not (tmp_path / "o2").exists()


def test_the_demo_tokenizer_encodes_every_demo_source(tmp_path):
    from sptok.build.manifest import load_manifest, plan_units
    from sptok.build.driver import source_samples
    from sptok.build.tokenizer import encoding_problem, load_tokenizer

    m = load_manifest(os.path.join(os.path.dirname(TOKENIZER), "..", "demo.yaml"))
    samples = source_samples(m, plan_units(m, 16 << 20))
    tok = load_tokenizer(TOKENIZER).tok
    assert len(samples) == 4 and all(encoding_problem(tok, t, "[UNK]") is None for t in samples.values())


def test_a_broken_symlink_in_a_source_is_named(tmp_path, manifest):
    _corpus(tmp_path / "data")
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "data" / "gone.jsonl")
    for paths in ("data", "data/*.jsonl"):
        m = manifest([{"name": "s", "paths": paths, "format": "jsonl"}])
        fails(*build_cli(m, tmp_path / "o"), match="paths: data/gone.jsonl is a broken symlink")

"""What a new user runs, for every output format: build -> open_dataset with the README's arguments ->
read an epoch -> verify -> stats -> show -> report. An MDS and a table build of the same inputs and
weights hold the same samples per source in an epoch."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SOURCES, TOKENIZER, demo_corpus

from sptok.cli import main
from sptok.data import MLMCollator, open_dataset

FORMATS = ("mds", "parquet", "arrow")


def sptok(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    return res.stdout


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    demo_corpus(d, (30, 8, 300, 30), weights=(1, 1, 0.5, 0.5))
    out = {}
    for fmt in FORMATS:
        out[fmt] = str(d / fmt)
        sptok("build", d / "m.yaml", "--out", out[fmt], "--tokenizer", TOKENIZER, "--format", fmt, "--seq-len", 128,
              "--msp-prob", 0.2, "--workers", 1, "-q")
    return out


def _epoch(out: str, **kw) -> list[dict]:
    ds = open_dataset(out, batch_size=8, shuffle=True, **kw)     # the README's arguments
    samples = list(ds)                                            # one epoch, as a training loop reads it
    assert len(samples) == len(ds)
    return samples, ds.build


def _digest(s: dict) -> str:
    ids = np.asarray(s["input_ids"], "<u4").tobytes()
    return hashlib.sha1(ids + bytes([int(s["source_id"])])).hexdigest()


@pytest.mark.parametrize("fmt", FORMATS)
def test_build_open_read_verify_stats_show_report(builds, fmt, tmp_path):
    out = builds[fmt]
    samples, build = _epoch(out)
    batch = MLMCollator(build)(samples[:8])
    assert batch["input_ids"].shape == (8, 128) and int((batch["labels"] != -100).sum()) > 0
    assert sptok("verify", out).startswith("ok: ")                 # after reading, too
    stats = json.loads(sptok("stats", out, "--json"))
    assert [r["source"] for r in stats["sources"]] == list(SOURCES)
    shown = json.loads(sptok("show", out, "-n", 2, "--json"))
    assert len(shown["samples"]) == 2 and shown["samples"][0]["segments"]
    sptok("report", out, "-o", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert all(f"&lt;{s.upper()}&gt;" in page for s in SOURCES)
    assert sptok("verify", out).startswith("ok: ")                 # nothing any command did changed the build


@pytest.mark.parametrize("weights", [dict(), dict(weights=False), dict(proportion={"code": 3.0}),
                                     dict(repeat={"chinese": 2.5}), dict(epoch_size=500)])
def test_same_samples_per_source_in_every_format(builds, weights):
    per_format = {}
    for fmt in FORMATS:
        samples, _ = _epoch(builds[fmt], **weights)
        per_format[fmt] = Counter(int(s["source_id"]) for s in samples)
    assert per_format["mds"] == per_format["parquet"] == per_format["arrow"], per_format
    if weights == dict(weights=False):   # every sample exactly once: the very same samples
        sets = {fmt: Counter(_digest(s) for s in _epoch(builds[fmt], weights=False)[0]) for fmt in FORMATS}
        assert sets["mds"] == sets["parquet"] == sets["arrow"]
        assert max(sets["mds"].values()) == 1


def test_table_builds_refuse_what_only_streaming_does(builds):
    from sptok.errors import SptokError

    with pytest.raises(SptokError, match="'predownload' applies to MDS builds only; a parquet build takes "
                                         "batch_size, shuffle, shuffle_seed, epoch_size"):
        open_dataset(builds["parquet"], predownload=8)

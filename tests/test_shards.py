"""sptok/shards.py, the core's own shard reader, against the real readers: every sample of an MDS build equals
what streaming's StreamingDataset reads, every sample of a Parquet or Arrow build what `datasets` reads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import small_sources
from shards import mds_samples, normalize, table_samples

from sptok.errors import SptokError
from sptok.shards import ShardReader


def _all_samples(out: str, fmt: str) -> list[dict]:
    info = json.load(open(os.path.join(out, "sptok.json")))
    got = []
    for e in info["sp_table"]:
        r = ShardReader(os.path.join(out, e["source"]), fmt)
        assert len(r) == info["counts"][e["source"]]["samples"]
        got += [normalize(r[i]) for i in range(len(r))]
    return got


@pytest.mark.parametrize("fmt", ["mds", "parquet", "arrow"])
def test_reads_every_sample_as_the_real_readers_do(manifest, build, small_corpus, tmp_path, fmt):
    # small shards: several per source, so samples are found across shard boundaries
    out, info = build(manifest(small_sources(tmp_path)), format=fmt, seq_len=64, msp_prob=0.5, insert_prob=0.7,
                      shard_size="16KB")
    if fmt == "mds":
        want = [s for e in info["sp_table"] for s in mds_samples(os.path.join(out, e["source"]))]
        assert max(len(json.load(open(os.path.join(out, e["source"], "index.json")))["shards"])
                   for e in info["sp_table"]) > 1
    else:
        want = table_samples(out, fmt)
    got = _all_samples(out, fmt)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            assert np.array_equal(g[k], w[k]), k
    assert sum(len(s["sp_positions"]) for s in got) > 0 and sum(s["msp_mask"].sum() for s in got) > 0


def test_an_unreadable_index_is_one_line(manifest, build, small_corpus, tmp_path):
    out, _ = build(manifest(small_sources(tmp_path)))
    with open(os.path.join(out, "code", "index.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(SptokError, match=r"code/index.json: cannot read the shard index"):
        ShardReader(os.path.join(out, "code"), "mds")

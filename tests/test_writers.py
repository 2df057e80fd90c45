"""Our MDS encoder writes exactly what streaming's MDSWriter writes; Arrow/Parquet carry the same columns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zstandard

from shards import streaming_dataset

from sptok.build.pack import Stream
from sptok.build.writers import COLUMNS, MDSShardWriter, sample_columns


def _streams(n: int, rng) -> list[Stream]:
    out = []
    for i in range(n):
        length = int(rng.integers(1, 300))
        starts = np.unique(np.concatenate([[0], rng.integers(0, length, size=int(rng.integers(0, 4)))]))
        sp = np.unique(rng.integers(0, length, size=int(rng.integers(0, 3))))   # often empty: 0 SPs
        out.append(Stream(rng.integers(0, 60000, size=length).astype(np.uint32), starts.astype(np.int64),
                          rng.integers(0, 2**63, size=len(starts)).astype(np.uint64), sp.astype(np.int64),
                          rng.integers(0, 2, size=len(sp)).astype(np.uint8)))
    return out


@pytest.mark.parametrize("shard_size", [1 << 12, 1 << 26])
def test_mds_bytes_equal_mdswriter(tmp_path, shard_size):
    from streaming import MDSWriter

    streams = _streams(200, np.random.default_rng(0))
    ours = MDSShardWriter(str(tmp_path), "uint16", shard_size)
    for s in streams:
        ours.write(s, 3)
    shards = ours.finish()
    ref_dir = tmp_path / "ref"
    columns = {k: v[0].format(dtype="uint16") for k, v in COLUMNS.items()}
    with MDSWriter(out=str(ref_dir), columns=columns, compression="zstd", hashes=["xxh64"],
                   size_limit=shard_size) as w:
        for s in streams:
            w.write(sample_columns(s, 3, "uint16"))
    ref = json.load(open(ref_dir / "index.json"))["shards"]
    assert len(shards) == len(ref) > (1 if shard_size < 1 << 20 else 0)
    for a, b in zip(shards, ref):
        raw_a = zstandard.ZstdDecompressor().decompress(open(tmp_path / a["zip_data"]["basename"], "rb").read())
        raw_b = zstandard.ZstdDecompressor().decompress(open(ref_dir / b["zip_data"]["basename"], "rb").read())
        assert raw_a == raw_b                       # the shard bytes MDSWriter would have written
        assert a["raw_data"] == b["raw_data"]       # same name, size and hash of the raw shard
        strip = lambda e: {k: v for k, v in e.items() if k != "zip_data"}   # noqa: E731 - zstd libraries differ
        assert strip(a) == strip(b)


def test_empty_sp_columns_round_trip(tmp_path):

    from sptok.layout import write_mds_index

    s = Stream(np.arange(10, dtype=np.uint32), np.array([0]), np.array([7], np.uint64), np.empty(0, np.int64),
               np.empty(0, np.uint8))
    w = MDSShardWriter(str(tmp_path), "uint16")
    w.write(s, 1)
    write_mds_index(str(tmp_path), w.finish())
    with streaming_dataset(local=str(tmp_path), shuffle=False, batch_size=1) as ds:
        x = ds[0]
    assert x["sp_positions"] == b"" and x["msp_mask"] == b"" and x["source_id"] == 1
    assert x["input_ids"].tolist() == list(range(10))


# what each column's values are, by its MDS encoding: an ndarray of its dtype, or bytes of a fixed dtype
_BYTES = {"sp_positions": "uint32", "msp_mask": "uint8"}


@pytest.mark.parametrize("fmt", ["mds", "parquet", "arrow"])
def test_columns_are_defined_once(tmp_path, fmt):
    """COLUMNS is the one definition: every writer writes exactly its columns, with its types, and the shards
    read back (sptok's reader, pyarrow) hold exactly those columns."""
    import pyarrow as pa

    from sptok.layout import data_file
    from sptok.shards import ShardReader, as_arrays
    from sptok.build.writers import arrow_schema, open_writer

    assert sorted(COLUMNS) == list(COLUMNS)   # MDS requires sorted names
    s = _streams(1, np.random.default_rng(1))[0]
    assert set(sample_columns(s, 2, "uint16")) == set(COLUMNS)
    w = open_writer(fmt, str(tmp_path), "uint16")
    w.write(s, 2)
    files = w.finish()
    if fmt == "mds":
        assert files[0]["column_names"] == list(COLUMNS)
        assert files[0]["column_encodings"] == [e.format(dtype="uint16") for e, _ in COLUMNS.values()]
        from sptok.layout import write_mds_index

        write_mds_index(str(tmp_path), files)
    else:
        from sptok.layout import write_index

        schema = arrow_schema("uint16")
        assert set(schema.names) == set(COLUMNS)
        for name, (enc, _) in COLUMNS.items():
            t = schema.field(name).type
            want = "int64" if enc == "int" else _BYTES.get(name) or enc.format(dtype="uint16").split(":")[1]
            assert (t.value_type if pa.types.is_list(t) else t) == pa.from_numpy_dtype(np.dtype(want)), name
        write_index(str(tmp_path), fmt, files)
        assert files[0]["basename"] == data_file(0, fmt)
    back = ShardReader(str(tmp_path), fmt)[0]
    assert set(back) == set(COLUMNS)
    got = as_arrays(back)
    assert got["input_ids"].tolist() == s.ids.tolist() and got["sp_positions"].tolist() == s.sp_pos.tolist()
    assert got["doc_keys"].tolist() == s.seg_keys.tolist() and got["source_id"] == 2


@pytest.mark.parametrize("fmt,dtype", [("mds", "uint16"), ("mds", "uint32"), ("parquet", "uint16"),
                                       ("arrow", "uint32")])
@pytest.mark.parametrize("meta", [False, True])
def test_a_run_of_samples_writes_the_bytes_of_each_sample(tmp_path, fmt, dtype, meta):
    """write_run (the middle of a long document, many samples at once) writes what write gives each sample:
    the same shard files, shard breaks included, in a build with metadata (an empty meta_spans) too."""
    from sptok.build.writers import open_writer

    ids = np.random.default_rng(1).integers(0, 60000, (300, 64)).astype(np.uint32)
    files = {}
    for how in ("one", "run"):
        (tmp_path / how).mkdir()
        w = open_writer(fmt, str(tmp_path / how), dtype, 1 << 14, meta=meta)
        if how == "run":
            w.write_run(ids, 2**63 + 5, 3)
        else:
            for row in ids:
                w.write(Stream(row, np.zeros(1, np.int64), np.array([2**63 + 5], np.uint64), np.empty(0, np.int64),
                               np.empty(0, np.uint8)), 3)
        files[how] = (w.finish(), {p.name: p.read_bytes() for p in (tmp_path / how).iterdir()})
    assert files["one"] == files["run"] and len(files["one"][1]) >= (4 if fmt == "mds" else 1)

"""Shard writers behind one small interface: ``write(sample)``, then ``finish() -> files``.

The shard columns are defined here and nowhere else (``COLUMNS``). Writers only encode: they never
decide SPs and never make a build look complete (that is ``sptok.json``'s job).

MDS shards are encoded here rather than with ``streaming.MDSWriter`` because importing ``streaming``
costs each worker process ~3.8 s and ~1.1 GB of RSS (it imports torch); the bytes are identical to
MDSWriter's (``tests/test_writers.py`` compares them) and the real ``StreamingDataset`` reads them.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .. import layout
from .pack import Stream

# name -> (MDS encoding, meaning). MDS needs sorted names; `bytes` because MDS ndarrays cannot be empty.
COLUMNS = {
    "doc_keys": ("ndarray:uint64", "stable hash of the document of each segment, parallel to doc_offsets"),
    "doc_offsets": ("ndarray:uint32", "start of each document segment in input_ids; the first is 0"),
    "input_ids": ("ndarray:{dtype}", "token ids, SPs and delimiters included"),
    "msp_mask": ("bytes", "uint8 per entry of sp_positions: 1 = SP masked for MSP"),
    "source_id": ("int", "source of the sample (packing is source-pure)"),
    "sp_positions": ("bytes", "little-endian uint32 positions of SP tokens in input_ids"),
}
# only in builds with metadata (options.metadata), so builds without keep their bytes
META_COLUMN = {"meta_spans": ("bytes", "little-endian uint32 pairs (start, end) of each metadata span in "
                                       "input_ids, sorted; a span cut by the sample's edge keeps its inside part")}


def columns(meta: bool) -> dict:
    """The shard columns of a build, with or without metadata, in MDS's (sorted) order."""
    return dict(sorted({**COLUMNS, **(META_COLUMN if meta else {})}.items()))
SHARD_SIZE = 1 << 26
ZSTD_LEVEL = 3
HASHES = ["xxh64"]


ID_DTYPES = ("uint16", "uint32")   # input_ids: the smallest that holds every id of the vocabulary


def ids_dtype(vocab_size: int) -> str:
    return ID_DTYPES[0] if vocab_size <= 65535 else ID_DTYPES[1]


def sample_columns(s: Stream, source_id: int, dtype: str, meta: bool = False) -> dict:
    out = {
        "input_ids": s.ids.astype(dtype),
        "source_id": int(source_id),
        "doc_offsets": s.seg_starts.astype(np.uint32),
        "doc_keys": s.seg_keys.astype(np.uint64),
        "sp_positions": s.sp_pos.astype("<u4").tobytes(),
        "msp_mask": s.sp_masked.astype(np.uint8).tobytes(),
    }
    if meta:
        out["meta_spans"] = s.meta_spans.astype("<u4").tobytes()
    return out


def open_writer(fmt: str, out_dir: str, dtype: str, shard_size: int = SHARD_SIZE, meta: bool = False):
    """A writer of the build's columns; ``meta``: with ``meta_spans`` (a build with metadata)."""
    if fmt == "mds":
        return MDSShardWriter(out_dir, dtype, shard_size, meta)
    return TableWriter(out_dir, dtype, fmt, meta)


# -------------------------------------------------------------------------------------------------- MDS

def _shape_prefix(n: int) -> bytes:
    """MDS NDArray header for a 1-D array of n elements: (ndim << 2 | shape dtype code) + shape."""
    for code, dt in enumerate(("<u1", "<u2", "<u4", "<u8")):
        if n < (1 << (8 << code)):
            return bytes([(1 << 2) | code]) + np.array([n], dt).tobytes()
    raise ValueError(n)


class MDSShardWriter:
    """Writes `shard.NNNNN.mds.zstd` files exactly as streaming's MDSWriter(compression='zstd',
    hashes=['xxh64'], size_limit=shard_size) would, and returns their index entries."""

    def __init__(self, out_dir: str, dtype: str, shard_size: int = SHARD_SIZE, meta: bool = False):
        self.out_dir = out_dir
        self.dtype = dtype
        self.size_limit = shard_size
        self.meta = meta
        cols = columns(meta)
        names = list(cols)
        encodings = [cols[n][0].format(dtype=dtype) for n in names]
        sizes = [8 if e == "int" else None for e in encodings]
        self.config = {"version": 2, "format": "mds", "compression": "zstd", "hashes": HASHES,
                       "size_limit": shard_size, "column_names": names, "column_encodings": encodings,
                       "column_sizes": sizes}
        self.config_data = json.dumps(self.config, sort_keys=True).encode("utf-8")
        self.shards: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self.samples: list = []   # each sample's bytes (bytes, or a uint8 row of write_run's)
        self.size = 4 + 4 + len(self.config_data)

    def write(self, s: Stream, source_id: int) -> None:
        c = sample_columns(s, source_id, self.dtype, self.meta)
        # columns in sorted order: doc_keys, doc_offsets, input_ids, [meta_spans,] msp_mask, source_id,
        # sp_positions; the head holds the sizes of all but source_id (fixed, 8 bytes)
        parts = [_shape_prefix(len(c["doc_keys"])) + c["doc_keys"].tobytes(),
                 _shape_prefix(len(c["doc_offsets"])) + c["doc_offsets"].tobytes(),
                 _shape_prefix(len(c["input_ids"])) + c["input_ids"].tobytes(),
                 *([c["meta_spans"]] if self.meta else []),
                 c["msp_mask"],
                 np.int64(c["source_id"]).tobytes(),
                 c["sp_positions"]]
        head = np.array([len(p) for i, p in enumerate(parts) if i != len(parts) - 2], np.uint32).tobytes()
        self._add(head + b"".join(parts))

    def write_run(self, ids: np.ndarray, key: int, source_id: int) -> None:
        """Samples of one document holding no SP and no metadata, one row of ``ids`` each, with the bytes
        ``write`` gives them (one segment at 0 with ``key``, no SP positions, no spans), built as one array."""
        k, n = ids.shape
        keys = _shape_prefix(1) + np.array([key], np.uint64).tobytes()
        offsets = _shape_prefix(1) + np.zeros(1, np.uint32).tobytes()
        width = n * np.dtype(self.dtype).itemsize
        empty = 3 if self.meta else 2     # [meta_spans,] msp_mask, sp_positions
        head = np.array([len(keys), len(offsets), len(_shape_prefix(n)) + width] + [0] * empty, np.uint32)
        before = np.frombuffer(head.tobytes() + keys + offsets + _shape_prefix(n), np.uint8)
        after = np.frombuffer(np.int64(source_id).tobytes(), np.uint8)
        rows = np.empty((k, len(before) + width + len(after)), np.uint8)
        rows[:, :len(before)] = before
        rows[:, len(before):len(before) + width].view(self.dtype)[:] = ids   # cast in place: no copy of the ids
        rows[:, len(before) + width:] = after
        for row in rows:
            self._add(row)   # a view: the shard's join copies it once

    def _add(self, sample: bytes) -> None:
        if self.size_limit and self.size_limit < self.size + len(sample) + 4:
            self._flush()
        self.samples.append(sample)
        self.size += len(sample) + 4

    def _flush(self) -> None:
        import xxhash
        import zstandard

        if not self.samples:
            return
        n = len(self.samples)
        sizes = np.fromiter((len(x) for x in self.samples), np.int64, count=n)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.uint32)
        offsets += np.uint32(4 + 4 * (n + 1) + len(self.config_data))
        raw = b"".join([np.uint32(n).tobytes(), offsets.tobytes(), self.config_data, *self.samples])
        k = len(self.shards)
        zipped = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
        with open(os.path.join(self.out_dir, layout.data_file(k, "mds")), "wb") as f:
            f.write(zipped)
        entry = {"samples": n,
                 "raw_data": {"basename": layout.mds_shard(k), "bytes": len(raw),
                              "hashes": {"xxh64": xxhash.xxh64(raw).hexdigest()}},
                 "zip_data": {"basename": layout.data_file(k, "mds"), "bytes": len(zipped),
                              "hashes": {"xxh64": xxhash.xxh64(zipped).hexdigest()}}}
        entry.update(self.config)
        self.shards.append(entry)
        self._reset()

    def finish(self) -> list[dict]:
        self._flush()
        return self.shards


# ---------------------------------------------------------------------------------------- Arrow/Parquet

def arrow_schema(dtype: str, meta: bool = False):
    import pyarrow as pa

    return pa.schema([
        ("input_ids", pa.list_(getattr(pa, dtype)())),
        ("source_id", pa.int64()),
        ("doc_offsets", pa.list_(pa.uint32())),
        ("doc_keys", pa.list_(pa.uint64())),
        ("sp_positions", pa.list_(pa.uint32())),
        ("msp_mask", pa.list_(pa.uint8())),
    ] + ([("meta_spans", pa.list_(pa.uint32()))] if meta else []))


class TableWriter:
    """Writes `data-NNNNN.parquet` (or `.arrow`, Arrow IPC file) with the same columns as MDS; list
    columns instead of bytes."""

    ROWS_PER_GROUP = 1024

    def __init__(self, out_dir: str, dtype: str, fmt: str, meta: bool = False):
        self.out_dir, self.dtype, self.fmt, self.meta = out_dir, dtype, fmt, meta
        self.schema = arrow_schema(dtype, meta)
        self.rows: list[tuple[Stream, int]] = []
        self.writer = None
        self.files: list[dict] = []
        self.count = 0

    def write(self, s: Stream, source_id: int) -> None:
        self.rows.append((s, source_id))
        if len(self.rows) >= self.ROWS_PER_GROUP:
            self._flush()

    def write_run(self, ids: np.ndarray, key: int, source_id: int) -> None:
        """Samples of one document holding no SP, one row of ``ids`` each (see MDSShardWriter.write_run)."""
        none = np.empty(0, np.int64)
        for row in ids:
            self.write(Stream(row, np.zeros(1, np.int64), np.array([key], np.uint64), none, none.astype(np.uint8)),
                       source_id)

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.rows:
            return
        if self.writer is None:
            name = layout.data_file(len(self.files), self.fmt)
            path = os.path.join(self.out_dir, name)
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
            else:
                self.writer = pa.ipc.new_file(path, self.schema)
            self.files.append({"basename": name, "samples": 0})

        def lists(arrays, typ):
            lens = np.fromiter((len(a) for a in arrays), np.int64, count=len(arrays))
            offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            values = np.concatenate(arrays).astype(typ.to_pandas_dtype()) if len(arrays) else np.empty(0)
            return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, typ))

        streams = [s for s, _ in self.rows]
        batch = pa.record_batch([
            lists([s.ids for s in streams], getattr(pa, self.dtype)()),
            pa.array([sid for _, sid in self.rows], pa.int64()),
            lists([s.seg_starts for s in streams], pa.uint32()),
            lists([s.seg_keys for s in streams], pa.uint64()),
            lists([s.sp_pos for s in streams], pa.uint32()),
            lists([s.sp_masked for s in streams], pa.uint8()),
            *([lists([s.meta_spans.reshape(-1) for s in streams], pa.uint32())] if self.meta else []),
        ], schema=self.schema)
        self.writer.write_batch(batch)
        self.files[-1]["samples"] += len(self.rows)
        self.rows = []

    def finish(self) -> list[dict]:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        import xxhash

        for f in self.files:
            with open(os.path.join(self.out_dir, f["basename"]), "rb") as fh:
                data = fh.read()
            f["bytes"] = len(data)
            f["hashes"] = {"xxh64": xxhash.xxh64(data).hexdigest()}
        return self.files

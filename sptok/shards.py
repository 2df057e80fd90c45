"""A build's samples read back by (source, index) with numpy, zstandard and pyarrow: the inverse of
``writers.py``, for the core commands (``sptok show``, ``sptok report``) that must not need the training stack.

Training reads builds through mosaicml-streaming (``sptok.data``), which shuffles, shards across ranks and
resumes; this reader only decodes the columns ``writers.py`` writes, for random access to a few samples.
``tests/test_shards.py`` holds it to streaming's ``StreamingDataset`` and to ``datasets`` sample by sample.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import SptokError
from . import layout


def as_arrays(sample: dict) -> dict:
    """A sample from MDS (bytes columns) or Arrow (lists) as numpy arrays. ``meta_spans`` is always there:
    (k, 2) int64 rows of (start, end) of each metadata span, none when the build has no metadata column."""
    sp, mask = sample["sp_positions"], sample["msp_mask"]
    raw = (bytes, bytearray)
    meta = sample.get("meta_spans")
    meta = () if meta is None else np.frombuffer(meta, "<u4") if isinstance(meta, raw) else meta
    out = {
        "input_ids": np.asarray(sample["input_ids"], dtype=np.int64),
        "source_id": int(sample["source_id"]),
        "doc_offsets": np.asarray(sample["doc_offsets"], dtype=np.int64),
        "sp_positions": (np.frombuffer(sp, "<u4") if isinstance(sp, raw) else np.asarray(sp)).astype(np.int64),
        "msp_mask": (np.frombuffer(mask, np.uint8) if isinstance(mask, raw) else np.asarray(mask)).astype(bool),
        "meta_spans": np.asarray(meta, dtype=np.int64).reshape(-1, 2),
    }
    if "doc_keys" in sample:
        out["doc_keys"] = np.asarray(sample["doc_keys"], dtype=np.uint64)
    return out


class ShardReader:
    """The raw samples of one source directory (MDS, Parquet or Arrow), by index within the source."""

    def __init__(self, sdir: str, fmt: str):
        self.sdir, self.fmt = sdir, fmt
        index = os.path.join(sdir, layout.index_name(fmt))
        try:
            self.files = layout.read_index(sdir, fmt)
        except (OSError, ValueError, KeyError) as e:
            raise SptokError(f"{index}: cannot read the shard index ({e})") from None
        self.ends = np.cumsum([int(e["samples"]) for e in self.files])
        self._open: tuple[int, object] | None = None   # the last shard read: samples come in runs

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        k = int(np.searchsorted(self.ends, index, side="right"))
        if self._open is None or self._open[0] != k:
            self._open = (k, self._load(self.files[k]))
        row = index - (int(self.ends[k - 1]) if k else 0)
        return _mds_sample(self._open[1], row) if self.fmt == "mds" else self._open[1].slice(row, 1).to_pylist()[0]

    def _load(self, entry: dict):
        if self.fmt == "mds":
            return _MDSShard(self.sdir, entry)
        import pyarrow as pa

        path = os.path.join(self.sdir, entry["basename"])
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        with pa.memory_map(path) as f:
            return pa.ipc.open_file(f).read_all()


class _MDSShard:
    """One MDS shard in memory: its sample offsets and the decoders of its columns (as writers.py encodes)."""

    def __init__(self, sdir: str, entry: dict):
        zipped = os.path.join(sdir, entry["zip_data"]["basename"]) if entry.get("zip_data") else None
        if zipped and os.path.exists(zipped):
            import zstandard

            with open(zipped, "rb") as f:
                self.data = zstandard.ZstdDecompressor().decompress(f.read(),
                                                                    max_output_size=entry["raw_data"]["bytes"])
        else:   # streaming may have left the decompressed shard alone
            with open(os.path.join(sdir, entry["raw_data"]["basename"]), "rb") as f:
                self.data = f.read()
        n = int(np.frombuffer(self.data, np.uint32, 1)[0])
        self.offsets = np.frombuffer(self.data, np.uint32, n + 1, 4)
        self.names = entry["column_names"]
        self.encodings = entry["column_encodings"]
        self.sizes = entry["column_sizes"]
        for enc in self.encodings:
            if not (enc in ("bytes", "int") or (enc.startswith("ndarray:") and enc.count(":") == 1)):
                raise SptokError(f"{sdir}: column encoding {enc!r} is not one sptok writes")


def _mds_sample(shard: _MDSShard, row: int) -> dict:
    data = shard.data
    start, end = int(shard.offsets[row]), int(shard.offsets[row + 1])
    dynamic = [i for i, s in enumerate(shard.sizes) if s is None]
    sizes = list(shard.sizes)
    for i, n in zip(dynamic, np.frombuffer(data, np.uint32, len(dynamic), start)):
        sizes[i] = int(n)
    at = start + 4 * len(dynamic)
    out = {}
    for name, enc, size in zip(shard.names, shard.encodings, sizes):
        raw = data[at:at + size]
        at += size
        if enc == "bytes":
            out[name] = raw
        elif enc == "int":
            out[name] = int(np.frombuffer(raw, np.int64, 1)[0])
        else:   # ndarray:<dtype>, dynamic shape: [ndim << 2 | shape dtype code] [shape] [values]
            ndim, code = raw[0] >> 2, raw[0] & 3
            shape_dtype = ("<u1", "<u2", "<u4", "<u8")[code]
            shape = np.frombuffer(raw, shape_dtype, ndim, 1)
            out[name] = np.frombuffer(raw, enc.split(":")[1], offset=1 + ndim * (1 << code)).reshape(shape)
    assert at == end, f"sample {row}: columns end at byte {at}, the shard says {end}"
    return out

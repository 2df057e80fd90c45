"""Read builds back with the real readers (streaming.StreamingDataset, datasets) for the tests."""

from __future__ import annotations

import glob
import json
import os
from collections import defaultdict
from contextlib import contextmanager

import numpy as np


@contextmanager
def streaming_dataset(**kwargs):
    """A real ``streaming.StreamingDataset`` whose shared memory is given back on leaving (streaming holds it
    until exit: a test session would run out of file descriptors)."""
    from streaming import StreamingDataset

    from sptok.data.dataset import release_shared_memory

    ds = StreamingDataset(**kwargs)
    try:
        yield ds
    finally:
        release_shared_memory(ds)


def mds_samples(local: str) -> list[dict]:
    """Every sample of an MDS directory (a build or one source of it), in order, via StreamingDataset."""
    with streaming_dataset(local=local, shuffle=False, batch_size=1) as ds:
        return [normalize(ds[i]) for i in range(len(ds))]


def table_samples(out: str, fmt: str) -> list[dict]:
    """Every sample of a parquet/arrow build via `datasets`, sources in manifest order."""
    import datasets

    info = json.load(open(os.path.join(out, "sptok.json")))
    files = []
    for e in info["sp_table"]:
        files += sorted(glob.glob(os.path.join(out, e["source"], f"data-*.{fmt}")))
    ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=os.path.join(out, "..", "hf-cache"))
    return [normalize(r) for r in ds]


def normalize(s: dict) -> dict:
    """Decode the bytes columns of MDS; lists to arrays for Arrow."""
    sp = s["sp_positions"]
    mask = s["msp_mask"]
    return {
        "input_ids": np.asarray(s["input_ids"]).astype(np.int64),
        "source_id": int(s["source_id"]),
        "doc_offsets": np.asarray(s["doc_offsets"], dtype=np.int64),
        "doc_keys": np.asarray(s["doc_keys"], dtype=np.uint64),
        "sp_positions": (np.frombuffer(sp, "<u4") if isinstance(sp, bytes) else np.asarray(sp, np.uint32)).astype(np.int64),
        "msp_mask": np.frombuffer(mask, np.uint8) if isinstance(mask, bytes) else np.asarray(mask, np.uint8),
        **({"meta_spans": (np.frombuffer(s["meta_spans"], "<u4") if isinstance(s["meta_spans"], bytes) else
                           np.asarray(s["meta_spans"], np.uint32)).astype(np.int64).reshape(-1, 2)}
           if "meta_spans" in s else {}),
    }


def documents(samples: list[dict]) -> dict[int, list[int]]:
    """doc key -> its tokens, joining its segments in sample order."""
    docs: dict[int, list[int]] = defaultdict(list)
    for s in samples:
        ends = list(s["doc_offsets"][1:]) + [len(s["input_ids"])]
        for start, end, key in zip(s["doc_offsets"], ends, s["doc_keys"]):
            docs[int(key)].extend(s["input_ids"][start:end].tolist())
    return dict(docs)

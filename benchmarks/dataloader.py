"""Loader throughput: raw StreamingDataset iteration vs each sptok collator, side by side.

    python benchmarks/dataloader.py [--corpus ../shared/corpus] [--target-mb 60]

Builds the shared sources (repeated to >= target MB) at seq 512 and 2048 with MSP metadata, then for
batch 32 x 512 and 8 x 2048, with 1 and 2 DataLoader workers, times one epoch of: the raw samples (a
pass-through collate), MLM + MSP, causal LM, T5 span corruption, and two load-time SP policies. Prints
tokens/s, tokens/s per worker and the ratio to raw iteration. Targets: every collator >= 0.5x raw and
>= 2M tokens/s per worker. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _prepare():
    spec = importlib.util.spec_from_file_location("build_throughput", HERE / "build_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.prepare


def raw(samples):
    return samples


def epoch_seconds(ds, collate, batch_size: int, workers: int, in_workers: bool = False) -> tuple[float, int]:
    """(wall seconds, sample tokens) of one epoch: through sptok's Loader (collation where the batches are
    consumed), or with the collator inside the DataLoader workers (``in_workers``)."""
    from streaming import StreamingDataLoader

    from sptok.data import Loader

    if in_workers:
        loader = StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    else:
        loader = Loader(ds, collate, batch_size=batch_size, num_workers=workers)
    t0 = time.perf_counter()
    tokens = 0
    for batch in loader:
        if isinstance(batch, list):
            tokens += sum(len(s["input_ids"]) for s in batch)
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(HERE.parent.parent / "shared" / "corpus"))
    ap.add_argument("--work", default="/tmp/sptok-bench")
    ap.add_argument("--target-mb", type=float, default=60)
    a = ap.parse_args()

    from sptok.data import CausalLMCollator, MLMCollator, SpanCorruptionCollator, open_dataset

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data, nbytes = _prepare()(Path(a.corpus), work, a.target_mb, f"data-{a.target_mb:g}mb")
    (data / "m.yaml").write_text("sources:\n" + "".join(
        f"  - {{name: {s}, paths: {s}.jsonl, id_field: id}}\n" for s in ("pydocs", "code", "fortunes", "chinese")))
    tok = work / "tok32k"
    if not (tok / "tokenizer.json").exists():
        subprocess.run([sys.executable, "-m", "sptok", "tokenizer", "train", str(data / "m.yaml"), "--out", str(tok),
                        "--vocab-size", "32000", "--max-bytes", "40MB"], check=True)
    print(f"data: {nbytes / 1e6:.0f} MB of text; torch DataLoader via streaming.StreamingDataLoader; "
          f"{len(os.sched_getaffinity(0))} CPU cores\n")
    print(f"{'config':<14} {'workers':>7} {'variant':<26} {'Mtok/s':>8} {'per worker':>11} {'vs raw':>7}")
    for seq, batch in ((512, 32), (2048, 8)):
        out = work / f"dl-{a.target_mb:g}mb-{seq}"
        if not (out / "sptok.json").exists():
            subprocess.run([sys.executable, "-m", "sptok", "build", str(data / "m.yaml"), "--out", str(out),
                            "--tokenizer", str(tok), "--seq-len", str(seq), "--msp-prob", "0.15",
                            "--position", "both", "--quiet", "--overwrite"], check=True, stdout=subprocess.DEVNULL)
        for workers in (1, 2):
            ds = open_dataset(str(out), batch_size=batch, weights=False)
            info = ds.build
            variants = [("raw StreamingDataset", raw, False),
                        ("MLM + MSP", MLMCollator(info), False),
                        ("causal LM", CausalLMCollator(info), False),
                        ("T5 span corruption", SpanCorruptionCollator(info), False),
                        ("MLM, policy msp=0.3", MLMCollator(info, sp_policy="msp=0.3"), False),
                        ("causal LM, policy strip", CausalLMCollator(info, sp_policy="strip"), False),
                        ("MLM in DataLoader workers*", MLMCollator(info), True)]
            base = tokens = None
            for name, collate, in_workers in variants:
                wall, n = epoch_seconds(ds, collate, batch, workers, in_workers)
                tokens = tokens or n          # the raw pass counts the epoch's tokens; every variant sees them
                tps = tokens / wall
                base = base or tps
                print(f"{batch:>3} x {seq:<8} {workers:>7} {name:<26} {tps / 1e6:8.2f} {tps / workers / 1e6:11.2f} "
                      f"{tps / base:7.2f}", flush=True)
            del ds
    print("\n* for comparison: the collator passed to the DataLoader itself, running inside the streaming workers;"
          "\n  every other row uses sptok.data.Loader, which collates where the batches are consumed")


if __name__ == "__main__":
    main()

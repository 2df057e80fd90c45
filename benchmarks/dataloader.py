"""Loader throughput: raw StreamingDataset iteration vs each sptok collator as `sptok pretrain` configures it, and
Hugging Face's MLM collator, side by side.

    python benchmarks/dataloader.py [--corpus ../shared/corpus] [--target-mb 60] [--workers auto,1,2]

Builds the shared sources (repeated to >= target MB) at seq 512 and 2048 with MSP metadata, then for
batch 32 x 512 and 8 x 2048, with the loader workers `sptok pretrain` starts when the config names none
(`data.num_workers: auto`, the "defaults" rows) and with 1 and 2, times an epoch of: the raw samples (a
pass-through collate), the collators `sptok pretrain` makes for bert (MLM + MSP with doc ids for document
attention), llama (causal LM) and t5 (span corruption with doc ids), two load-time SP policies, and
transformers' DataCollatorForLanguageModeling (MLM only, no document structure). Prints tokens/s, tokens/s per
worker, and the ratios to raw iteration and to the Hugging Face collator (timed on the first --hf-batches
batches only: it is ~20x slower). Variants alternate over --rounds passes and each keeps its best, since other
processes share the CPU. Targets: MLM + MSP >= 0.5x raw and >= 3x Hugging Face's collator. Not part of the
test suite.

Then, at the default workers, the "meta" rows: the same sources built again with ``--metadata url:host`` (MeCo's
short URL), raw reading of that build, and each collator as pretrain makes it under meta=keep, meta=strip,
meta=0.9 and meta=misplaced (target: >= 0.5x raw). Skipped, with the reason, when the build cannot be made with
metadata or holds no ``meta_spans`` column.
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


def pass_rate(ds, collate, batch_size: int, workers: int, in_workers: bool = False,
              max_batches: int | None = None) -> float:
    """Sample tokens per second of one epoch (or of its first ``max_batches`` batches): through sptok's Loader
    (collation where the batches are consumed), or with the collator inside the DataLoader workers."""
    from streaming import StreamingDataLoader

    from sptok.data import Loader
    from sptok.data.loader import resolve_workers

    if in_workers:
        loader = StreamingDataLoader(ds, batch_size=batch_size, num_workers=resolve_workers(workers),
                                     collate_fn=collate)
    else:
        loader = Loader(ds, collate, batch_size=batch_size, num_workers=workers)
    t0, batches = time.perf_counter(), 0
    for _ in loader:
        batches += 1
        if batches == max_batches:
            break
    seconds = time.perf_counter() - t0
    del loader
    return batches * batch_size * ds.build.seq_len / seconds


def hf_mlm(tokenizer_dir: str):
    """transformers' MLM collator over the samples' token ids (its usual input: one dict per sample)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    hf = DataCollatorForLanguageModeling(AutoTokenizer.from_pretrained(tokenizer_dir), mlm_probability=0.15)

    def collate(samples):
        return hf([{"input_ids": torch.from_numpy(np.asarray(s["input_ids"], np.int64))} for s in samples])
    return collate


def variants(info, build: str) -> list:
    """(name, collate, run inside the DataLoader workers): the collators exactly as `sptok pretrain` makes them."""
    from sptok.data import CausalLMCollator, MLMCollator
    from sptok.train.config import Config, DataConfig, ModelConfig
    from sptok.train.loop import make_collator

    def pretrain(family):
        return make_collator(Config(model=ModelConfig(family=family), data=DataConfig(build=build)), info)

    return [("raw StreamingDataset", raw, False),
            ("MLM + MSP (pretrain: bert)", pretrain("bert"), False),
            ("HF DataCollatorForLM (MLM)", hf_mlm(info.tokenizer_dir), False),
            ("causal LM (pretrain: llama)", pretrain("llama"), False),
            ("T5 span corr. (pretrain: t5)", pretrain("t5"), False),
            ("MLM + MSP, policy msp=0.3", MLMCollator(info, sp_policy="msp=0.3"), False),
            ("causal LM, policy strip", CausalLMCollator(info, sp_policy="strip"), False),
            ("MLM + MSP in DL workers*", pretrain("bert"), True)]


META_POLICIES = ("meta=keep", "meta=strip", "meta=0.9", "meta=misplaced")


def meta_variants(info, build: str) -> list:
    """(name, collate, False): raw reading, then each family's collator under each ``meta=`` policy."""
    variants = [("raw StreamingDataset", raw, False)]
    for family, what in (("bert", "MLM + MSP"), ("llama", "causal LM"), ("t5", "T5 span corr.")):
        for policy in META_POLICIES:
            collate = _pretrain_collator(family, build, info)
            collate.set_sp_policy(policy)
            variants.append((f"{what}, {policy}", collate, False))
    return variants


def _pretrain_collator(family: str, build: str, info):
    from sptok.train.config import Config, DataConfig, ModelConfig
    from sptok.train.loop import make_collator

    return make_collator(Config(model=ModelConfig(family=family), data=DataConfig(build=build)), info)


def meta_build(data: Path, tok: Path, out: Path, seq: int) -> str | None:
    """Build the sources with ``--metadata url:host`` into ``out``; None, with the reason printed, when that is
    not possible or the build has no ``meta_spans`` column."""
    from sptok import layout

    if not (out / "sptok.json").exists():
        res = subprocess.run([sys.executable, "-m", "sptok", "build", str(data / "m.yaml"), "--out", str(out),
                              "--tokenizer", str(tok), "--seq-len", str(seq), "--msp-prob", "0.15",
                              "--position", "both", "--metadata", "url:host", "--quiet", "--overwrite"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if res.returncode:
            print(f"meta rows skipped: sptok build --metadata url:host failed: "
                  f"{(res.stderr.strip().splitlines() or ['?'])[-1]}")
            return None
    first = out / "pydocs"
    columns = {c for e in layout.read_index(str(first), "mds") for c in e.get("column_names", ())}
    if "meta_spans" not in columns:
        print(f"meta rows skipped: {out} has no meta_spans column (its build made no metadata)")
        return None
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(HERE.parent.parent / "shared" / "corpus"))
    ap.add_argument("--work", default="/tmp/sptok-bench")
    ap.add_argument("--target-mb", type=float, default=60)
    ap.add_argument("--rounds", type=int, default=2, help="passes per variant, alternating; the best is kept")
    ap.add_argument("--workers", default="auto,1,2",
                    help="loader worker counts to time; auto: what sptok pretrain starts by default")
    ap.add_argument("--hf-batches", type=int, default=256,
                    help="batches in the Hugging Face collator's pass (4.2M tokens at 32 x 512 and at 8 x 2048)")
    a = ap.parse_args()

    from sptok.data import open_dataset
    from sptok.data.loader import resolve_workers
    from sptok.train.config import DataConfig

    default_workers = DataConfig(build=".").num_workers        # what pretrain passes when the config names none

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
    print(f"{'config':<14} {'workers':>8} {'variant':<30} {'Mtok/s':>8} {'per worker':>11} {'vs raw':>7} {'vs HF':>7}")
    for seq, batch in ((512, 32), (2048, 8)):
        out = work / f"dl-{a.target_mb:g}mb-{seq}"
        if not (out / "sptok.json").exists():
            subprocess.run([sys.executable, "-m", "sptok", "build", str(data / "m.yaml"), "--out", str(out),
                            "--tokenizer", str(tok), "--seq-len", str(seq), "--msp-prob", "0.15",
                            "--position", "both", "--quiet", "--overwrite"], check=True, stdout=subprocess.DEVNULL)
        for workers in a.workers.split(","):
            workers = default_workers if workers == "auto" else int(workers)
            label = f"{resolve_workers(workers)} ({workers})" if isinstance(workers, str) else str(workers)
            ds = open_dataset(str(out), batch_size=batch, weights=False)
            rates: dict = {}
            for _ in range(a.rounds):      # variants alternate; each keeps its best pass (others share the CPU)
                for name, collate, in_workers in variants(ds.build, str(out)):
                    slow = name.startswith("HF")   # ~20x slower: part of the epoch is enough
                    r = pass_rate(ds, collate, batch, workers, in_workers, a.hf_batches if slow else None)
                    rates[name] = max(r, rates.get(name, 0.0))
            base, hf = rates["raw StreamingDataset"], rates["HF DataCollatorForLM (MLM)"]
            for name, tps in rates.items():
                print(f"{batch:>3} x {seq:<8} {label:>8} {name:<30} {tps / 1e6:8.2f} "
                      f"{tps / max(1, resolve_workers(workers)) / 1e6:11.2f} "
                      f"{tps / base:7.2f} {tps / hf:7.2f}", flush=True)
            del ds
        out = meta_build(data, tok, work / f"dl-{a.target_mb:g}mb-{seq}-meta", seq)
        if out is None:
            continue
        ds = open_dataset(out, batch_size=batch, weights=False)
        label = f"{resolve_workers(default_workers)} ({default_workers})"
        rates = {}
        for _ in range(a.rounds):
            for name, collate, in_workers in meta_variants(ds.build, out):
                rates[name] = max(pass_rate(ds, collate, batch, default_workers), rates.get(name, 0.0))
        base = rates["raw StreamingDataset"]
        for name, tps in rates.items():
            print(f"{batch:>3} x {seq:<8} {label:>8} {'meta: ' + name:<30} {tps / 1e6:8.2f} "
                  f"{tps / max(1, resolve_workers(default_workers)) / 1e6:11.2f} {tps / base:7.2f} {'':>7}", flush=True)
        del ds
    print("\n* for comparison: the collator passed to the DataLoader itself, running inside the streaming workers;"
          "\n  every other row uses sptok.data.Loader, which collates where the batches are consumed")


if __name__ == "__main__":
    main()

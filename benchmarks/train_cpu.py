"""sptok pretrain's training step against the plain Hugging Face recipe, on CPU, in one run.

    python benchmarks/train_cpu.py [--batch 8 --seq 512 --steps 2 --rounds 8]

Same build (the bundled demo corpus at --seq, prefix SPs, MSP flags p = 0.15, its 8k BPE), model config,
batch, clipping and AdamW for every variant; every variant reads its batches through sptok.data.Loader.
BERT, MLM + MSP (hidden 256, 4 layers, 4 heads):
  (a) sptok: the step of `sptok pretrain` (MLMCollator as pretrain configures it: doc ids, MSP; the document
      mask built for sdpa where attention runs; LM head at the targets only; per-source metrics)
  (b) the same without document attention
  (c) plain HF: BertForMaskedLM (sdpa) + DataCollatorForLanguageModeling, no document mask
T5, span corruption (d_model 256, 4 + 4 layers, 4 heads):
  (a) sptok: encoder, decoder and cross-attention confined to each document, MSP spans, per-source metrics
  (b) the same without document masks
  (c) plain HF: T5ForConditionalGeneration(input_ids, attention_mask, labels) on sptok's span corruption
      without document structure (transformers has no T5 span-corruption collator)
Variants alternate in rounds of --steps steps; each row is the best round (other processes share the CPU and
only ever add time), and the ratio is against (c) (>1 = sptok faster). Tokens are the samples' tokens. Then the attention candidates for document masking.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SHAPE = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def hf_step(family: str, build: str, batch: int, bench):
    """The plain Hugging Face recipe through the same Loader: BERT with DataCollatorForLanguageModeling, T5
    with span corruption without document structure."""
    import transformers as tf

    from sptok.data import Loader, SpanCorruptionCollator, open_dataset
    from sptok.train.config import ModelConfig
    from sptok.train.model import hf_config

    ds = open_dataset(build, batch_size=batch, shuffle=True, weights=False)
    torch.manual_seed(0)
    model = (tf.BertForMaskedLM if family == "bert" else tf.T5ForConditionalGeneration)(
        hf_config(ModelConfig(family=family, **SHAPE), ds.build))
    if family == "bert":
        hf = tf.DataCollatorForLanguageModeling(tf.AutoTokenizer.from_pretrained(ds.build.tokenizer_dir),
                                                mlm_probability=0.15)

        def collate(samples):
            return hf([{"input_ids": torch.from_numpy(np.asarray(s["input_ids"], np.int64))} for s in samples])
    else:
        collate = SpanCorruptionCollator(ds.build, doc_attention=False, extras=False)
    loader = Loader(ds, collate, batch_size=batch)
    return bench.plain_step(model, bench._endless(loader), torch.device("cpu"), fsdp=False)


def compare(family: str, build: str, a, bench) -> None:
    cpu = torch.device("cpu")
    variants = {
        "(a) sptok: doc attention + MSP + per-source metrics":
            bench.sptok_step(family, SHAPE, a.batch, build, cpu, "sdpa", False, False, doc_attention=True)[0],
        "(b) sptok without document attention":
            bench.sptok_step(family, SHAPE, a.batch, build, cpu, "sdpa", False, False, doc_attention=False)[0],
        "(c) plain HF" + (": BertForMaskedLM + DataCollatorForLM" if family == "bert" else
                          ": T5ForConditionalGeneration"): hf_step(family, build, a.batch, bench)}
    times: dict = {name: [] for name in variants}
    for r in range(a.rounds):
        for name, step in variants.items():
            times[name].append(bench.time_steps(step, a.warmup if r == 0 else 0, a.steps, cpu)[0])
    best = {name: min(t) for name, t in times.items()}
    ref = best[list(variants)[-1]]
    for name, t in best.items():
        print(f"{family:<5} {name:<56} {1e3 * t:8.0f} {a.batch * a.seq / t:10,.0f} {ref / t:8.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--models", default="bert,t5")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--work", default="/tmp/sptok-bench")
    a = ap.parse_args()
    import transformers

    if a.threads:
        torch.set_num_threads(a.threads)
    bench, cand = _load("pretrain_mfu"), _load("attention_candidates")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    build = bench.ensure_build(a.seq, work, "prefix")
    print(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; batch {a.batch} x {a.seq}, best of {a.rounds} rounds of {a.steps} steps\n")
    print(f"{'model':<5} {'variant':<56} {'ms/step':>8} {'tokens/s':>10} {'vs (c)':>8}")
    for family in a.models.split(","):
        compare(family, build, a, bench)
    print()
    cand.print_table(cand.demo_doc_ids(a.seq, a.batch, work), SHAPE["num_heads"],
                     SHAPE["hidden_size"] // SHAPE["num_heads"], torch.device("cpu"), torch.float32)


if __name__ == "__main__":
    main()

"""sptok pretrain's training step against the best plain Hugging Face setup, on one GPU, in one run.

    python benchmarks/pretrain_mfu.py                 # GPU: Llama 1.1B / 350M, BERT-base and T5-base
    python benchmarks/pretrain_mfu.py --smoke         # CPU: tiny shapes, to check the script runs (not timed)

Llama (batch 8 and 16 x 2048, per-block compile, FSDP2 bf16, fused AdamW):
  (a) sptok: LossModel fed by sptok.data.Loader from a real build (CausalLMCollator: position ids restart per
      document, per-source loss and SP metrics on);
  (b) plain: LlamaForCausalLM, flex_attention with position ids restarting per document (transformers builds a
      document BlockMask), tokens already on the GPU;  (c) as (b) with sdpa causal attention, no document mask.
BERT-base at seq 512 (the paper's model; batch --bert-batch, bf16 autocast, fused AdamW):
  (a) sptok: Loader + MLMCollator as `sptok pretrain` configures it (doc ids, MSP), the boolean document mask
      built on the GPU for sdpa, LM head at the targets, per-source metrics;  (a2) the same with
      flex_attention and a BlockMask (transformers >= 5);
  (b) plain: BertForMaskedLM, sdpa, no document mask, 15% random MLM labels, tokens already on the GPU.
T5-base at seq 512 (12 + 12 layers, gated GELU; bf16 autocast, fused AdamW):
  (a) sptok: Loader + SpanCorruptionCollator (doc ids, MSP spans), encoder, decoder and cross-attention
      confined to each document, per-source metrics;  (b) plain: T5ForConditionalGeneration on the same
      span-corrupted batches without document structure, already on the GPU.
Each row: ms/step, tokens/s (sample tokens), MFU = model FLOPs / 989.4 TFLOP/s (H100/H200 bf16 dense), and
host-device synchronisations per step (torch.cuda.set_sync_debug_mode). Then the attention kernel candidates
for document masking at BERT-base's shape (benchmarks/attention_candidates.py) and the Loader's tokens/s.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SHAPES = {"1.1b": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632),
          "350m": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2816),
          "bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
          "t5-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048),
          "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)}
PEAK = 989.4e12


def _candidates():
    spec = importlib.util.spec_from_file_location("attention_candidates", HERE / "attention_candidates.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ensure_build(seq: int, work: Path, position: str) -> str:
    out = work / f"bench-build-{position}-{seq}"
    if not (out / "sptok.json").exists():
        subprocess.run([sys.executable, "-m", "sptok", "build", str(ROOT / "pipelines" / "demo.yaml"), "--out", str(out),
                        "--seq-len", str(seq), "--position", position, "--msp-prob", "0" if position == "post" else
                        "0.15", "--quiet", "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return str(out)


def flops_per_step(model, tokens: int, seq: int, target_tokens: int = 0) -> float:
    """6 x non-embedding parameters x tokens + attention (12 x layers x hidden x seq per token); T5: the
    decoder's parameters count for the target tokens only."""
    from sptok.train.model import non_embedding_params

    c = model.config
    if c.model_type == "t5":
        dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.block"))
        enc = non_embedding_params(model) - dec
        attn = 12 * c.num_layers * c.d_model * seq * (tokens + target_tokens)
        return 6 * (enc * tokens + dec * target_tokens) + attn
    return (6 * non_embedding_params(model) + 12 * c.num_hidden_layers * c.hidden_size * seq) * tokens


def time_steps(step_fn, warmup: int, steps: int, device) -> tuple[float, float]:
    """(seconds per step, host-device synchronisations per step, counted by torch's sync debug mode)."""
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        for _ in range(steps):
            step_fn()
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / steps
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return seconds, syncs / steps


def shard(model_root, blocks, device, compile_: bool):
    if compile_:
        for b in blocks:
            b.compile()
    if device.type != "cuda":
        return model_root
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for b in blocks:
        fully_shard(b, mp_policy=mp)
    fully_shard(model_root, mp_policy=mp)
    return model_root


def sptok_step(family: str, shape: dict, batch: int, build: str, device, attn: str, compile_: bool, fsdp: bool,
               doc_attention: bool = True):
    """(step function, the transformers model) of sptok's step: Loader + collator as pretrain makes it,
    LossModel, forward_backward with per-source metrics, gradient clipping, fused AdamW."""
    from sptok.data import Loader, open_dataset
    from sptok.train.config import Config, DataConfig, ModelConfig
    from sptok.train.loop import Meter, _clip, forward_backward, make_collator
    from sptok.train.losses import LossModel
    from sptok.train.model import blocks, build_model

    ds = open_dataset(build, batch_size=batch, shuffle=True, weights=False)
    info = ds.build
    cfg = Config(model=ModelConfig(family=family, attn_implementation=attn, **shape), data=DataConfig(build=build))
    with torch.device(device):
        model = build_model(cfg.model, info)
    lm = LossModel(model, family, info.sp_ids.tolist()).to(device)
    if fsdp:
        lm = shard(lm, blocks(model), device, compile_)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=device.type == "cuda")
    collator = make_collator(cfg, info)
    collator.doc_attention = doc_attention
    loader = Loader(ds, collator, batch_size=batch, num_workers=2 if device.type == "cuda" else 0)
    batches, meter = _endless(loader), Meter(len(info.sources), device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and not fsdp)

    def step():
        forward_backward(lm, [next(batches)], 1, device, meter, autocast)
        _clip(lm, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model


def _endless(loader):
    while True:
        yield from loader


def plain_step(model, batches, device, fsdp: bool):
    """The plain loop: model(**batch).loss, backward, clipping, fused AdamW; ``batches`` yields the kwargs."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and not fsdp)

    def step():
        with autocast:
            loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def plain_llama(shape, batch, seq, vocab, device, attn, doc_mask, compile_):
    import transformers as tf

    c = tf.LlamaConfig(vocab_size=vocab, hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_layers"],
                       num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                       intermediate_size=shape["intermediate_size"], max_position_embeddings=seq, use_cache=False,
                       tie_word_embeddings=False)
    c._attn_implementation = attn
    with torch.device(device):
        model = tf.LlamaForCausalLM(c)
    model = shard(model, list(model.model.layers), device, compile_)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    kwargs = {"input_ids": ids, "labels": ids}
    if doc_mask:   # 8 documents per sample: position ids restart, transformers masks each document
        kwargs["position_ids"] = (torch.arange(seq) % (seq // 8)).expand(batch, seq).to(device)
    return plain_step(model, _repeat(kwargs), device, fsdp=True), model


def _repeat(batch: dict):
    while True:
        yield batch


def plain_encoder(family: str, shape, batch, build, device):
    """Plain Hugging Face BERT (random 15% MLM labels) or T5 (sptok's span corruption without document
    structure: transformers has no T5 span-corruption collator), the batch already on the device."""
    import transformers as tf

    from sptok.data import MLMCollator, SpanCorruptionCollator, open_dataset
    from sptok.train.config import ModelConfig
    from sptok.train.model import hf_config

    ds = open_dataset(build, batch_size=batch, shuffle=True, weights=False)
    info = ds.build
    config = hf_config(ModelConfig(family=family, **shape), info)
    samples = [s for _, s in zip(range(batch), iter(ds))]
    if family == "bert":
        config._attn_implementation = "sdpa"
        kwargs = MLMCollator(info, doc_attention=False, extras=False)(samples)   # same MLM rate and shape
        cls = tf.BertForMaskedLM
    else:
        kwargs = SpanCorruptionCollator(info, doc_attention=False, extras=False)(samples)
        cls = tf.T5ForConditionalGeneration
    with torch.device(device):
        model = cls(config)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    return plain_step(model, _repeat(kwargs), device, fsdp=False), model, kwargs


def report(name: str, rows: list, batch: int, seq: int, flops) -> None:
    """rows: (label, seconds/step, syncs/step, model)."""
    for label, t, syncs, model in rows:
        tps = batch * seq / t
        print(f"{name:<10} {batch:>5} {label:<48} {1e3 * t:9.1f} {tps:11,.0f} "
              f"{100 * flops(model) / t / PEAK:5.1f}% {syncs:6.1f}", flush=True)
    print(f"{name:<10} {batch:>5} " + "   ".join(f"a/{r[0][1:r[0].index(')')]} = {r[1] / rows[0][1]:.2f}"
                                              for r in rows[1:]))


def run_llama(a, device, work: Path, doc_attn: str, compile_: bool) -> None:
    build = ensure_build(a.seq, work, "post")
    for size in a.sizes.split(","):
        for batch in map(int, a.batches.split(",")):
            step, model = sptok_step("llama", SHAPES[size], batch, build, device, doc_attn, compile_, fsdp=True)
            rows = [("(a) sptok: loader + doc mask + SP metrics", *time_steps(step, a.warmup, a.steps, device), model)]
            vocab = model.config.vocab_size
            step, model = plain_llama(SHAPES[size], batch, a.seq, vocab, device, doc_attn, True, compile_)
            rows.append(("(b) plain HF: document mask (flex on GPU)", *time_steps(step, a.warmup, a.steps, device),
                         model))
            step, model = plain_llama(SHAPES[size], batch, a.seq, vocab, device, "sdpa", False, compile_)
            rows.append(("(c) plain HF: sdpa causal, no doc mask", *time_steps(step, a.warmup, a.steps, device), model))
            report(f"llama-{size}", rows, batch, a.seq, lambda m: flops_per_step(m, batch * a.seq, a.seq))
            del rows, model, step
            _free(device)


def run_encoder(family: str, a, device, work: Path, shape: dict, batch: int) -> None:
    """BERT or T5 rows: sptok's step (with each document-mask form that runs here) against plain HF."""
    import transformers

    build = ensure_build(a.enc_seq, work, "prefix")
    step, model, plain_batch = plain_encoder(family, shape, batch, build, device)
    rows_b = [("(b) plain HF: sdpa, no document mask" if family == "bert" else "(b) plain HF: no document mask",
               *time_steps(step, a.warmup, a.steps, device), model)]
    del step, model
    _free(device)
    if family == "t5":   # decoder parameters count for the target tokens
        Li, Lo = plain_batch["input_ids"].shape[1], plain_batch["labels"].shape[1]
        flops = lambda m: flops_per_step(m, batch * Li, Li, batch * Lo)  # noqa: E731
    else:
        flops = lambda m: flops_per_step(m, batch * a.enc_seq, a.enc_seq)  # noqa: E731
    forms = [("sdpa", "(a) sptok: doc mask (sdpa bool) + MSP + metrics" if family == "bert" else
              "(a) sptok: doc masks enc/dec/cross + MSP + metrics")]
    if family == "bert":
        forms.append(("flex_attention", "(a2) sptok: doc mask as flex BlockMask"))
    rows, skipped = [], []
    for attn, label in forms:
        if attn == "flex_attention" and (device.type != "cuda" or int(transformers.__version__.split(".")[0]) < 5):
            skipped.append(f"{family:<10} {batch:>5} {label:<48}   skipped: needs CUDA and transformers >= 5")
            continue
        step, model = sptok_step(family, shape, batch, build, device, attn, compile_=False, fsdp=False)
        rows.append((label, *time_steps(step, a.warmup, a.steps, device), model))
        del step
        _free(device)
    report(family, rows + rows_b, batch, a.enc_seq, flops)
    for line in skipped:
        print(line)


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def loader_tokens_per_s(build: str, batch: int) -> float:
    from sptok.data import CausalLMCollator, Loader, open_dataset

    ds = open_dataset(build, batch_size=batch, weights=False)
    t0, n = time.perf_counter(), 0
    for b in Loader(ds, CausalLMCollator(ds.build), batch_size=batch, num_workers=2):
        n += b["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, times nothing")
    ap.add_argument("--models", default="llama,bert,t5")
    ap.add_argument("--sizes", default="1.1b,350m")
    ap.add_argument("--batches", default="8,16")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--enc-seq", type=int, default=512, help="BERT and T5 sequence length")
    ap.add_argument("--bert-batch", type=int, default=32)
    ap.add_argument("--t5-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--work", default="/tmp/sptok-bench")
    a = ap.parse_args()
    bert, t5 = SHAPES["bert-base"], SHAPES["t5-base"]
    if a.smoke:
        a.sizes, a.batches, a.seq, a.enc_seq, a.steps, a.warmup = "tiny", "2", 128, 128, 2, 1
        a.bert_batch = a.t5_batch = 2
        bert = t5 = {k: v for k, v in SHAPES["tiny"].items() if k != "num_kv_heads"}
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if device.type == "cuda":
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29555")
        dist.init_process_group("nccl", rank=0, world_size=1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    import transformers

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run, not timed)"
    print(f"device: {gpu}; torch {torch.__version__}; transformers {transformers.__version__}\n")
    print(f"{'model':<10} {'batch':>5} {'variant':<48} {'ms/step':>9} {'tokens/s':>11} {'MFU':>6} {'syncs':>6}")
    models = a.models.split(",")
    if "llama" in models:
        # flex_attention needs a GPU (and compile) to be fast; on CPU the smoke run uses sdpa throughout
        run_llama(a, device, work, "flex_attention" if device.type == "cuda" else "sdpa", device.type == "cuda")
    if "bert" in models:
        run_encoder("bert", a, device, work, bert, a.bert_batch)
    if "t5" in models:
        run_encoder("t5", a, device, work, t5, a.t5_batch)
    print()
    cand = _candidates()
    heads = bert["num_heads"]
    doc_ids = cand.demo_doc_ids(a.enc_seq, a.bert_batch, work)
    cand.print_table(doc_ids, heads, bert["hidden_size"] // heads, device,
                     torch.bfloat16 if device.type == "cuda" else torch.float32, repeat=a.steps)
    lt = loader_tokens_per_s(ensure_build(a.seq, work, "post"), int(a.batches.split(",")[0]))
    print(f"\nsptok Loader on the CPU: {lt:,.0f} tokens/s (target: >= 10x what the GPU consumes)")


if __name__ == "__main__":
    main()

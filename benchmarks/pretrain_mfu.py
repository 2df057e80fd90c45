"""sptok pretrain's training step against the best plain Hugging Face setup, on one GPU, in one run.

    python benchmarks/pretrain_mfu.py                 # GPU: 1.1B and 350M Llama, batch 8 and 16 x 2048
    python benchmarks/pretrain_mfu.py --smoke         # CPU: a tiny shape, to check the script runs (not timed)

(a) sptok: LossModel(Llama) fed by sptok.data.Loader from a real build (CausalLMCollator: position ids restart
    per document, per-source loss and SP metrics on), per-block torch.compile, FSDP2 bf16, fused AdamW;
(b) plain: LlamaForCausalLM, flex_attention with position ids restarting per document (transformers builds
    a document BlockMask), use_cache=False, per-block compile before fully_shard, bf16, fused AdamW, tokens
    already on the GPU;
(c) as (b) with sdpa causal attention and no document mask.
MFU = tokens/s x (6 x non-embedding params + 12 x layers x hidden x seq) / 989.4 TFLOP/s (H100/H200 bf16 dense).
Also reports the Loader's tokens/s on the CPU next to what the GPU consumes. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"1.1b": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632),
          "350m": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2816),
          "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)}
PEAK = 989.4e12


def ensure_build(seq: int, work: Path) -> str:
    out = work / f"bench-build-{seq}"
    if not (out / "sptok.json").exists():
        subprocess.run([sys.executable, "-m", "sptok", "build", str(ROOT / "pipelines" / "demo.yaml"), "--out", str(out),
                        "--seq-len", str(seq), "--position", "post", "--msp-prob", "0", "--quiet", "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
    return str(out)


def model_flops_per_token(model, seq: int) -> float:
    from sptok.train.model import non_embedding_params

    c = model.config
    return 6 * non_embedding_params(model) + 12 * c.num_hidden_layers * c.hidden_size * seq


def build_llama(shape: dict, vocab: int, seq: int, attn: str, device):
    import transformers as tf

    c = tf.LlamaConfig(vocab_size=vocab, hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_layers"],
                       num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                       intermediate_size=shape["intermediate_size"], max_position_embeddings=seq, use_cache=False,
                       tie_word_embeddings=False)
    c._attn_implementation = attn
    with torch.device(device):
        return tf.LlamaForCausalLM(c)


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


def time_steps(step_fn, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def run_sptok(shape, batch, seq, build, device, attn, compile_, warmup, steps):
    from sptok.data import CausalLMCollator, Loader, open_dataset
    from sptok.train.loop import Meter, forward_backward
    from sptok.train.losses import LossModel
    from sptok.train.model import blocks

    ds = open_dataset(build, batch_size=batch, shuffle=True, weights=False)
    info = ds.build
    model = build_llama(shape, max(32000, info.vocab_size), seq, attn, device)
    lm = LossModel(model, "llama", info.sp_ids.tolist()).to(device)
    lm = shard(lm, blocks(model), device, compile_)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=device.type == "cuda")
    batches = iter(Loader(ds, CausalLMCollator(info), batch_size=batch, num_workers=2 if device.type == "cuda" else 0))
    meter = Meter(len(info.sources), device)

    def step():
        nonlocal batches
        try:
            b = next(batches)
        except StopIteration:
            batches = iter(Loader(ds, CausalLMCollator(info), batch_size=batch))
            b = next(batches)
        forward_backward(lm, [{k: v.to(device, non_blocking=True) for k, v in b.items()}], 1, meter)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, warmup, steps, device), model


def run_plain(shape, batch, seq, vocab, device, attn, doc_mask, compile_, warmup, steps):
    model = build_llama(shape, vocab, seq, attn, device)
    model = shard(model, list(model.model.layers), device, compile_)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    kwargs = {"input_ids": ids, "labels": ids}
    if doc_mask:   # 8 documents per sample: position ids restart, transformers masks each document
        pos = torch.arange(seq) % (seq // 8)
        kwargs["position_ids"] = pos.expand(batch, seq).to(device)

    def step():
        loss = model(**kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, warmup, steps, device), model


def loader_tokens_per_s(build: str, batch: int, seq: int) -> float:
    from sptok.data import CausalLMCollator, Loader, open_dataset

    ds = open_dataset(build, batch_size=batch, weights=False)
    t0, n = time.perf_counter(), 0
    for b in Loader(ds, CausalLMCollator(ds.build), batch_size=batch, num_workers=2):
        n += b["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, times nothing")
    ap.add_argument("--sizes", default="1.1b,350m")
    ap.add_argument("--batches", default="8,16")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--work", default="/tmp/sptok-bench")
    a = ap.parse_args()
    if a.smoke:
        a.sizes, a.batches, a.seq, a.steps, a.warmup = "tiny", "2", 128, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if device.type == "cuda":
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29555")
        dist.init_process_group("nccl", rank=0, world_size=1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    build = ensure_build(a.seq, work)
    # flex_attention needs a GPU (and compile) to be fast; on CPU the smoke run uses sdpa throughout
    doc_attn = "flex_attention" if device.type == "cuda" else "sdpa"
    compile_ = device.type == "cuda"
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run, not timed)"
    print(f"device: {gpu}; torch {torch.__version__}; seq {a.seq}\n")
    print(f"{'size':<6} {'batch':>5} {'variant':<44} {'ms/step':>9} {'tokens/s':>11} {'MFU':>6}")
    for size in a.sizes.split(","):
        for batch in map(int, a.batches.split(",")):
            rows = []
            t, model = run_sptok(SHAPES[size], batch, a.seq, build, device, doc_attn, compile_, a.warmup, a.steps)
            rows.append(("(a) sptok: loader + doc mask + SP metrics", t, model))
            vocab = model.config.vocab_size
            del model
            t, model = run_plain(SHAPES[size], batch, a.seq, vocab, device, doc_attn, True, compile_, a.warmup, a.steps)
            rows.append(("(b) plain HF: document mask (flex on GPU)", t, model))
            del model
            t, model = run_plain(SHAPES[size], batch, a.seq, vocab, device, "sdpa", False, compile_, a.warmup, a.steps)
            rows.append(("(c) plain HF: sdpa causal, no doc mask", t, model))
            for name, t, m in rows:
                tps = batch * a.seq / t
                print(f"{size:<6} {batch:>5} {name:<44} {1e3 * t:9.1f} {tps:11,.0f} "
                      f"{100 * tps * model_flops_per_token(m, a.seq) / PEAK:5.1f}%", flush=True)
            print(f"{size:<6} {batch:>5} a/b = {rows[1][1] / rows[0][1]:.2f}   a/c = {rows[2][1] / rows[0][1]:.2f}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    lt = loader_tokens_per_s(build, int(a.batches.split(",")[0]), a.seq)
    print(f"\nsptok Loader on the CPU: {lt:,.0f} tokens/s (target: >= 10x what the GPU consumes)")


if __name__ == "__main__":
    main()

"""Document-masking candidates for attention, side by side: the attention kernel alone, forward + backward.

    python benchmarks/attention_candidates.py [--batch 8 --heads 4 --seq 512 --threads N]     # CPU, fp32
    (benchmarks/pretrain_mfu.py runs the same table on a GPU, in bf16, at BERT-base's shape)

The documents are those of real samples (the bundled demo corpus built at --seq); each candidate builds its
mask from the batch's doc ids at every call, as a training step does. Candidates:
  sdpa, no mask           no document masking: the reference every ratio is against
  sdpa + bool mask        B x 1 x L x L boolean mask from doc ids, built on the device (sptok's default)
  sdpa + float mask       the same as an additive float mask (what eager attention and transformers 4.x use)
  flex + BlockMask        flex_attention, compiled, with a BlockMask skipping blocks outside every document
                          (training needs CUDA: flex_attention has no backward on CPU)
  varlen                  torch.nn.attention.varlen.varlen_attn over the documents laid end to end (CUDA only)
  nested jagged sdpa      sdpa over a jagged nested tensor of documents: a varlen path that runs on CPU
Candidates alternate over --repeat rounds; prints each one's fastest call and its ratio to the reference
(>1 = faster). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def demo_doc_ids(seq: int, batch: int, work: Path) -> torch.Tensor:
    """(batch, seq) doc ids of real samples: the demo corpus built at ``seq``, read through MLMCollator."""
    from sptok.data import MLMCollator, open_dataset

    out = work / f"bench-build-prefix-{seq}"
    if not (out / "sptok.json").exists():
        subprocess.run([sys.executable, "-m", "sptok", "build", str(ROOT / "pipelines" / "demo.yaml"), "--out",
                        str(out), "--seq-len", str(seq), "--msp-prob", "0.15", "--quiet", "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
    ds = open_dataset(str(out), batch_size=batch, shuffle=True, shuffle_seed=0, weights=False)
    samples = [s for _, s in zip(range(batch), iter(ds))]
    return MLMCollator(ds.build)(samples)["doc_ids"]


def candidates(doc_ids: torch.Tensor, heads: int, head_dim: int, device, dtype) -> dict:
    """name -> a function running one forward + backward, or the reason it cannot run here."""
    B, L = doc_ids.shape
    doc = doc_ids.to(device)
    q, k, v = (torch.randn(B, heads, L, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    lengths = [len(run) for row in doc_ids.tolist() for run in _runs(row)]      # the host knows them (collator)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    out: dict = {}

    def sdpa(mask_fn):
        def run():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask_fn()).sum().backward()
        return run

    same = lambda: (doc[:, :, None] == doc[:, None, :])[:, None]  # noqa: E731
    out["sdpa, no mask (reference)"] = sdpa(lambda: None)
    out["sdpa + bool mask (sptok default)"] = sdpa(same)
    out["sdpa + float mask"] = sdpa(lambda: torch.zeros(B, 1, L, L, device=device, dtype=dtype).masked_fill_(
        ~same(), torch.finfo(dtype).min))
    out["flex + BlockMask (compiled)"] = _flex(q, k, v, doc) if device.type == "cuda" else \
        "needs CUDA: flex_attention has no backward on CPU"
    out["varlen (torch varlen_attn)"] = _varlen(q, k, v, cu, max(lengths)) if device.type == "cuda" else \
        "needs CUDA: flash kernels only"
    out["nested jagged sdpa"] = _jagged(q, k, v, cu)
    return out


def _runs(row: list[int]) -> list[list[int]]:
    """Consecutive equal values of a row (its documents, and the padding run)."""
    runs: list[list[int]] = []
    for x in row:
        if runs and runs[-1][0] == x:
            runs[-1].append(x)
        else:
            runs.append([x])
    return runs


def _flex(q, k, v, doc):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, _, L, _ = q.shape
    flex = torch.compile(flex_attention)

    def run():
        mask = create_block_mask(lambda b, h, i, j: doc[b, i] == doc[b, j], B, None, L, L, device=q.device)
        flex(q, k, v, block_mask=mask).sum().backward()
    return run


def _varlen(q, k, v, cu, max_len: int):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return "needs torch >= 2.9"
    B, H, L, D = q.shape

    def run():
        flat = [x.transpose(1, 2).reshape(B * L, H, D) for x in (q, k, v)]
        varlen_attn(*flat, cu, cu, max_len, max_len).sum().backward()
    return run


def _jagged(q, k, v, cu):
    B, H, L, D = q.shape

    def nested(x):
        return torch.nested.nested_tensor_from_jagged(x.transpose(1, 2).reshape(B * L, H, D), cu.long()).transpose(1, 2)

    def run():
        F.scaled_dot_product_attention(nested(q), nested(k), nested(v)).values().sum().backward()
    return run


def _call(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def print_table(doc_ids, heads: int, head_dim: int, device, dtype, repeat: int = 7) -> None:
    """Candidates alternate over ``repeat`` rounds after one warm-up call each; each keeps its fastest call
    (other processes only ever add time). One taking over a second a call is timed in two rounds only."""
    B, L = doc_ids.shape
    docs = sum(len(_runs(row)) for row in doc_ids.tolist())
    print(f"attention, forward + backward: batch {B}, {heads} heads x {head_dim}, seq {L}, {dtype}, {device.type}; "
          f"{docs} documents (mean {B * L / docs:.0f} tokens)")
    print(f"{'candidate':<36} {'ms/call':>9} {'vs no mask':>11}")
    runs, warm, notes = candidates(doc_ids, heads, head_dim, device, dtype), {}, {}
    for name, fn in runs.items():
        if isinstance(fn, str):
            notes[name] = fn
            continue
        try:
            warm[name] = _call(fn, device)        # warm-up (and flex's compilation)
        except Exception as e:   # a candidate this torch cannot run: say so, keep the table
            notes[name] = f"failed: {type(e).__name__}: {str(e)[:80]}"
    times: dict = {name: [] for name in warm}
    for r in range(repeat):
        for name in warm:
            if r < 2 or warm[name] < 1.0:
                times[name].append(_call(runs[name], device))
    best = {name: min(t) for name, t in times.items()}
    ref = best.get("sdpa, no mask (reference)")
    for name in runs:
        if name in notes:
            print(f"{name:<36} {'-':>9} {'-':>11}   ({notes[name]})")
        else:
            print(f"{name:<36} {1e3 * best[name]:9.1f} {ref / best[name]:11.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--work", default="/tmp/sptok-bench")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print_table(demo_doc_ids(a.seq, a.batch, work), a.heads, a.head_dim, torch.device("cpu"), torch.float32,
                repeat=a.repeat)


if __name__ == "__main__":
    main()

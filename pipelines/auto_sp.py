"""Auto-SP end to end: does an MSP-pre-trained model name the source of text it has never seen?

    python pipelines/auto_sp.py [--corpus ../shared/corpus] [--work out/auto-sp] [--minutes 15]

1. Split each of the four shared sources into training documents and a held-out slice (10%, at most 500
   documents a source, chosen by a seeded hash of the id) that no build, tokenizer or model ever sees.
2. Train a byte-level BPE on the training documents, build them with SPs (prefix, MSP flags p = 0.3).
3. Pre-train a small BERT with MLM + MSP on CPU for at most --minutes, and the same model with the MSP
   flags switched off at load time (`sp_policy: msp=0`: the SP is always visible, never predicted).
4. Label the held-out documents with both (`sptok label --eval`), from the first 125 and the first 64 tokens,
   next to two baselines computed in the same run: the majority class, and a bag-of-words classifier
   (hashed unigram + bigram token features, logistic regression, fitted on the training documents).
Prints the table and writes results.json in --work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pydocs", "code", "fortunes", "chinese")
BUCKETS = 1 << 18
FULL = 125   # the text tokens that fit a 128-token sample next to the SP slot, the delimiter and EOS


def sh(*args, **kw):
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run([str(a) for a in args], check=True, **kw)


def split(corpus: Path, work: Path, seed: int) -> dict:
    """Train / held-out JSONL per source; the held-out slice is decided by a seeded hash of each id."""
    import zstandard

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    counts = {}
    held_rows = []
    for s in SOURCES:
        raw = zstandard.ZstdDecompressor().stream_reader(open(corpus / f"{s}.jsonl.zst", "rb")).read()
        recs = [json.loads(x) for x in raw.splitlines() if x.strip()]
        key = lambda r: hashlib.blake2b(f"{seed}:{r['id']}".encode(), digest_size=8).digest()  # noqa: E731
        order = sorted(recs, key=key)
        n_held = min(500, len(recs) // 10)
        held = order[:n_held]
        held_ids = {r["id"] for r in held}
        train = [r for r in recs if r["id"] not in held_ids]          # in corpus order
        with open(data / f"{s}.jsonl", "w") as f:
            for r in train:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        held_rows += [{"id": r["id"], "text": r["text"], "source": s} for r in held]
        counts[s] = {"train": len(train), "held_out": len(held)}
    with open(work / "held_out.jsonl", "w") as f:
        for r in held_rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (work / "train.yaml").write_text("sources:\n" + "".join(
        f"  - {{name: {s}, paths: data/{s}.jsonl, id_field: id}}\n" for s in SOURCES))
    return counts


# ------------------------------------------------------------------------------------------ baselines

def features(ids: list[int]) -> np.ndarray:
    """Hashed unigram and bigram ids of one token sequence."""
    a = np.asarray(ids, np.int64)
    uni = (a * 0x9E3779B1) % BUCKETS
    bi = ((a[:-1] * 0x85EBCA6B) ^ (a[1:] * 0xC2B2AE35)) % BUCKETS if len(a) > 1 else np.empty(0, np.int64)
    return np.concatenate([uni, bi])


def bag_of_words(tok, train_rows, test_rows, max_tokens: int, seed: int) -> float:
    """Multinomial logistic regression on hashed unigram + bigram counts (an EmbeddingBag is the sparse X @ W)."""
    import torch

    def encode(rows, n):
        return [features(tok.encode(r["text"], add_special_tokens=False).ids[:n]) for r in rows]

    label = {s: i for i, s in enumerate(SOURCES)}
    xs, ys = encode(train_rows, FULL), torch.tensor([label[r["source"]] for r in train_rows])
    torch.manual_seed(seed)
    model = torch.nn.EmbeddingBag(BUCKETS, len(SOURCES), mode="sum")
    torch.nn.init.zeros_(model.weight)
    bias = torch.nn.Parameter(torch.zeros(len(SOURCES)))
    opt = torch.optim.Adam(list(model.parameters()) + [bias], lr=0.05)
    weights = len(ys) / (len(SOURCES) * torch.bincount(ys, minlength=len(SOURCES)).float())   # balanced classes

    def batch(x_list):
        offsets = torch.tensor(np.cumsum([0] + [len(x) for x in x_list[:-1]]))
        return torch.from_numpy(np.concatenate(x_list)), offsets

    for epoch in range(8):
        perm = torch.randperm(len(xs))
        for i in range(0, len(xs), 256):
            idx = perm[i:i + 256].tolist()
            flat, off = batch([xs[j] for j in idx])
            loss = torch.nn.functional.cross_entropy(model(flat, off) + bias, ys[idx], weight=weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt = encode(test_rows, max_tokens)
    with torch.no_grad():
        flat, off = batch(xt)
        pred = (model(flat, off) + bias).argmax(-1)
    yt = torch.tensor([label[r["source"]] for r in test_rows])
    return float((pred == yt).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    ap.add_argument("--work", default=str(ROOT / "out" / "auto-sp"))
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget of each model")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if not Path(a.corpus, "pydocs.jsonl.zst").exists():
        sys.exit(f"error: the shared corpus is not at {a.corpus} (pass --corpus DIR)")
    t_start = time.time()
    counts = split(Path(a.corpus), work, a.seed)
    sptok = [sys.executable, "-m", "sptok"]
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        sh(*sptok, "tokenizer", "train", work / "train.yaml", "--out", tok_dir, "--vocab-size", "8192", "--model", "bpe")
    build = work / "build"
    sh(*sptok, "build", work / "train.yaml", "--out", build, "--tokenizer", tok_dir, "--seq-len", "128",
       "--msp-prob", "0.3", "--position", "prefix", "--quiet")
    info = json.loads((build / "sptok.json").read_text())
    tokens = sum(c["sample_tokens"] for c in info["counts"].values())
    config = ROOT / "pipelines" / "auto-sp.yaml"
    results = {"counts": counts, "build_tokens": tokens, "models": {}}
    for name, policy in (("msp", "keep"), ("no-msp", "msp=0")):
        run = work / name
        t0 = time.time()
        sh(*sptok, "pretrain", config, "--set", f"data.build={build}", "--set", f"data.sp_policy={policy}",
           "--set", f"train.max_minutes={a.minutes}", "--set", f"checkpoint.dir={run}/ckpt",
           "--set", f"log.dir={run}/log", "--set", f"train.seed={a.seed}")
        minutes = (time.time() - t0) / 60
        sh(*sptok, "export", run / "ckpt", "--out", run / "model")
        res = {"train_minutes": round(minutes, 2)}
        for n in (FULL, 64):
            out = run / f"labels-{n}.jsonl"
            sh(*sptok, "label", "--model", run / "model", "--input", work / "held_out.jsonl", "--out", out,
               "--source-field", "source", "--eval", "--eval-out", run / f"eval-{n}", "--max-tokens", str(n),
               "--quiet")
            res[f"accuracy_{n}"] = json.loads((run / f"eval-{n}" / "eval.json").read_text())["accuracy"]
            res[f"ece_{n}"] = json.loads((run / f"eval-{n}" / "eval.json").read_text()).get("ece")
        results["models"][name] = res
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.encode_special_tokens = True
    train_rows = [dict(json.loads(x), source=s) for s in SOURCES for x in open(work / "data" / f"{s}.jsonl")]
    held = [json.loads(x) for x in open(work / "held_out.jsonl")]
    results["bag_of_words"] = {f"accuracy_{n}": bag_of_words(tok, train_rows, held, n, a.seed) for n in (FULL, 64)}
    majority = max(c["held_out"] for c in counts.values()) / sum(c["held_out"] for c in counts.values())
    results["majority"] = majority
    results["minutes_total"] = round((time.time() - t_start) / 60, 1)
    (work / "results.json").write_text(json.dumps(results, indent=1))

    print("\nheld-out documents: " + ", ".join(f"{s} {c['held_out']}" for s, c in counts.items()))
    print(f"{'predictor':<44} {f'first {FULL} tokens':>17} {'first 64 tokens':>16}")
    print(f"{'majority class':<44} {100 * majority:16.1f}% {100 * majority:15.1f}%")
    bow = results["bag_of_words"]
    print(f"{'bag of words (hashed 1+2-grams, logistic)':<44} {100 * bow[f'accuracy_{FULL}']:16.1f}% "
          f"{100 * bow['accuracy_64']:15.1f}%")
    for name, label in (("msp", "auto-SP, BERT pre-trained with MSP"), ("no-msp", "auto-SP, BERT without MSP")):
        r = results["models"][name]
        print(f"{label:<44} {100 * r[f'accuracy_{FULL}']:16.1f}% {100 * r['accuracy_64']:15.1f}%   "
              f"({r['train_minutes']:.1f} min training)")


if __name__ == "__main__":
    main()

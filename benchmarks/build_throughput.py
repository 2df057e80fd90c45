"""sptok build against the tokenizer alone, an llm-foundry-style build and datatrove, side by side.

    python benchmarks/build_throughput.py [--corpus ../shared/corpus] [--target-mb 60]

Runs every variant as a child process on the same data (the shared sources repeated to >= target MB of
text) with the same byte-level BPE tokenizer (32k vocab, trained by sptok), measures wall time and the
peak RSS of each process tree (sampled from /proc), and prints tokens/s and the ratios:
  (a) sptok build, all cores            (b) raw ceiling: JSONL + HF encode_batch, nothing written
  (c) llm-foundry style: datasets streaming, tokenizer per document, 2048-token concat, MDSWriter zstd
  (d) datatrove DocumentTokenizer (skipped when datatrove is not installed)
plus sptok 2 workers vs 1 worker, and peak RSS at 1x vs 4x the input (memory must stay flat).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SOURCES = ("pydocs", "code", "fortunes", "chinese")
HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------ measuring

def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def measure(cmd: list[str], env=None) -> tuple[float, int, str]:
    """(wall seconds, peak tree RSS bytes, stdout) of one command."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    peak = [0]

    def sample():
        while p.poll() is None:
            peak[0] = max(peak[0], _tree_rss(p.pid))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, peak[0], out


# ------------------------------------------------------------------------------------------ variants

def run_ceiling(data: str, tokenizer: str) -> None:
    """(b) read the JSONL, encode_batch on every text (all threads), write nothing."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    n = 0
    for f in sorted(Path(data).glob("*.jsonl")):
        with open(f, "rb") as fh:
            texts = []
            for line in fh:
                texts.append(json.loads(line)["text"])
                if len(texts) == 2048:
                    n += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
                    texts = []
            if texts:
                n += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    print(json.dumps({"tokens": n}))


def run_foundry(data: str, tokenizer: str, out: str) -> None:
    """(c) llm-foundry's convert_dataset_json recipe: datasets streaming, the tokenizer per document,
    concatenation into 2048-token samples with EOS, MDSWriter with zstd."""
    import datasets
    import numpy as np
    from streaming import MDSWriter
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer, eos_token="<|endoftext|>")
    ds = datasets.load_dataset("json", data_files=sorted(str(p) for p in Path(data).glob("*.jsonl")),
                               split="train", streaming=True)
    buf: list[int] = []
    n = 0
    with MDSWriter(out=out, columns={"tokens": "ndarray:int32"}, compression="zstd") as w:
        for sample in ds:
            ids = tok(sample["text"], truncation=False, padding=False)["input_ids"]
            n += len(ids)
            buf += ids + [tok.eos_token_id]
            while len(buf) >= 2048:
                w.write({"tokens": np.asarray(buf[:2048], np.int32)})
                buf = buf[2048:]
    print(json.dumps({"tokens": n}))


def run_datatrove(data: str, tokenizer: str, out: str, workers: int) -> None:
    """(d) datatrove's JsonlReader + DocumentTokenizer on a LocalPipelineExecutor."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    files = len(list(Path(data).glob("*.jsonl")))
    LocalPipelineExecutor(pipeline=[
        JsonlReader(data, glob_pattern="*.jsonl", text_key="text"),
        DocumentTokenizer(output_folder=out, tokenizer_name_or_path=tokenizer, eos_token="<|endoftext|>",
                          shuffle_documents=False),
    ], tasks=files, workers=workers, logging_dir=out + "-logs").run()
    print(json.dumps({"done": True}))


# ------------------------------------------------------------------------------------------ the run

def prepare(corpus: Path, work: Path, target_mb: float, name: str) -> tuple[Path, int]:
    """Repeat the shared sources into plain JSONL (fresh ids per copy) until >= target_mb of text."""
    import zstandard

    data = work / name
    marker = data / ".done"
    if marker.exists():
        return data, int(marker.read_text())
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    raws = {s: zstandard.ZstdDecompressor().stream_reader(open(corpus / f"{s}.jsonl.zst", "rb")).read().splitlines()
            for s in SOURCES}
    per_copy = sum(len(json.loads(x)["text"].encode()) for s in SOURCES for x in raws[s])
    copies = max(1, -(-int(target_mb * 1e6) // per_copy))
    for s in SOURCES:
        with open(data / f"{s}.jsonl", "w") as f:
            for c in range(copies):
                for x in raws[s]:
                    r = json.loads(x)
                    r["id"] = f"{r['id']}-{c}"
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    marker.write_text(str(per_copy * copies))
    return data, per_copy * copies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(HERE.parent.parent / "shared" / "corpus"))
    ap.add_argument("--work", default="/tmp/sptok-bench")
    ap.add_argument("--target-mb", type=float, default=60)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run == "ceiling":
        return run_ceiling(a.data, a.tokenizer)
    if a.run == "foundry":
        return run_foundry(a.data, a.tokenizer, a.out)
    if a.run == "datatrove":
        return run_datatrove(a.data, a.tokenizer, a.out, a.workers)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data, nbytes = prepare(Path(a.corpus), work, a.target_mb, f"data-{a.target_mb:g}mb")
    quarter, _ = prepare(Path(a.corpus), work, a.target_mb / 4, f"data-{a.target_mb / 4:g}mb")
    for d in (data, quarter):
        (d / "m.yaml").write_text("sources:\n" + "".join(
            f"  - {{name: {s}, paths: {s}.jsonl, id_field: id}}\n" for s in SOURCES))
    tok_dir = work / "tok32k"
    if not (tok_dir / "tokenizer.json").exists():
        subprocess.run([sys.executable, "-m", "sptok", "tokenizer", "train", str(data / "m.yaml"), "--out",
                        str(tok_dir), "--vocab-size", "32000", "--model", "bpe", "--max-bytes", "40MB"], check=True)
    tok = str(tok_dir / "tokenizer.json")
    me = [sys.executable, str(Path(__file__).resolve())]
    sptok = [sys.executable, "-m", "sptok", "build"]

    def out(name):
        p = work / "out" / name
        shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(str(p) + "-logs", ignore_errors=True)
        return str(p)

    print(f"data: {nbytes / 1e6:.1f} MB of text in {len(SOURCES)} JSONL files; tokenizer: byte-level BPE 32k; "
          f"{a.workers} CPU cores", flush=True)
    rows = {}
    wall, rss, o = measure(me + ["--run", "ceiling", "--data", str(data), "--tokenizer", tok])
    tokens = json.loads(o)["tokens"]
    rows["b"] = ("raw ceiling: JSONL + HF encode_batch (all threads)", wall, rss)
    build = sptok + [str(data / "m.yaml"), "--tokenizer", tok, "--quiet", "--seq-len", "2048"]
    rows["a"] = ("sptok build, all cores",) + measure(build + ["--out", out("a"), "--workers", str(a.workers)])[:2]
    rows["a1"] = ("sptok build, 1 worker",) + measure(build + ["--out", out("a1"), "--workers", "1"])[:2]
    rows["c"] = ("llm-foundry style: datasets + per-doc tokenizer + MDSWriter",) + measure(
        me + ["--run", "foundry", "--data", str(data), "--tokenizer", tok, "--out", out("c")])[:2]
    try:
        import datatrove  # noqa: F401

        rows["d"] = ("datatrove DocumentTokenizer",) + measure(
            me + ["--run", "datatrove", "--data", str(data), "--tokenizer", tok, "--out", out("d"),
                  "--workers", str(a.workers)])[:2]
    except ImportError:
        rows["d"] = None
    q = measure(sptok + [str(quarter / "m.yaml"), "--tokenizer", tok, "--quiet", "--out", out("q"),
                         "--workers", str(a.workers)])
    info = json.loads((work / "out" / "a" / "stats.json").read_text())["totals"]
    assert info["text_tokens"] == tokens, (info["text_tokens"], tokens)   # same tokenization, same count

    print(f"\n{'variant':<62} {'seconds':>8} {'tokens/s':>12} {'peak RSS':>10}")
    for key in ("a", "a1", "b", "c", "d"):
        if rows.get(key) is None:
            print(f"({key}) datatrove not installed: skipped")
            continue
        name, wall, rss = rows[key]
        print(f"({key:<2}) {name:<57} {wall:8.2f} {tokens / wall:12,.0f} {rss / 2**20:8.0f} MB")
    r = lambda x, y: rows[y][1] / rows[x][1]  # noqa: E731 - speed ratio x over y
    print(f"\ntext tokens: {tokens:,}")
    print(f"a/b = {r('a', 'b'):.2f}   (target >= 1.5)")
    print(f"a/c = {r('a', 'c'):.2f}   (target >= 4)")
    if rows.get("d"):
        print(f"a/d = {r('a', 'd'):.2f}   (target >= 2)")
    print(f"{a.workers} workers / 1 worker = {r('a', 'a1'):.2f}   (target >= 1.8 on 2 cores)")
    print(f"peak RSS, 4x input / 1x input = {rows['a'][2] / q[1]:.2f}   (target: within 15%, <= 1.15)")


if __name__ == "__main__":
    main()

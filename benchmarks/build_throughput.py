"""sptok build with each encoder, against the tokenizer alone, an llm-foundry-style build and datatrove, side by side.

    python benchmarks/build_throughput.py [--corpus ../shared/corpus] [--target-mb 80] [--repeat 3]
                                          [--baseline DIR]

Runs every variant as a child process on the same data (the shared sources repeated to >= target MB of
text) with the same byte-level BPE tokenizer (32k vocab, trained by sptok), measures wall time and the
peak RSS of each process tree and of its largest process (sampled from /proc), and prints tokens/s and ratios:
  (a) sptok build, all cores, --encoder auto      (a-NAME) the same with --encoder NAME, for every encoder
  (a-meta) the same as (a) with --metadata url:host (each document's host before its text)
  (a0) the build of an older checkout (--baseline DIR: today's tiktoken path), when given
  (b) raw ceiling: JSONL + HF encode_batch (all threads), nothing written
  (c) llm-foundry style: datasets streaming, tokenizer per document, 2048-token concat, MDSWriter zstd
  (d) datatrove DocumentTokenizer (skipped when datatrove is not installed)
plus sptok 2 workers vs 1 worker, peak RSS at 4x vs 1x the input (memory must stay flat), and, on one core,
each encoder alone on one copy of the shared sources: tokens/s and documents whose ids differ from Hugging
Face's, per source; then WordPiece and Unigram against kitoken, where it is installed (not an sptok encoder).
With --repeat N the build rows run N times, interleaved, and the fastest counts. --only-metadata runs (a) and
(a-meta) alone.
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

def tree_rss(pid: int) -> tuple[int, int]:
    """(resident bytes of a process and all its descendants, of the largest one of them) from Linux /proc."""
    total, largest, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            total, largest = total + rss, max(largest, rss)
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total, largest


def measure(cmd: list[str], env=None, cwd=None) -> tuple[float, int, int, str]:
    """(wall seconds, peak tree RSS bytes, peak RSS bytes of its largest process, stdout) of one command."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})}, cwd=cwd)
    peak = [0, 0]

    def sample():
        while p.poll() is None:
            peak[:] = map(max, peak, tree_rss(p.pid))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, peak[0], peak[1], out


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


def run_encode(data: str, tokenizer: str, encoder: str, out: str) -> None:
    """One encoder alone, pinned to one core, on every document of every source: encode time, tokens, and
    an xxh64 of each document's ids (written to ``out``) for comparison with the Hugging Face tokenizer's."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import numpy as np
    import xxhash
    from tokenizers import Tokenizer

    from sptok.build.encoders import HFEncoder, fast_encoder

    tok = Tokenizer.from_file(tokenizer)
    encode = HFEncoder(tok).encode if encoder == "hf" else fast_encoder(tok, encoder)
    seconds, tokens, digests = 0.0, 0, {}
    for s in SOURCES:
        with open(Path(data) / f"{s}.jsonl", "rb") as f:
            texts = [json.loads(line)["text"] for line in f]
        batches = [texts[i:i + 256] for i in range(0, len(texts), 256)]
        digests[s] = []
        for batch in batches:
            t0 = time.perf_counter()
            flat, lens = encode(batch)
            seconds += time.perf_counter() - t0
            tokens += len(flat)
            ends = np.cumsum(lens)
            digests[s] += [xxhash.xxh64_intdigest(flat[e - n:e].tobytes()) for e, n in zip(ends, lens)]
    np.savez(out, **{s: np.array(d, np.uint64) for s, d in digests.items()})
    print(json.dumps({"tokens": tokens, "seconds": seconds}))


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


ENCODERS = ("gigatoken", "riptoken", "tiktoken", "hf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(HERE.parent.parent / "shared" / "corpus"))
    ap.add_argument("--work", default="/tmp/sptok-bench")
    ap.add_argument("--target-mb", type=float, default=80)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=1, help="runs of each build row, interleaved; the fastest counts")
    ap.add_argument("--baseline", help="an older sptok checkout to time as row (a0), e.g. today's tiktoken path")
    ap.add_argument("--only-metadata", action="store_true", help="only rows (a) and (a-meta), side by side")
    for hidden in ("--run", "--data", "--tokenizer", "--out", "--encoder"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run:
        runs = {"ceiling": lambda: run_ceiling(a.data, a.tokenizer),
                "foundry": lambda: run_foundry(a.data, a.tokenizer, a.out),
                "datatrove": lambda: run_datatrove(a.data, a.tokenizer, a.out, a.workers),
                "encode": lambda: run_encode(a.data, a.tokenizer, a.encoder, a.out),
                "other-models": lambda: run_other_models(a.data)}
        return runs[a.run]()

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, nbytes = prepare(Path(a.corpus), work, a.target_mb, f"data-{a.target_mb:g}mb")
    quarter, qbytes = prepare(Path(a.corpus), work, a.target_mb / 4, f"data-{a.target_mb / 4:g}mb")
    for d in (data, quarter):
        (d / "m.yaml").write_text("sources:\n" + "".join(
            f"  - {{name: {s}, paths: {s}.jsonl, id_field: id}}\n" for s in SOURCES))
    tok_dir = work / "tok32k"
    if not (tok_dir / "tokenizer.json").exists():
        subprocess.run([sys.executable, "-m", "sptok", "tokenizer", "train", str(data / "m.yaml"), "--out",
                        str(tok_dir), "--vocab-size", "32000", "--model", "bpe", "--max-bytes", "40MB"], check=True)
    tok = str(tok_dir / "tokenizer.json")
    print(f"data: {nbytes / 1e6:.1f} MB of text in {len(SOURCES)} JSONL files ({nbytes / qbytes:.1f}x the "
          f"{qbytes / 1e6:.1f} MB of one copy); tokenizer: byte-level BPE 32k; {a.workers} CPU cores; sptok at "
          f"{_commit(HERE.parent)}", flush=True)
    if a.only_metadata:
        rows, tokens = metadata_rows(a, work, data, tok)
        print_table(rows, tokens, a.workers)
        return
    rows, tokens = build_rows(a, work, data, quarter, tok)
    print_table(rows, tokens, a.workers)
    print_encoders(encoder_rows(work, quarter, tok))
    print_other_models(work, quarter)


def _sptok_build(data: Path, tok: str) -> list[str]:
    return [sys.executable, "-m", "sptok", "build", str(data / "m.yaml"), "--tokenizer", tok, "--quiet",
            "--seq-len", "2048"]


def metadata_rows(a, work: Path, data: Path, tok: str) -> tuple[dict, int]:
    """(a) and (a-meta) alone, interleaved a.repeat times, the fastest of each kept."""
    cores = ["--workers", str(a.workers)]
    variants = {"a": ("sptok build, all cores, --encoder auto", _sptok_build(data, tok) + cores),
                "a-meta": ("the same, --metadata url:host", _sptok_build(data, tok) + cores + META_FLAGS)}
    rows = {}
    for _ in range(a.repeat):
        for key, (label, cmd) in variants.items():
            m = measure(cmd + ["--out", _fresh(work, key)])
            if key not in rows or m[0] < rows[key][1]:
                rows[key] = (label,) + m[:3]
    tokens = json.loads((work / "out" / "a" / "stats.json").read_text())["totals"]["text_tokens"]
    return rows, tokens


META_FLAGS = ["--metadata", "url:host"]


def build_rows(a, work: Path, data: Path, quarter: Path, tok: str) -> tuple[dict, int]:
    """Every build-level variant, measured (the sptok builds a.repeat times, interleaved, fastest kept)."""
    me = [sys.executable, str(Path(__file__).resolve())]
    sptok = _sptok_build(data, tok)
    cores = str(a.workers)
    variants = {"a": ("sptok build, all cores, --encoder auto", sptok + ["--workers", cores], None, None),
                "a-meta": ("sptok build, all cores, --metadata url:host", sptok + ["--workers", cores] + META_FLAGS,
                           None, None)}
    for name in ENCODERS:
        variants[f"a-{name[:4]}"] = (f"sptok build, all cores, --encoder {name}",
                                     sptok + ["--workers", cores, "--encoder", name], None, None)
    if a.baseline:   # `python -m` puts the working directory first on sys.path: run it from the checkout
        base = str(Path(a.baseline).resolve())
        variants["a0"] = (f"sptok build at {_commit(Path(a.baseline))}, all cores (--baseline)",
                          sptok + ["--workers", cores], {"PYTHONPATH": base}, base)
    variants["a1"] = ("sptok build, 1 worker, --encoder auto", sptok + ["--workers", "1"], None, None)
    variants["q"] = ("sptok build, all cores, 1/4 of the input", sptok[:4] + [str(quarter / "m.yaml")] + sptok[5:] +
                     ["--workers", cores], None, None)
    variants["b"] = ("raw ceiling: JSONL + HF encode_batch (all threads)",
                     me + ["--run", "ceiling", "--data", str(data), "--tokenizer", tok], None, None)
    rows = {}
    for _ in range(a.repeat):
        for key, (label, cmd, env, cwd) in variants.items():
            m = measure(cmd + ([] if key == "b" else ["--out", _fresh(work, key)]), env, cwd)
            if key not in rows or m[0] < rows[key][1]:
                rows[key] = (label,) + m[:3]
            if key == "b":
                tokens = json.loads(m[3])["tokens"]
    rows["c"] = ("llm-foundry style: datasets + per-doc tokenizer + MDSWriter",) + measure(
        me + ["--run", "foundry", "--data", str(data), "--tokenizer", tok, "--out", _fresh(work, "c")])[:3]
    try:
        import datatrove  # noqa: F401

        rows["d"] = ("datatrove DocumentTokenizer",) + measure(
            me + ["--run", "datatrove", "--data", str(data), "--tokenizer", tok, "--out", _fresh(work, "d"),
                  "--workers", cores])[:3]
    except ImportError:
        rows["d"] = None
    for key in variants:   # the same tokenization, the same count, whichever encoder ran
        if key not in ("b", "q"):
            info = json.loads((work / "out" / key / "stats.json").read_text())["totals"]
            assert info["text_tokens"] == tokens, (key, info["text_tokens"], tokens)
    rows["q"] += (json.loads((work / "out" / "q" / "stats.json").read_text())["totals"]["text_tokens"],)
    return rows, tokens


def print_table(rows: dict, tokens: int, workers: int) -> None:
    """The rows and their ratios (text tokens per second: a build with metadata writes more tokens, and is
    measured by the same text)."""
    print(f"\n{'variant':<62} {'seconds':>8} {'tokens/s':>12} {'peak RSS':>9} {'largest':>8}")
    for key, row in rows.items():
        if row is None:
            print(f"({key}) datatrove not installed: skipped")
            continue
        name, wall, rss, big = row[:4]
        n = row[4] if key == "q" else tokens
        print(f"({key:<6}) {name:<53} {wall:8.2f} {n / wall:12,.0f} {rss / 2**20:6.0f} MB {big / 2**20:5.0f} MB")
    r = lambda x, y: rows[y][1] / rows[x][1]  # noqa: E731 - speed ratio x over y
    print(f"\ntext tokens: {tokens:,}")
    print(f"a-meta/a = {r('a-meta', 'a'):.2f}   (--metadata url:host vs the same build without; target >= 0.9)")
    if "b" not in rows:
        return
    print(f"a/b = {r('a', 'b'):.2f}   (target >= 6)")
    print(f"a/a-tikt = {r('a', 'a-tikt'):.2f}   (the tiktoken path; target >= 1.8)")
    if "a0" in rows:
        print(f"a/a0 = {r('a', 'a0'):.2f}   (the --baseline checkout; target >= 1.8)")
    print(f"a/c = {r('a', 'c'):.2f}   (target >= 4)")
    if rows.get("d"):
        print(f"a/d = {r('a', 'd'):.2f}   (target >= 2)")
    print(f"{workers} workers / 1 worker = {r('a', 'a1'):.2f}   (target >= 1.8 on 2 cores)")
    print(f"peak RSS, 4x input / 1x input = {rows['a'][2] / rows['q'][2]:.2f} (whole build), "
          f"{rows['a'][3] / rows['q'][3]:.2f} (largest process)   (target: within 15%, <= 1.15)")


def encoder_rows(work: Path, data: Path, tok: str) -> dict:
    """Each encoder alone on one core: (M tokens/s, {source: documents whose ids differ from HF's})."""
    import numpy as np

    me = [sys.executable, str(Path(__file__).resolve()), "--run", "encode", "--data", str(data), "--tokenizer", tok]
    rows = {}
    for name in ENCODERS[::-1]:   # hf first: the reference
        digests = work / f"ids-{name}.npz"
        o = json.loads(measure(me + ["--encoder", name, "--out", str(digests)])[3])
        with np.load(digests) as got, np.load(work / "ids-hf.npz") as want:
            differ = {s: (int((got[s] != want[s]).sum()), len(want[s])) for s in SOURCES}
        rows[name] = (o["tokens"] / o["seconds"] / 1e6, differ)
    return rows


def print_encoders(rows: dict) -> None:
    print(f"\none core, one copy of the shared sources: {'encoder':<10} {'M tokens/s':>10} {'vs HF':>6}   "
          f"documents whose ids differ from Hugging Face's")
    for name, (speed, differ) in rows.items():
        diff = ", ".join(f"{s} {d}/{n}" for s, (d, n) in differ.items())
        print(f"{'':<41} {name:<10} {speed:10.2f} {speed / rows['hf'][0]:6.1f}   {diff}")


def run_other_models(data: str) -> None:
    """WordPiece and Unigram (trained by sptok on the demo corpus, 8k) on one core: Hugging Face vs kitoken,
    the one library found that loads them from tokenizer.json; tokens/s and documents whose ids differ."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import kitoken
    import zstandard

    from sptok.build.tokenizer import as_text_encoder, train

    demo = HERE.parent / "pipelines" / "demo"
    train_texts = [json.loads(x)["text"] for s in SOURCES for x in zstandard.ZstdDecompressor().stream_reader(
        open(demo / f"{s}.jsonl.zst", "rb")).read().splitlines()]
    texts = [json.loads(line)["text"] for s in SOURCES for line in open(Path(data) / f"{s}.jsonl", "rb")][::2]
    out = {}
    for model in ("wordpiece", "unigram"):
        tok = train(train_texts, model, 8000, [])
        kt = kitoken.Kitoken.from_tokenizers(tok.to_str().encode())   # encode_specials=False: specials are text
        t0 = time.perf_counter()
        want = [e.ids for e in as_text_encoder(tok).encode_batch(texts, add_special_tokens=False)]
        t1 = time.perf_counter()
        got = kt.encode_all(texts)
        t2 = time.perf_counter()
        n = sum(map(len, want))
        out[model] = {"hf": n / (t1 - t0) / 1e6, "kitoken": n / (t2 - t1) / 1e6, "docs": len(texts),
                      "differ": sum(a != b for a, b in zip(got, want))}
    print(json.dumps(out))


def print_other_models(work: Path, data: Path) -> None:
    try:
        import kitoken  # noqa: F401
    except ImportError:
        print("\nWordPiece / Unigram: kitoken not installed, skipped")
        return
    me = [sys.executable, str(Path(__file__).resolve()), "--run", "other-models", "--data", str(data)]
    rows = json.loads(measure(me)[3])
    print(f"\none core, half the documents of one copy: {'model':<10} {'HF M tok/s':>10} {'kitoken':>8} {'vs HF':>6}"
          f"   documents whose ids differ")
    for model, r in rows.items():
        print(f"{'':<42}{model:<10} {r['hf']:10.2f} {r['kitoken']:8.2f} {r['kitoken'] / r['hf']:6.1f}   "
              f"{r['differ']}/{r['docs']}")


def _fresh(work: Path, key: str) -> str:
    p = work / "out" / key
    shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(str(p) + "-logs", ignore_errors=True)
    return str(p)


def _commit(repo: Path) -> str:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "?") + (" (uncommitted changes)" if dirty else "")


if __name__ == "__main__":
    main()

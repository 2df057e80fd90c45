"""Memory over a long single unit: RSS over time of `sptok build` with each encoder, and of gigatoken alone.

    python benchmarks/encoder_memory.py [--corpus ../shared/corpus] [--mb 400] [--encoders gigatoken,tiktoken]

Writes one zstd JSONL file (one work unit, however large) of about --mb MB of text: copies of the shared sources
in which copy k shifts every ASCII letter by k places, so that new words keep appearing (the worst case for an
encoder that caches every pretoken it has seen, as gigatoken 0.10.0 does). Builds it with one worker per
encoder, and encodes it with gigatoken alone (no fresh instances), sampling the RSS of each twice a second.
Prints the RSS at each tenth of the input read, then the peak; then the worst case, random words (almost every
word unseen), through gigatoken alone and through sptok's gigatoken encoder. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("pydocs", "code", "fortunes", "chinese")


def make_long_unit(corpus: Path, path: Path, mb: float) -> int:
    """One .jsonl.zst of >= mb MB of text; returns its text bytes."""
    import zstandard

    marker = path.with_suffix(".bytes")
    if marker.exists():
        return int(marker.read_text())
    raws = [line for s in SOURCES for line in
            zstandard.ZstdDecompressor().stream_reader(open(corpus / f"{s}.jsonl.zst", "rb")).read().splitlines()]
    texts = [json.loads(x) for x in raws]
    total, k = 0, 0
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as z:
        while total < mb * 1e6:
            shift = {c: (c - base + k) % 26 + base for base in (97, 65) for c in range(base, base + 26)}
            for r in texts:
                text = r["text"].translate(shift)
                z.write(json.dumps({"id": f"{r['id']}-{k}", "text": text}, ensure_ascii=False).encode() + b"\n")
                total += len(text.encode())
            k += 1
    marker.write_text(str(total))
    return total


def run_alone(data: str, tokenizer: str) -> None:
    """gigatoken alone on the long unit, one instance for the whole file, in 1 MB batches."""
    import zstandard
    from tokenizers import Tokenizer

    import gigatoken

    spec = json.loads(Tokenizer.from_file(tokenizer).to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if not a["special"]]
    enc = gigatoken.Tokenizer.from_json(json.dumps(spec))
    batch, size = [], 0
    with zstandard.ZstdDecompressor().stream_reader(open(data, "rb")) as f:
        for line in io.TextIOWrapper(f, encoding="utf-8"):
            batch.append(json.loads(line)["text"])
            size += len(batch[-1])
            if size >= 1 << 20:
                enc.encode_batch(batch, parallel=False)
                batch, size = [], 0
    enc.encode_batch(batch, parallel=False)


def run_words(tokenizer: str, mb: float, wrapper: str) -> None:
    """The worst case for a pretoken cache: mb MB of random lowercase words (almost all unseen), through
    gigatoken alone (one instance) or sptok's gigatoken encoder; prints RSS (MB) at each tenth, and seconds."""
    import numpy as np
    from tokenizers import Tokenizer

    from sptok.build.encoders import _rss, fast_encoder

    tok = Tokenizer.from_file(tokenizer)
    if wrapper == "sptok":
        encode = fast_encoder(tok, "gigatoken")
    else:
        import gigatoken

        spec = json.loads(tok.to_str())
        spec["added_tokens"] = [a for a in spec["added_tokens"] if not a["special"]]
        g = gigatoken.Tokenizer.from_json(json.dumps(spec))
        encode = lambda texts: g.encode_batch(texts, parallel=False)  # noqa: E731
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    rss, t0, steps = [], time.time(), int(mb)
    for step in range(steps):   # 1 MB of text per step
        lens = rng.integers(3, 13, 130_000)
        chars = letters[rng.integers(0, 26, int(lens.sum()))].tobytes().decode()
        ends = np.cumsum(lens)
        words = [chars[i:j] for i, j in zip(np.r_[0, ends[:-1]], ends)]
        encode([" ".join(words[i:i + 200]) for i in range(0, len(words), 200)])
        if (step + 1) % max(1, steps // 10) == 0:
            rss.append(_rss())
    print(json.dumps({"rss": rss[:10], "seconds": time.time() - t0}))


def watch(cmd: list[str], data: Path) -> list[tuple[float, float, int]]:
    """Run ``cmd``; twice a second, (seconds, fraction of ``data`` read, RSS bytes of the process tree)."""
    bt = _bench_module()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    series, t0, size = [], time.time(), data.stat().st_size

    def sample():
        done = 0.0
        while p.poll() is None:
            done, rss = max(done, _position(p.pid, data) / size), bt.tree_rss(p.pid)[0]
            if rss:   # 0: the process has just ended
                series.append((time.time() - t0, done, rss))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = p.communicate()
    th.join()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return series


def _position(pid: int, path: Path) -> int:
    """The file offset of process ``pid`` in ``path`` (0 while it has not opened it)."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path.resolve()):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    return int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_throughput", HERE / "build_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def report(label: str, series: list) -> None:
    """RSS when each tenth of the input has been read (the first sample past it), and the peak."""
    cells = []
    for tenth in range(1, 11):
        hit = next((s for s in series if s[1] >= tenth / 10 - 1e-9), series[-1])
        cells.append(f"{hit[2] / 2**20:5.0f}")
    print(f"{label:<34} {' '.join(cells)}   peak {max(s[2] for s in series) / 2**20:5.0f} MB   "
          f"{series[-1][0]:5.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(HERE.parent.parent / "shared" / "corpus"))
    ap.add_argument("--work", default="/tmp/sptok-bench")
    ap.add_argument("--mb", type=float, default=400)
    ap.add_argument("--encoders", default="gigatoken,tiktoken")
    ap.add_argument("--words-mb", type=float, default=150, help="MB of random words for the worst case")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--wrapper", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run == "alone":
        return run_alone(a.data, a.tokenizer)
    if a.run == "words":
        return run_words(a.tokenizer, a.words_mb, a.wrapper)
    work = Path(a.work).resolve() / "long"
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"long-{a.mb:g}mb.jsonl.zst"
    nbytes = make_long_unit(Path(a.corpus), data, a.mb)
    tok = work / "tok32k" / "tokenizer.json"
    if not tok.exists():
        (work / "m-train.yaml").write_text(f"sources:\n  - {{name: long, paths: {data.name}}}\n")
        subprocess.run([sys.executable, "-m", "sptok", "tokenizer", "train", str(work / "m-train.yaml"), "--out",
                        str(tok.parent), "--vocab-size", "32000", "--model", "bpe", "--max-bytes", "40MB"],
                       check=True, capture_output=True)
    (work / "m.yaml").write_text(f"sources:\n  - {{name: long, paths: {data.name}, id_field: id}}\n")
    print(f"one unit: {data.name}, {nbytes / 1e6:.0f} MB of text ({data.stat().st_size / 1e6:.0f} MB compressed); "
          f"tokenizer: byte-level BPE 32k; RSS in MB when each tenth of the input has been read")
    print(f"{'':<34} {' '.join(f'{t * 10:>4}%' for t in range(1, 11))}")
    for name in a.encoders.split(","):
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        series = watch([sys.executable, "-m", "sptok", "build", str(work / "m.yaml"), "--tokenizer", str(tok),
                        "--out", str(out), "--workers", "1", "--quiet", "--encoder", name], data)
        report(f"sptok build, --encoder {name}", series)
    series = watch([sys.executable, str(Path(__file__).resolve()), "--run", "alone", "--data", str(data),
                    "--tokenizer", str(tok)], data)
    report("gigatoken alone, one instance", series)
    print(f"\nthe worst case, {a.words_mb:g} MB of random words; RSS in MB at each tenth")
    for wrapper, label in (("raw", "gigatoken alone, one instance"), ("sptok", "sptok's gigatoken encoder")):
        r = json.loads(subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run", "words", "--wrapper",
                                       wrapper, "--words-mb", str(a.words_mb), "--tokenizer", str(tok)],
                                      capture_output=True, text=True, check=True).stdout)
        print(f"{label:<34} {' '.join(f'{x / 2**20:5.0f}' for x in r['rss'])}   {r['seconds']:5.0f} s")


if __name__ == "__main__":
    main()

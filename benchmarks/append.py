"""`sptok build --append` of one source against building that source alone and rebuilding everything, side by side.

    python benchmarks/append.py [--corpus ../shared/corpus] [--new chinese] [--workers 2] [--repeat 3]

The build holds every shared source but ``--new``; the append adds it (to a fresh copy of the build each time).
Every row is a child process (`python -m sptok build ...`, start-up included) with the same options and the demo
tokenizer; with --repeat N the rows run N times, interleaved, and the fastest counts. sptok's modules are
byte-compiled first, as an install leaves them (a checkout run with PYTHONDONTWRITEBYTECODE=1 would compile them in
every run, ~0.07 s). Prints wall seconds and the two ratios the issue asks for: append / the source alone (<= 1.2)
and everything / append (>= 5).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pydocs", "code", "fortunes", "chinese")


def manifest(path: Path, corpus: Path, names) -> Path:
    path.write_text("sources:\n" + "".join(f"  - {{name: {n}, paths: {corpus / n}.jsonl.zst, id_field: id}}\n"
                                           for n in names))
    return path


def timed(args: list, out: Path, workers: int) -> float:
    """Wall seconds of one `sptok build` child process."""
    cmd = [sys.executable, "-m", "sptok", "build", *map(str, args), "--out", str(out), "--quiet", "--workers",
           str(workers), "--tokenizer", str(ROOT / "pipelines" / "demo" / "tokenizer"), "--seq-len", "2048"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    ap.add_argument("--new", default="chinese", choices=SOURCES)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    old = [n for n in SOURCES if n != a.new]
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "sptok")], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        m_old, m_all = manifest(t / "old.yaml", a.corpus, old), manifest(t / "all.yaml", a.corpus, old + [a.new])
        m_new = manifest(t / "new.yaml", a.corpus, [a.new])
        timed([m_old], t / "base", a.workers)
        best = {"append": [], "alone": [], "everything": []}
        for i in range(a.repeat):
            shutil.copytree(t / "base", t / f"appended{i}")
            best["append"].append(timed([m_all, "--append"], t / f"appended{i}", a.workers))
            best["alone"].append(timed([m_new], t / f"alone{i}", a.workers))
            best["everything"].append(timed([m_all], t / f"all{i}", a.workers))
        mb = {n: sum(f.stat().st_size for f in [a.corpus / f"{n}.jsonl.zst"]) / 1e6 for n in SOURCES}
        s = {k: min(v) for k, v in best.items()}
        print(f"build of {', '.join(old)} ({sum(mb[n] for n in old):.1f} MB compressed), + {a.new} "
              f"({mb[a.new]:.1f} MB), {a.workers} workers, best of {a.repeat}")
        print("| row | seconds |\n|---|---|")
        print(f"| append {a.new} (`--append`) | {s['append']:.2f} |")
        print(f"| build {a.new} alone | {s['alone']:.2f} |")
        print(f"| build everything in one go | {s['everything']:.2f} |")
        print(f"\nappend / alone = {s['append'] / s['alone']:.2f}x (<= 1.2 wanted); "
              f"everything / append = {s['everything'] / s['append']:.1f}x (>= 5 wanted)")


if __name__ == "__main__":
    main()

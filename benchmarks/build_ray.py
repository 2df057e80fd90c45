"""sptok build --executor ray (a local Ray started by the build, start-up and shut-down included) against
--workers 2, on the corpus of build_throughput.py (the shared sources repeated to >= 80 MB of text).

    python benchmarks/build_ray.py [--corpus ../shared/corpus] [--target-mb 80] [--repeat 3]

Both run as child processes with 2 CPUs (the Ray build's local cluster gets --workers 2 CPUs) and the 32k
byte-level BPE tokenizer of build_throughput.py; the rows run --repeat times, interleaved, the fastest counts.
A third row times the build alone on a Ray cluster already running (`ray start --head --num-cpus 2`, not timed):
what a build costs where the cluster exists. Ray builds run in a network + PID namespace of their own (as root:
`unshare`), so Ray talks over loopback only and every Ray process ends with it. Prints wall time, peak RSS of the
process tree (not of an existing cluster), and the ratios (target <= 1.5 with start-up). The outputs are checked
to be the same bytes. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

from build_throughput import HERE, SOURCES, _commit, _fresh, measure, prepare


def same_tree(a: Path, b: Path) -> bool:
    """Whether two builds hold the same files with the same bytes (sptok.json's encoder record included: both
    ran the same encoder)."""
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())  # noqa: E731
    names = files(a)
    return names == files(b) and filecmp.cmpfiles(a, b, names, shallow=False)[0] == names


def on_a_running_cluster(cmd: list[str]) -> None:
    """In the namespace: start a Ray head (untimed), then time ``cmd`` on it; prints its seconds as JSON."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6379", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True)
    wall, _, _, _ = measure(cmd, {"RAY_ADDRESS": "127.0.0.1:6379"})
    print(json.dumps({"seconds": wall}))


def main() -> None:
    if sys.argv[1:2] == ["--on-a-running-cluster"]:
        return on_a_running_cluster(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(HERE.parent.parent / "shared" / "corpus"))
    ap.add_argument("--work", default="/tmp/sptok-bench")
    ap.add_argument("--target-mb", type=float, default=80)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, nbytes = prepare(Path(a.corpus), work, a.target_mb, f"data-{a.target_mb:g}mb")
    (data / "m.yaml").write_text("sources:\n" + "".join(
        f"  - {{name: {s}, paths: {s}.jsonl, id_field: id}}\n" for s in SOURCES))
    tok = work / "tok32k" / "tokenizer.json"
    if not tok.exists():
        subprocess.run([sys.executable, "-m", "sptok", "tokenizer", "train", str(data / "m.yaml"), "--out",
                        str(tok.parent), "--vocab-size", "32000", "--model", "bpe", "--max-bytes", "40MB"], check=True)
    sptok = [sys.executable, "-m", "sptok", "build", str(data / "m.yaml"), "--tokenizer", str(tok), "--quiet",
             "--seq-len", "2048", "--workers", "2"]
    ray_env = {"RAY_TMPDIR": str(work / "ray"), "RAY_AUTH_MODE": "disabled"}
    in_namespace = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c",
                    'ip link set lo up && exec "$@"', "sh"]
    rows = {"local": ("sptok build --workers 2", sptok, None),
            "ray": ("sptok build --executor ray (Ray started by the build)",
                    in_namespace + sptok + ["--executor", "ray"], ray_env),
            "cluster": ("sptok build --executor ray (on a running Ray, 2 CPUs)",
                        in_namespace + [sys.executable, __file__, "--on-a-running-cluster"] + sptok +
                        ["--executor", "ray"], ray_env)}
    print(f"data: {nbytes / 1e6:.1f} MB of text in {len(SOURCES)} JSONL files; tokenizer: byte-level BPE 32k; "
          f"{len(os.sched_getaffinity(0))} CPU cores; load {os.getloadavg()[0]:.2f}; sptok at {_commit(HERE.parent)}",
          flush=True)
    best: dict = {}
    for _ in range(a.repeat):
        for key, (_, cmd, env) in rows.items():
            wall, rss, _, out = measure(cmd + ["--out", _fresh(work, f"ray-bench-{key}")], env)
            if key == "cluster":
                wall, rss = json.loads(out)["seconds"], 0
            if key not in best or wall < best[key][0]:
                best[key] = (wall, rss)
    print(f"\n{'variant':<56} {'seconds':>8} {'peak RSS':>9}")
    for key, (label, _, _) in rows.items():
        rss = f"{best[key][1] / 2**20:6.0f} MB" if best[key][1] else "       -"
        print(f"{label:<56} {best[key][0]:8.2f} {rss}")
    same = all(same_tree(work / "out" / "ray-bench-local", work / "out" / f"ray-bench-{k}") for k in ("ray", "cluster"))
    print(f"\nray / local = {best['ray'][0] / best['local'][0]:.2f}   (start-up included; target <= 1.5)")
    print(f"cluster / local = {best['cluster'][0] / best['local'][0]:.2f}   (on a running cluster)")
    print(f"fastest of {a.repeat}; the same bytes: {same}")


if __name__ == "__main__":
    main()

"""Metadata conditioning in miniature (MeCo, arXiv 2501.01956): does a document's own metadata as a prefix help?

    python pipelines/metadata.py [--corpus ../shared/corpus] [--work out/metadata] [--steps 100] [--fresh]

1. Build the four shared sources five times, each with the same validation split (`--holdout-docs`, decided
   by each document's keyed draw, so every build holds out the same documents):
   `plain` (no SP, no metadata), `sp` (the source's SP before every document), and `host`, `url`, `topic`
   (no SP; the document's own metadata before its text: `--metadata url:host`, `url:url`, `topic`).
2. Train one tiny Llama per arm from scratch on CPU, every arm the same steps x batch x seq_len tokens:
   (a) plain, (b) sp, (c) host, (d) url, (e) topic, and (c)-(e) again with a 10% metadata-free cooldown
   (`sp_schedule: [[0.9, "meta=strip"]]`).
3. Evaluate every arm at its end on the validation split, in every condition it has (`eval.conditions`):
   without context (`meta=strip` / `strip`), with its correct context (`keep`), with another document's
   (`meta=misplaced` / `misplaced`). The targets are the same tokens in every condition and every arm: text
   and EOS, never an SP, a delimiter or a metadata token.
Prints the table (mean over sources of the per-source validation loss) and writes results.json in --work.
MeCo's claim, at equal tokens: metadata + cooldown is at least as good as none, evaluated without metadata.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from _common import arguments, run_cli, start_work

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pydocs", "code", "fortunes", "chinese")

# build name -> its options besides the shared ones
BUILDS = {
    "plain": {"insert_prob": 0.0},
    "sp": {"insert_prob": 1.0},
    "host": {"insert_prob": 0.0, "metadata": "url:host"},
    "url": {"insert_prob": 0.0, "metadata": "url:url"},
    "topic": {"insert_prob": 0.0, "metadata": "topic"},
}
META = ["meta=strip", "keep", "meta=misplaced"]   # none, correct, misplaced: the table's columns
SP = ["strip", "keep", "misplaced"]
# arm -> (build, eval conditions: [without context, correct, misplaced], cooldown)
ARMS = {
    "(a) plain": ("plain", ["keep"], False),
    "(b) sp": ("sp", SP, False),
    "(c) url:host": ("host", META, False),
    "(d) url:url": ("url", META, False),
    "(e) topic": ("topic", META, False),
    "(c) + cooldown": ("host", META, True),
    "(d) + cooldown": ("url", META, True),
    "(e) + cooldown": ("topic", META, True),
}


def build(corpus: Path, work: Path, name: str, holdout_docs: int, seq_len: int) -> Path:
    from sptok.build import run_build

    out = work / "builds" / name
    manifest = work / "corpus.yaml"
    manifest.write_text("sources:\n" + "".join(f"  - {{name: {s}, paths: {corpus.resolve()}/{s}.jsonl.zst, "
                                               f"id_field: id}}\n" for s in SOURCES))
    flags = {"tokenizer": str(ROOT / "pipelines/demo/tokenizer"), "seq_len": seq_len, "position": "prefix",
             "holdout_docs": holdout_docs, "quiet": True, **BUILDS[name]}
    if not (out / "sptok.json").exists():
        run_build(str(manifest), str(out), flags, log=lambda m: None)
    return out


def train(build_dir: Path, conditions: list[str], cooldown: bool, args, d: Path) -> dict:
    from sptok.train.config import load_config
    from sptok.train.loop import pretrain

    shutil.rmtree(d, ignore_errors=True)
    sets = [f"data.build={build_dir}", f"train.steps={args.steps}", f"eval.every={args.steps}",
            f"log.dir={d / 'log'}", f"eval.conditions={json.dumps(conditions)}"]
    if cooldown:
        sets.append('data.sp_schedule=[[0.9, "meta=strip"]]')
    cfg = load_config(str(ROOT / "pipelines/metadata.yaml"), sets)
    t0 = time.time()
    recs = pretrain(cfg, log=lambda m: None)
    val = [r for r in recs if r.get("split") == "validation" and r.get("step") == args.steps]
    by_condition = {r["condition"]: r for r in val}
    seq_len = json.loads((build_dir / "sptok.json").read_text())["options"]["seq_len"]
    tokens = args.steps * cfg.train.global_batch_size * seq_len
    out = {"build": build_dir.name, "cooldown": cooldown, "tokens": tokens, "seconds": round(time.time() - t0, 1),
           "conditions": {}}
    for c in conditions:
        r = by_condition[c]
        by = dict(zip(r.get("sources") or SOURCES, r["val_loss_by_source"]))
        out["conditions"][c] = {"mean": sum(by.values()) / len(by), "by_source": by, "val_loss": r["val_loss"]}
    return out


def table(results: dict) -> str:
    head = f"{'arm':<16}{'tokens':>10}{'none':>10}{'correct':>10}{'misplaced':>11}   (validation loss, mean of sources)"
    lines = [head, "-" * len(head)]
    for arm, r in results["arms"].items():
        means = [c["mean"] for c in r["conditions"].values()]   # none, correct, misplaced (plain: none only)
        rest = ("-", "-") if len(means) == 1 else (f"{means[1]:.4f}", f"{means[2]:.4f}")
        lines.append(f"{arm:<16}{r['tokens']:>10,}{means[0]:>10.4f}{rest[0]:>10}{rest[1]:>11}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = arguments("metadata", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--holdout-docs", type=int, default=12)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run (default: all)")
    run_cli(ap, argv, run, fresh="delete --work first (new builds)")


def run(args) -> None:
    t0 = time.time()
    start_work(args)
    arms = [a.strip() for a in args.arms.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"error: --arms: unknown arm {unknown[0]!r}; the arms are {', '.join(ARMS)}")
    builds = {}
    for arm in arms:
        name = ARMS[arm][0]
        if name not in builds:
            t = time.time()
            builds[name] = build(args.corpus, args.work, name, args.holdout_docs, args.seq_len)
            print(f"build {name}: {time.time() - t:.0f} s", flush=True)
    results = {"steps": args.steps, "arms": {}}
    for arm in arms:
        name, conditions, cooldown = ARMS[arm]
        slug = arm.split(" ", 1)[0].strip("()") + ("-cool" if cooldown else "")
        r = train(builds[name], conditions, cooldown, args, args.work / "runs" / slug)
        results["arms"][arm] = r
        print(f"{arm:<16} " + "  ".join(f"{c} {v['mean']:.4f}" for c, v in r["conditions"].items())
              + f"  ({r['seconds']:.0f} s)", flush=True)
        (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + table(results))
    plain = results["arms"].get("(a) plain")
    if plain:
        base = plain["conditions"]["keep"]["mean"]
        for arm, r in results["arms"].items():
            if r["cooldown"]:
                none = next(iter(r["conditions"].values()))["mean"]   # the first condition: none
                verdict = "at or below" if none <= base else "ABOVE"
                print(f"{arm}: without metadata {none:.4f}, {verdict} plain's {base:.4f}")
    print(f"{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()

"""Choosing the mixture end to end: does `sptok mix` find a mixture at least as good as natural and uniform?

    python pipelines/mixture.py [--corpus ../shared/corpus] [--work out/mixture] [--proxies 16] [--fresh]

1. Build the four shared sources with a validation split (`--holdout-docs`, by each document's draw).
2. `sptok mix`: proxy runs of a small BERT (pipelines/mixture.yaml) on random mixtures around the natural
   token shares, a regression from mixture to per-source validation loss, checked on proxies left out of the
   fit, and the mixture it predicts best (mean per-source validation loss).
3. Three confirmation models trained from scratch with the same token budget (--confirm-steps, by default the
   proxies' own: the budget the search optimised): the proposed mixture, the natural one and the uniform one,
   evaluated on the same validation samples.
Prints their per-source and mean validation losses side by side with the left-out rank correlation, and
writes confirmation.json next to mixture.json (`sptok report BUILD --mixture DIR` shows both).
A rerun keeps the finished proxies and resumes an interrupted one; --fresh starts over (needed once the corpus
changed: the build, and so every proxy, is of other inputs).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from _common import arguments, run_cli, start_work

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pydocs", "code", "fortunes", "chinese")


def build(corpus: Path, work: Path, holdout_docs: int) -> Path:
    from sptok.build import run_build

    out = work / "build"
    manifest = work / "corpus.yaml"
    manifest.write_text("sources:\n" + "".join(f"  - {{name: {s}, paths: {corpus.resolve()}/{s}.jsonl.zst, "
                                               f"id_field: id}}\n" for s in SOURCES))
    flags = {"tokenizer": str(ROOT / "pipelines/demo/tokenizer"), "seq_len": 128, "msp_prob": 0.15,
             "holdout_docs": holdout_docs, "quiet": True}
    run_build(str(manifest), str(out), flags, log=print)
    return out


def confirm(search: Path, steps: int, log) -> dict:
    """Train the proposed, natural and uniform mixtures from scratch with the same budget; their validation
    losses, per source and mean."""
    from sptok.mix import load_plan
    from sptok.train.config import load_config
    from sptok.train.loop import pretrain

    plan = load_plan(str(search))
    mix = json.loads((search / "mixture.json").read_text())
    runs = {}
    for name in ("proposed", "natural", "uniform"):
        weights = mix["predicted"][name]["weights"]
        d = search / "confirm" / name
        shutil.rmtree(d, ignore_errors=True)   # from scratch: the proposal may have changed since the last run
        cfg = load_config(None, [f"train.steps={steps}", f"eval.every={steps}", f"log.dir={d / 'log'}",
                                 f"checkpoint.dir={d / 'ckpt'}"], base=_without_dirs(plan["config"]))
        cfg.data.proportion = weights
        t0 = time.time()
        recs = pretrain(cfg, log=lambda m: None)
        last = [r for r in recs if r.get("split") == "validation"][-1]
        by = dict(zip(plan["sources"], last["val_loss_by_source"]))
        runs[name] = {"weights": weights, "loss_by_source": by, "mean": sum(by.values()) / len(by),
                      "seconds": round(time.time() - t0, 1)}
        log(f"  {name:<9} mean validation loss {runs[name]['mean']:.4f} ({runs[name]['seconds']:.0f} s)")
    return {"steps": steps, "runs": runs}


def _without_dirs(config: dict) -> dict:
    cfg = json.loads(json.dumps(config))
    cfg["data"]["proportion"] = None
    return cfg


def table(mix: dict, conf: dict) -> str:
    runs = conf["runs"]
    names = mix["sources"]
    head = f"{'source':<10}" + "".join(f"{k:>12}" for k in runs)
    lines = [head, "-" * len(head)]
    for n in names:
        lines.append(f"{n:<10}" + "".join(f"{runs[k]['loss_by_source'][n]:>12.4f}" for k in runs))
    lines.append("-" * len(head))
    lines.append(f"{'mean':<10}" + "".join(f"{runs[k]['mean']:>12.4f}" for k in runs))
    lines.append("")
    lines.append("shares    " + "".join(f"{k:>12}" for k in runs))
    for n in names:
        lines.append(f"{n:<10}" + "".join(f"{runs[k]['weights'][n]:>12.3f}" for k in runs))
    check = mix["left_out"]
    lines.append(f"\nleft-out rank correlation (predicted vs actual objective, {len(check['proxies'])} proxies): "
                 f"{check['spearman']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = arguments("mixture", description=__doc__.split("\n")[0])
    ap.add_argument("--proxies", type=int, default=32)
    ap.add_argument("--holdout-docs", type=int, default=64)
    ap.add_argument("--confirm-steps", type=int, default=None,
                    help="steps of each confirmation run (default: the proxies' own, the budget the search optimised)")
    ap.add_argument("--seed", type=int, default=0)
    run_cli(ap, argv, run, fresh="delete --work first: a new build, new proxies",
            overwrite_hint=" (here: python pipelines/mixture.py --fresh)")


def run(args) -> None:
    t0 = time.time()
    start_work(args)
    out = build(args.corpus, args.work, args.holdout_docs)
    from sptok.mix import fit_search, plan_search, run_proxy

    search = args.work / "search"
    plan = plan_search(str(ROOT / "pipelines/mixture.yaml"), [f"data.build={out}"], str(search), args.proxies, 5.0,
                       "natural", args.seed, log=print)
    for k in range(len(plan["mixtures"])):
        t = time.time()
        r = run_proxy(str(search), k, log=lambda m: None)
        print(f"proxy {k + 1}/{len(plan['mixtures'])}: loss {r['loss']:.4f} ({time.time() - t:.0f} s)", flush=True)
    mix = fit_search(str(search), log=print)
    steps = args.confirm_steps or plan["config"]["train"]["steps"]
    print(f"confirmation: {steps} steps each, from scratch")
    conf = confirm(search, steps, print)
    (search / "confirmation.json").write_text(json.dumps(conf, indent=1) + "\n")
    print("\n" + table(mix, conf))
    best_baseline = min(conf["runs"]["natural"]["mean"], conf["runs"]["uniform"]["mean"])
    verdict = "at or below" if conf["runs"]["proposed"]["mean"] <= best_baseline else "ABOVE"
    print(f"\nproposed mean validation loss {conf['runs']['proposed']['mean']:.4f} is {verdict} the better of natural "
          f"and uniform ({best_baseline:.4f}); {time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()

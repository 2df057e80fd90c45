"""Continual pre-training in miniature on CPU: re-warming, replay and wsd after a new language arrives.

    python pipelines/continual.py [--corpus ../shared/corpus] [--work out/continual] [--fresh]

The papers: "How to (re)warm your model" (arXiv 2308.04014) and "Simple and Scalable Strategies to Continually
Pre-train LLMs" (arXiv 2403.08763).
1. Build three of the shared sources (pydocs, code, fortunes) with a validation split (`--holdout-docs`).
2. Pre-train a tiny Llama (pipelines/continual.yaml) on them for --pretrain-steps: warm-up, cosine decay to
   min_lr, natural mixture.
3. `sptok build --append` the fourth, chinese (a strong shift: a new language), to the same build: the old
   shards stay as they were, the tokenizer gains its SP.
4. Continue the pre-trained model (`train.init_from`, fresh optimizer) for --continue-steps in five arms:
   (a) constant LR at min_lr, where pre-training ended: no re-warm, no decay;
   (b) re-warm (warmup_steps) to lr, cosine decay to min_lr;
   (c) as (b), with 5% replay; (d) as (b), with 25% replay;
   (e) wsd: re-warm, stable at lr, linear decay to min_lr over the last fifth.
   Replay is the old sources' share of the continuation (one `data.phases` entry: exact shares, split among
   the old sources by the tokens pre-training read of each); (a), (b) and (e) read only chinese, as the
   papers' baselines do, so that (b) against (c)/(d) isolates replay and (a)/(e) against (b) the schedule.
   (f) A model from scratch on the union (all four sources, natural mixture) for pretrain + continue steps:
   the tokens of pre-training plus a continuation.
Every run is scored at its end on the same validation samples of each source. Prints, per arm, the validation
loss on each old source (forgetting) and on chinese (adaptation), and the tokens it trained on as the run
counted them (delivered tokens, SPs included); writes results.json in --work. A rerun keeps the build and
keeps the build and the pre-trained model and trains every arm again; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _common import arguments, run_cli, start_work

ROOT = Path(__file__).resolve().parents[1]
OLD = ("pydocs", "code", "fortunes")
NEW = "chinese"
CONFIG = ROOT / "pipelines" / "continual.yaml"


def build(corpus: Path, work: Path, sources: tuple, holdout_docs: int) -> None:
    """Build ``sources`` into work/build, or append them to it where it holds the others."""
    from sptok.build import run_build
    from sptok.build.append import run_append

    manifest = work / f"{len(sources)}-sources.yaml"
    manifest.write_text("sources:\n" + "".join(f"  - {{name: {s}, paths: {corpus.resolve()}/{s}.jsonl.zst, "
                                               f"id_field: id}}\n" for s in sources))
    flags = {"tokenizer": str(ROOT / "pipelines/demo/tokenizer"), "seq_len": 128, "holdout_docs": holdout_docs,
             "quiet": True}
    append = NEW in sources
    t0 = time.time()
    (run_append if append else run_build)(str(manifest), str(work / "build"), flags, log=lambda m: None)
    print(f"{'appended' if append else 'built'} {NEW if append else ', '.join(sources)} in {time.time() - t0:.0f} s",
          flush=True)


def pretrained(args) -> dict:
    """Steps 1-3: the old sources built, the model pre-trained on them, chinese appended; kept by a rerun once
    complete (pretrain.json)."""
    done = args.work / "pretrain.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(args.work / "build", ignore_errors=True)
    build(args.corpus, args.work, OLD, args.holdout_docs)
    res = train("pre-training", args.work, [f"train.steps={args.pretrain_steps}", f"checkpoint.dir={ckpt_dir(args)}"])
    build(args.corpus, args.work, OLD + (NEW,), args.holdout_docs)
    done.write_text(json.dumps(res, indent=1) + "\n")
    return res


def ckpt_dir(args) -> Path:
    return args.work / "runs" / "pre-training" / "ckpt"


def train(name: str, work: Path, overrides: list[str]) -> dict:
    """One run of pipelines/continual.yaml with ``overrides``, from scratch; its last validation losses by
    source and the tokens it was delivered by source."""
    from sptok.train.config import load_config
    from sptok.train.loop import pretrain

    d = work / "runs" / name
    shutil.rmtree(d, ignore_errors=True)
    cfg = load_config(str(CONFIG), [f"data.build={work / 'build'}", f"log.dir={d / 'log'}", *overrides])
    cfg.eval.every = cfg.train.steps
    t0 = time.time()
    recs = pretrain(cfg, log=lambda m: None)
    val = [r for r in recs if r.get("split") == "validation"][-1]
    trained = [r for r in recs if "delivered_tokens" in r][-1]
    out = {"loss": dict(zip(val["sources"], val["val_loss_by_source"])),
           "tokens": dict(zip(trained["sources"], trained["delivered_tokens"])), "steps": cfg.train.steps,
           "seconds": round(time.time() - t0, 1)}
    print(f"  {name:<16} {cfg.train.steps} steps, {sum(out['tokens'].values()):,.0f} tokens, "
          f"{out['seconds']:.0f} s", flush=True)
    return out


def score_origin(work: Path, ckpt: Path) -> dict:
    """The pre-trained model, grown for chinese's SP, scored on the appended build's validation samples: where
    every continuation starts."""
    from sptok.train.config import load_config
    from sptok.train.loop import setup

    cfg = load_config(str(CONFIG), [f"data.build={work / 'build'}", f"train.init_from={ckpt}",
                                    f"log.dir={work / 'runs' / 'origin'}"])
    cfg.eval.every = 1
    run = setup(cfg, log=lambda m: None)
    try:
        val = run.evaluator(run.trained, run.autocast)
    finally:
        run.loader.dataset.close()
    return dict(zip(run.info.sources, val["val_loss_by_source"]))


def replay(share: float, pretrained_tokens: dict) -> str:
    """One phase (the override): chinese at 1 - share, the old sources at ``share`` split by what pre-training
    read of each."""
    old = sum(pretrained_tokens[s] for s in OLD)
    prop = {NEW: 1.0 - share, **{s: share * pretrained_tokens[s] / old for s in OLD if share}}
    return "data.phases=" + json.dumps([{"until": 1.0, "proportion": prop}])


def arms(args, ckpt: Path, pre: dict) -> dict:
    """The five continuations of the pre-trained model and the model from scratch on the union."""
    from sptok.train.config import load_config

    steps, min_lr = args.continue_steps, load_config(str(CONFIG)).optim.min_lr
    cont = [f"train.init_from={ckpt}", f"train.steps={steps}"]
    rewarm = [*cont, f"optim.warmup_steps={args.rewarm_steps}"]
    return {
        "a-constant": [*cont, "optim.schedule=constant", "optim.min_lr=null", "optim.warmup_steps=0",
                       f"optim.lr={min_lr}", replay(0, pre)],
        "b-rewarm-cosine": [*rewarm, replay(0, pre)],
        "c-replay-5%": [*rewarm, replay(0.05, pre)],
        "d-replay-25%": [*rewarm, replay(0.25, pre)],
        "e-wsd": [*rewarm, "optim.schedule=wsd", f"optim.decay_steps={steps // 5}", replay(0, pre)],
        "f-scratch-union": [f"train.steps={args.pretrain_steps + steps}"],
    }


def table(res: dict) -> str:
    """Validation loss per source, the old sources' mean, and the tokens of each arm (its own, and with
    pre-training's for the continuations)."""
    sources = (*OLD, NEW)
    head = (f"{'arm':<20}" + "".join(f"{s:>10}" for s in sources) + f"{'old mean':>10}"
            + f"{'tokens':>12}{'old share':>10}{'total tokens':>14}")
    lines = [head, "-" * len(head)]
    pre_tokens = sum(res["pretrain"]["tokens"].values())
    rows = [("pre-trained", res["origin"], None, None)]
    rows += [(name, r["loss"], r["tokens"], 0 if name.startswith("f-") else pre_tokens)
             for name, r in res["arms"].items()]
    for name, loss, tokens, before in rows:
        cells = "".join(f"{loss[s]:>10.4f}" for s in sources) + f"{sum(loss[s] for s in OLD) / len(OLD):>10.4f}"
        if tokens is None:
            cells += f"{pre_tokens:>12,.0f}{'100%':>10}{pre_tokens:>14,.0f}"
        else:
            total = sum(tokens.values())
            old = sum(tokens[s] for s in OLD) / total
            cells += f"{total:>12,.0f}{100 * old:>9.1f}%{total + before:>14,.0f}"
        lines.append(f"{name:<20}{cells}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = arguments("continual", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--holdout-docs", type=int, default=64)
    ap.add_argument("--pretrain-steps", type=int, default=160)
    ap.add_argument("--continue-steps", type=int, default=50)
    ap.add_argument("--rewarm-steps", type=int, default=5, help="warm-up of the re-warmed arms (b)-(e)")
    run_cli(ap, argv, run, fresh="delete --work first: build and pre-train again")


def run(args) -> None:
    t0 = time.time()
    start_work(args)
    res = {"pretrain": pretrained(args)}
    ckpt = ckpt_dir(args)
    res["origin"] = score_origin(args.work, ckpt)
    res["arms"] = {name: train(name, args.work, overrides)
                   for name, overrides in arms(args, ckpt, res["pretrain"]["tokens"]).items()}
    res["seconds"] = round(time.time() - t0)
    (args.work / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    print("\nvalidation loss by source (old: forgetting; chinese: adaptation); tokens as the runs counted them\n")
    print(table(res))
    print(f"\n{res['seconds']} s in all")


if __name__ == "__main__":
    main()

"""``sptok mix``: search the source mixture by regression over proxy runs (RegMix-style).

One build serves every mixture: proportions are a load-time setting (``data.proportion``), so a proxy is
``sptok pretrain`` of the same config with another mixture, and its result is the per-source loss of its
last in-loop evaluation on the build's validation split. The steps, each resumable:

  plan     K mixtures drawn from a Dirichlet around the natural (or manifest) shares; ``OUT/plan.json`` and a
           config per proxy (``OUT/proxies/NNN/config.yaml``), usable by a Slurm array or torchrun
  proxies  each proxy trains and writes ``OUT/proxies/NNN/result.json`` when done; a rerun skips the done
           ones (and resumes an interrupted one from its checkpoints)
  fit      the regression (``search.py``), its rank correlation on proxies left out of the fit, and the
           proposed mixture under the objective: ``OUT/mixture.json``, ``OUT/proportion.txt`` (a ``--set``
           override) and ``OUT/predicted_vs_actual.png``

The objective (the weights of the sources' losses) belongs to the fit, not to the plan: the proxies do not
depend on it, so one search can be refitted under any objective (``--collect --objective ...``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os

import numpy as np

from ..errors import SptokError
from ..extras import require

require("train", "sptok.mix")
LEFT_OUT = 0.25      # share of the proxies each fit is checked on


def plan_search(config: str, overrides: list[str], out: str, proxies: int, concentration: float, prior: str,
                seed: int, log=print) -> dict:
    """Write (or, when it is the same, reuse) ``OUT/plan.json`` and one config per proxy."""
    import yaml

    from ..layout import write_json
    from ..train.config import load_config
    from ..train.loop import ensure_build
    from .search import sample_mixtures

    if proxies < 4:
        raise SptokError(f"--proxies: {proxies} is too few to fit and check a regression (at least 4; tens are usual)")
    if concentration <= 0:
        raise SptokError(f"--concentration: must be positive, got {concentration}")
    if seed < 0:
        raise SptokError(f"--seed: must be 0 or more, got {seed}")
    cfg = load_config(config, overrides)
    if cfg.eval.every <= 0:
        cfg.eval.every = cfg.train.steps         # a proxy needs one evaluation: at its end
    ensure_build(cfg, 0, log)
    from ..build_info import BuildInfo
    from ..train.evaluate import validation_build

    if validation_build(cfg) is None:
        raise SptokError(f"sptok mix compares proxies on validation data: build {cfg.data.build} with --holdout or "
                         f"--holdout-docs, or set eval.build")
    info = BuildInfo.load(cfg.data.build)
    names = info.sources
    shares = _prior(info, prior)
    base = cfg.to_dict()
    plan = {"version": 1, "sources": names, "prior": prior, "prior_shares": shares.tolist(),
            "concentration": concentration, "seed": seed, "fingerprint": info.fingerprint,
            "config": base,
            "mixtures": sample_mixtures(shares, proxies, concentration, seed).tolist()}
    path = os.path.join(out, "plan.json")
    other = sorted(set(os.listdir(out)) - {"proxies"}) if os.path.isdir(out) and not os.path.exists(path) else []
    if other:   # a build, a run's log, anything else: its files and the search's would mix
        raise SptokError(f"--out {out}: holds other files than a search ({', '.join(other[:3])}"
                         f"{', ...' if len(other) > 3 else ''}); give a new or empty directory, or an earlier search's")
    if os.path.exists(path):
        old = load_plan(out)
        if _key(old) != _key(plan):
            raise SptokError(f"{out} holds another search (its plan.json differs in {', '.join(_differences(old, plan))})"
                             f"; choose another --out, or delete {out} to start over")
        plan = old
    os.makedirs(os.path.join(out, "proxies"), exist_ok=True)
    for k, mix in enumerate(plan["mixtures"]):
        d = proxy_dir(out, k)
        os.makedirs(d, exist_ok=True)
        doc = copy.deepcopy(base)
        doc["data"].update(proportion=dict(zip(names, mix)), manifest=None)
        doc["log"].update(dir="log", tensorboard=False)          # relative to the proxy's config.yaml
        doc["checkpoint"].update(dir="ckpt", resume=True)
        doc["eval"]["every"] = base["eval"]["every"] or cfg.eval.every
        doc["eval"]["conditions"] = None   # a proxy is scored by one validation loss (its eval.sp_policy)
        with open(os.path.join(d, "config.yaml"), "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
    write_json(path, plan)
    return plan


def run_proxy(out: str, k: int, log=print) -> dict:
    """Train proxy ``k`` of the plan in ``out`` (resuming from its checkpoints); write and return its result."""
    from ..layout import write_json
    from ..train.config import load_config
    from ..train.loop import pretrain

    plan = load_plan(out)
    if not 0 <= k < len(plan["mixtures"]):
        raise SptokError(f"--proxy: {k} is not a proxy of {out} (0 to {len(plan['mixtures']) - 1})")
    d = proxy_dir(out, k)
    done = os.path.join(d, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    pretrain(load_config(os.path.join(d, "config.yaml")), log=log)
    evals = [r for r in _records(os.path.join(d, "log", "metrics.jsonl")) if r.get("split") == "validation"]
    if not evals:
        raise SptokError(f"proxy {k}: its run logged no evaluation ({d}/log/metrics.jsonl)")
    result = {"proxy": k, "mixture": plan["mixtures"][k], "step": evals[-1]["step"],
              "losses": evals[-1]["val_loss_by_source"], "loss": evals[-1]["val_loss"]}
    if _rank() == 0:
        write_json(done, result)
    return result


def fit_search(out: str, objective: dict | None = None, log=print) -> dict:
    """Fit the finished proxies, check the fit on left-out ones, propose the mixture that minimises
    ``objective`` (source -> weight of its validation loss; equal weights when None); write the outputs."""
    from ..layout import write_json
    from . import search

    plan = load_plan(out)
    results = [_result(out, k) for k in range(len(plan["mixtures"]))]
    missing = [k for k, r in enumerate(results) if r is None]
    if missing:
        raise SptokError(f"{len(missing)} of {len(results)} proxies have no result yet (first: {missing[0]}); run them "
                         f"(sptok mix ... --proxy K), then collect again")
    if any(v is None for r in results for v in r["losses"]):
        raise SptokError("a proxy's evaluation has a source without validation targets: raise eval.samples")
    diverged = [k for k, r in enumerate(results) if not np.isfinite(r["losses"]).all()]
    if diverged:
        raise SptokError(f"proxy {diverged[0]}: its validation loss is not finite (the run diverged): lower "
                         f"optim.lr, delete {proxy_dir(out, diverged[0])} and run it again")
    mixtures = np.array([r["mixture"] for r in results])
    losses = np.array([r["losses"] for r in results])
    w = objective_weights(objective, plan["sources"])
    check = search.left_out(mixtures, losses, w, LEFT_OUT, plan["seed"])
    f = search.fit(mixtures, losses)
    prior = np.array(plan["prior_shares"])
    best = search.propose(f, prior, plan["concentration"], w, plan["seed"] + 1, known=mixtures, losses=losses)
    names = plan["sources"]
    k = len(names)
    compare = {"proposed": best, "natural": search.normalize(prior), "uniform": np.full(k, 1.0 / k)}
    doc = {"sources": names, "weights": dict(zip(names, best.round(6).tolist())),
           "predicted": {name: {"loss_by_source": dict(zip(names, f.predict(m)[0].tolist())),
                                "objective": float(search.objective(f.predict(m), w)[0]),
                                "weights": dict(zip(names, m.round(6).tolist()))} for name, m in compare.items()},
           "objective_weights": dict(zip(names, w.tolist())), "left_out": check,
           "proxies": [{"mixture": dict(zip(names, r["mixture"])), "loss_by_source": dict(zip(names, r["losses"])),
                        "objective": float(search.objective(np.array(r["losses"]), w))} for r in results],
           "regression": f"sklearn RidgeCV on (r, r^2, log r), one output per source; proposal scored by the "
                         f"predicted objective + {search.DOUBT:g} sd over {search.BOOTSTRAP} bootstrap refits"}
    write_json(os.path.join(out, "mixture.json"), doc, allow_nan=False)   # strict JSON: no NaN, ever
    override = "data.proportion={" + ", ".join(f"{n}: {v:.6f}" for n, v in doc["weights"].items()) + "}"
    with open(os.path.join(out, "proportion.txt"), "w") as fh:
        fh.write(override + "\n")
    figure = _plot(check, os.path.join(out, "predicted_vs_actual.png"))
    if check["spearman"] is None:
        log(f"warning: {check['skipped']}")
    log(f"proposed mixture: {', '.join(f'{n} {v:.3f}' for n, v in doc['weights'].items())}  (predicted objective "
        f"{doc['predicted']['proposed']['objective']:.4f}; natural {doc['predicted']['natural']['objective']:.4f}, "
        f"uniform {doc['predicted']['uniform']['objective']:.4f})" + (
            "" if check["spearman"] is None else
            f"; left-out rank correlation {check['spearman']:.2f} over {len(check['proxies'])} proxies"))
    log(f"wrote {out}/mixture.json, {out}/proportion.txt" + (f", {figure}" if figure else "") +
        f"; train with it: sptok pretrain CONFIG --set \"$(cat {out}/proportion.txt)\"")
    return doc


# ------------------------------------------------------------------------------------------------ helpers

def proxy_dir(out: str, k: int) -> str:
    return os.path.join(out, "proxies", f"{k:03d}")


PLAN_KEYS = ("sources", "prior_shares", "concentration", "seed", "config", "mixtures")


def load_plan(out: str) -> dict:
    """``OUT/plan.json``, with every key the steps read (a cut or edited plan is named, not a KeyError later)."""
    try:
        with open(os.path.join(out, "plan.json")) as f:
            plan = json.load(f)
    except FileNotFoundError:
        raise SptokError(f"{out}: no plan.json; plan the search first (sptok mix CONFIG --out {out})") from None
    except ValueError as e:
        raise SptokError(f"{out}/plan.json: unreadable ({e})") from None
    missing = [k for k in PLAN_KEYS if k not in plan] if isinstance(plan, dict) else list(PLAN_KEYS)
    if missing or not isinstance(plan["config"], dict) or not isinstance(plan["mixtures"], list):
        raise SptokError(f"{out}/plan.json: not the plan of a search (no {', '.join(missing) or 'config or mixtures'} "
                         f"as `sptok mix --plan` writes them); delete {out} to start over")
    return plan


def _result(out: str, k: int) -> dict | None:
    path = os.path.join(proxy_dir(out, k), "result.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
        if isinstance(result["losses"], list) and isinstance(result["mixture"], list):
            return result
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise SptokError(f"{path}: not the result of proxy {k} as `sptok mix --proxy` writes it; delete it and run the "
                     f"proxy again (sptok mix CONFIG --out {out} --proxy {k})")


def _records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _identity(plan: dict) -> dict:
    """What makes two plans the same search, flat (``config.train``...): not where its logs go, nor the
    objective that plans written before it moved to the fit recorded."""
    keep = {k: v for k, v in plan.items() if k not in ("config", "objective")}
    keep.update({f"config.{sec}": v for sec, v in plan["config"].items() if sec not in ("log", "checkpoint")})
    return keep


def _key(plan: dict) -> str:
    return hashlib.sha256(json.dumps(_identity(plan), sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
    """What the user changed between two plans, named as the options and config keys that set it (the
    mixtures and prior shares follow from those)."""
    a, b = (json.loads(json.dumps(_identity(p))) for p in (old, new))     # as stored: tuples become lists
    names = {"fingerprint": "the build", "prior": "--prior", "concentration": "--concentration", "seed": "--seed",
             "sources": "the sources", "version": "the plan's version"}
    found = [names.get(k, f"config {k[7:]}") for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k) and k not in ("mixtures", "prior_shares")]
    if len(old["mixtures"]) != len(new["mixtures"]):
        found.insert(0, f"--proxies ({len(old['mixtures'])}, now {len(new['mixtures'])})")
    return found or ["its mixtures"]


def _prior(info, prior: str) -> np.ndarray:
    if prior == "manifest":
        return np.array(info.weights, np.float64) / sum(info.weights)
    if prior == "natural":
        tokens = np.array([info.raw["counts"][n]["sample_tokens"] for n in info.sources], np.float64)
        return tokens / tokens.sum()
    raise SptokError(f"--prior: {prior!r} is not one of natural, manifest")


def objective_weights(given: dict | None, names: list[str]) -> np.ndarray:
    """The weight of each source's validation loss in the objective, in the order of ``names``."""
    if not given:
        return np.ones(len(names))
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise SptokError(f"--objective: no source {unknown[0]!r} (sources: {', '.join(names)})")
    w = np.array([float(given.get(n, 0.0)) for n in names])
    if (w < 0).any() or w.sum() <= 0:
        raise SptokError("--objective: weights must be >= 0 and not all 0")
    return w


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _plot(check: dict, path: str) -> str | None:
    """Predicted against actual objective of the proxies left out of the fit (needs matplotlib); none where
    the check was skipped."""
    if check["spearman"] is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    a, p = check["actual"], check["predicted"]
    ax.scatter(a, p, color="#1f77b4")
    lo, hi = min(a + p), max(a + p)
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--")
    ax.set_xlabel("actual validation loss (objective)")
    ax.set_ylabel("predicted by the fit without them")
    ax.set_title(f"proxies left out of the fit: Spearman {check['spearman']:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

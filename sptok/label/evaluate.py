"""`sptok label --eval`: how well the predicted sources match the given ones.

Accuracy, per-source precision / recall / F1 / support, the confusion matrix (rows: the given source,
columns: the predicted one) and the expected calibration error over ``ECE_BINS`` equal-width bins of the
top probability: bin b holds the rows whose ``sp_prob`` lies in (b/M, (b+1)/M] (0 falls in the first), and
ECE = sum over bins of (rows in bin / rows) * |accuracy in bin - mean sp_prob in bin|.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..extras import available

ECE_BINS = 15


def evaluate(sources: list[str], true: np.ndarray, probs: np.ndarray, unknown: dict[str, int] | None = None,
             top_k: int = 1) -> dict:
    """``true``: given source ids; ``probs``: (n, K) predicted probabilities of the same rows."""
    true = np.asarray(true, np.int64)
    probs = np.asarray(probs, np.float64)
    K, n = len(sources), len(true)
    pred = probs.argmax(1)
    conf = probs.max(1)
    cm = np.zeros((K, K), np.int64)
    np.add.at(cm, (true, pred), 1)
    per = []
    for k, name in enumerate(sources):
        tp, predicted, support = int(cm[k, k]), int(cm[:, k].sum()), int(cm[k].sum())
        p = tp / predicted if predicted else None
        r = tp / support if support else None
        f1 = None if p is None or r is None else (0.0 if p + r == 0 else 2 * p * r / (p + r))
        per.append({"source": name, "precision": p, "recall": r, "f1": f1, "support": support,
                    "predicted": predicted})
    correct = pred == true
    b = np.clip(np.ceil(conf * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
    bins, ece = [], 0.0
    for i in range(ECE_BINS):
        sel = b == i
        c = int(sel.sum())
        acc = float(correct[sel].mean()) if c else None
        mean_conf = float(conf[sel].mean()) if c else None
        if c:
            ece += c / n * abs(acc - mean_conf)
        bins.append({"lo": i / ECE_BINS, "hi": (i + 1) / ECE_BINS, "count": c, "accuracy": acc,
                     "confidence": mean_conf})
    k = min(top_k, K)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    f1s = [s["f1"] for s in per if s["support"]]
    return {"rows": n, "accuracy": float(correct.mean()), "top_k": k,
            "topk_accuracy": float((top == true[:, None]).any(1).mean()),
            "macro_f1": float(np.mean([f or 0.0 for f in f1s])) if f1s else None,
            "ece": float(ece), "mean_confidence": float(conf.mean()), "sources": list(sources),
            "per_source": per, "confusion": cm.tolist(), "calibration_bins": bins,
            "unknown_sources": dict(unknown or {})}


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_report(ev: dict) -> str:
    lines = [f"rows {ev['rows']:,}  accuracy {ev['accuracy']:.4f}  macro F1 {_f(ev['macro_f1'])}  "
             f"ECE {ev['ece']:.4f} ({ECE_BINS} bins)  mean sp_prob {ev['mean_confidence']:.4f}"]
    if ev["top_k"] > 1:
        lines[0] += f"  top-{ev['top_k']} accuracy {ev['topk_accuracy']:.4f}"
    names = ev["sources"]
    w = max(8, *(len(s) for s in names))
    lines += ["", f"{'source':<{w}}  precision  recall     f1  support  predicted",
              f"{'-' * w}  ---------  ------  -----  -------  ---------"]
    for s in ev["per_source"]:
        lines.append(f"{s['source']:<{w}}  {_f(s['precision']):>9}  {_f(s['recall']):>6}  {_f(s['f1']):>5}  "
                     f"{s['support']:>7,}  {s['predicted']:>9,}")
    cw = max(6, *(len(s) for s in names), *(len(f"{v:,}") for r in ev["confusion"] for v in r))
    lines += ["", "confusion (rows: given source, columns: predicted)",
              f"{'':<{w}}  " + "  ".join(f"{s:>{cw}}" for s in names)]
    for name, row in zip(names, ev["confusion"]):
        lines.append(f"{name:<{w}}  " + "  ".join(f"{v:>{cw},}" for v in row))
    if ev["unknown_sources"]:
        lines += ["", "rows left out, their source unknown to the model: " +
                  ", ".join(f"{k} ({v:,})" for k, v in sorted(ev["unknown_sources"].items()))]
    return "\n".join(lines)


def write_eval(ev: dict, out_dir: str, warn) -> list[str]:
    """eval.json and confusion.png (when matplotlib is installed) in ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "eval.json")
    with open(path, "w") as f:
        json.dump(ev, f, indent=1)
    written = [path]
    if not available("plot"):
        warn("matplotlib is not installed, so there is no confusion.png: pip install 'sptok[plot]'")
        return written
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.array(ev["confusion"], np.float64)
    names = ev["sources"]
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = 2.5 + 0.7 * len(names)
    fig = Figure(figsize=(size + 1, size), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted source")
    ax.set_ylabel("given source")
    ax.set_title(f"accuracy {ev['accuracy']:.3f}, ECE {ev['ece']:.3f} ({ev['rows']:,} rows)", fontsize=10)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{int(cm[i, j]):,}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of the given source's rows")
    png = os.path.join(out_dir, "confusion.png")
    fig.savefig(png)
    written.append(png)
    return written

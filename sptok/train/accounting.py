"""What a training run actually consumed, per source, next to what was requested and what the build holds."""

from __future__ import annotations

import json
import os

from ..errors import SptokError


def run_accounting(info: dict, stats: dict, logdir: str) -> list[dict]:
    """Rows per source: requested share, delivered samples / tokens and their shares, the build's tokens."""
    try:
        with open(os.path.join(logdir, "run.json")) as f:
            run = json.load(f)
        with open(os.path.join(logdir, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f if line.strip()][-1]
    except (OSError, ValueError, IndexError) as e:
        raise SptokError(f"--run {logdir}: not a training log of sptok pretrain (run.json + metrics.jsonl): {e}") from None
    if run["fingerprint"] != info["fingerprint"]:
        raise SptokError(f"--run {logdir}: that run trained on build {run['fingerprint'][:12]}, not on this one "
                         f"({info['fingerprint'][:12]})")
    req = run["requested"]
    props = {n: r.get("proportion") for n, r in req.items()}
    if any(v is None for v in props.values()):   # natural sizes or repeats: the build's share times the repeat
        total = sum(stats["sources"][n]["samples"] * req[n].get("repeat", 1.0) for n in run["sources"])
        props = {n: stats["sources"][n]["samples"] * req[n].get("repeat", 1.0) / total for n in run["sources"]}
    samples, tokens = last["delivered_samples"], last["delivered_tokens"]
    ns, nt = max(1.0, sum(samples)), max(1.0, sum(tokens))
    return [{"source": n, "requested": props[n], "delivered_samples": int(samples[i]),
             "delivered_share": samples[i] / ns, "delivered_tokens": int(tokens[i]), "token_share": tokens[i] / nt,
             "built_tokens": stats["sources"][n]["sample_tokens"], "step": last["step"]}
            for i, n in enumerate(run["sources"])]


def format_accounting(rows: list[dict]) -> str:
    head = ["source", "requested", "delivered", "samples", "tokens", "token share", "built tokens"]
    body = [[r["source"], f"{100 * r['requested']:.1f}%", f"{100 * r['delivered_share']:.1f}%",
             f"{r['delivered_samples']:,}", f"{r['delivered_tokens']:,}", f"{100 * r['token_share']:.1f}%",
             f"{r['built_tokens']:,}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    step = rows[0]["step"] if rows else 0
    return "\n".join([f"delivered to the model by step {step} (all ranks):", line(head),
                      line(["-" * w for w in widths])] + [line(b) for b in body])

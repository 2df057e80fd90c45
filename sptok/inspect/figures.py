"""The numbers behind each figure, as plain dicts: pure functions of ``sptok.json`` and ``stats.json``.

Kept apart from the drawing (``plot.py``) so tests check exactly what is handed to matplotlib, and so the
report and ``stats --plot`` show the same numbers. Every dict names its title, axis labels (with units)
and the sources it covers.
"""

from __future__ import annotations

from ..stats import real_tokens

ORDER = ("token_share", "doc_lengths", "sp_rates", "packing")


def _sources(info: dict) -> list[str]:
    return [e["source"] for e in sorted(info["sp_table"], key=lambda e: e["source_id"])]


def token_share(info: dict, stats: dict) -> dict:
    """What the manifest weights ask for at load time against what each source holds in the build."""
    names = _sources(info)
    weights = {s["name"]: float(s.get("weight", 1.0)) for s in info["manifest"]["sources"]}
    tokens = [real_tokens(stats["sources"][n]) for n in names]
    total_w, total_t = sum(weights[n] for n in names) or 1.0, sum(tokens) or 1
    return {"title": "Token share per source: manifest weight vs built", "xlabel": "source",
            "ylabel": "share of tokens (%)", "sources": names,
            "weights": [weights[n] for n in names],
            "weight_share": [100.0 * weights[n] / total_w for n in names],
            "tokens": tokens, "built_share": [100.0 * t / total_t for t in tokens]}


def doc_lengths(info: dict, stats: dict) -> dict:
    """Documents per power-of-two length bin: bin b holds lengths in [2**(b-1), 2**b) text tokens."""
    names = _sources(info)
    hists = [list(stats["sources"][n]["doc_length_hist"]["counts"]) for n in names]
    top = max([max((b for b, c in enumerate(h) if c), default=0) for h in hists] + [1])
    counts = [(h + [0] * (top + 1))[1:top + 1] for h in hists]          # bins 1..top
    docs = [stats["sources"][n]["docs"] for n in names]
    return {"title": "Document length per source", "xlabel": "document length (text tokens, log scale)",
            "ylabel": "documents of the source (%)", "sources": names,
            "edges": [2 ** b for b in range(top + 1)],                   # bin b spans edges[b-1]..edges[b]
            "counts": counts, "docs": docs,
            "percent": [[100.0 * c / max(d, 1) for c in row] for row, d in zip(counts, docs)]}


def sp_rates(info: dict, stats: dict) -> dict:
    """How often documents got their SP, and how often an SP was masked, against the requested rates."""
    names = _sources(info)
    opts = info["options"]
    sites = 2 if opts["position"] == "both" else 1                      # "both" inserts 2 SPs a document
    per = [stats["sources"][n] for n in names]
    return {"title": "SP insertion and MSP rates per source (dashed: requested)", "xlabel": "source",
            "ylabel": ["documents with their SP (%)", "inserted SPs masked for MSP (%)"], "sources": names,
            "docs": [s["docs"] for s in per], "sp_inserted": [s["sp_inserted"] for s in per],
            "sp_masked": [s["sp_masked"] for s in per], "sites_per_doc": sites,
            "insert_rate": [100.0 * s["sp_inserted"] / max(s["docs"] * sites, 1) for s in per],
            "msp_rate": [100.0 * s["sp_masked"] / max(s["sp_inserted"], 1) for s in per],
            "insert_prob": 100.0 * float(opts["insert_prob"]), "msp_prob": 100.0 * float(opts["msp_prob"])}


def packing(info: dict, stats: dict) -> dict:
    """Tokens lost (--tail drop) or added (--tail pad) when each source's last sample was short."""
    names = _sources(info)
    per = [stats["sources"][n] for n in names]
    return {"title": f"Tokens truncated / padded by packing per source (--tail {info['options']['tail']}, "
                     f"seq_len {info['options']['seq_len']})",
            "xlabel": "source", "ylabel": "tokens", "sources": names,
            "dropped_tokens": [s["dropped_tokens"] for s in per],
            "padding_tokens": [s["padding_tokens"] for s in per],
            "sample_tokens": [s["sample_tokens"] for s in per]}


def figure_data(info: dict, stats: dict) -> dict[str, dict]:
    """Every figure's data, by name (the PNG's file name without ``.png``)."""
    makers = {"token_share": token_share, "doc_lengths": doc_lengths, "sp_rates": sp_rates, "packing": packing}
    return {name: makers[name](info, stats) for name in ORDER}

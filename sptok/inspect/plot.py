"""Draw the figures of ``figures.py`` with matplotlib (the optional ``sptok[plot]`` extra).

Only draws: every number comes from the data dict it is handed. Figures are built on the Agg canvas
directly (no pyplot), so nothing depends on a display or on global pyplot state.
"""

from __future__ import annotations

import io
import os

from ..errors import SptokError
from ..extras import require
from .figures import figure_data


def _mpl():
    require("plot", "drawing figures")
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return matplotlib, Figure, FigureCanvasAgg


def _new(title: str, ncols: int = 1):
    matplotlib, Figure, Canvas = _mpl()
    fig = Figure(figsize=(7.5, 4.2), dpi=100, layout="constrained")
    Canvas(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    fig.suptitle(title, fontsize=11)
    return fig, list(axes), matplotlib.colormaps["tab10"]


def _short(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else f"{n:,.0f}"


def _bars(ax, d: dict, series: list[tuple[str, list, str]], ylabel: str):
    """Grouped bars, one group per source; returns the bar containers in series order."""
    n, k = len(d["sources"]), len(series)
    width = 0.8 / k
    out = []
    for j, (label, values, color) in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(n)]
        out.append(ax.bar(xs, values, width, label=label, color=color))
    ax.set_xticks(range(n), d["sources"])
    ax.set_xlabel(d["xlabel"])
    ax.set_ylabel(ylabel)
    return out


def draw_token_share(d: dict):
    fig, (ax,), _ = _new(d["title"])
    _, built = _bars(ax, d, [("manifest weight (load-time proportion)", d["weight_share"], "#b0b7c3"),
                             ("built (tokens in samples)", d["built_share"], "#2f6db5")], d["ylabel"])
    ax.bar_label(built, labels=[_short(t) for t in d["tokens"]], fontsize=8, padding=2)
    ax.set_ylim(0, max(d["weight_share"] + d["built_share"] + [1]) * 1.18)
    ax.legend(fontsize=8)
    return fig


def draw_doc_lengths(d: dict):
    fig, (ax,), cmap = _new(d["title"])
    for i, (name, pct) in enumerate(zip(d["sources"], d["percent"])):
        ax.stairs(pct, d["edges"], color=cmap(i % 10), linewidth=1.8, label=f"{name} ({d['docs'][i]:,} docs)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(d["edges"], [f"{e:,}" for e in d["edges"]], fontsize=7)
    ax.set_xlabel(d["xlabel"])
    ax.set_ylabel(d["ylabel"])
    ax.set_ylim(0, max([max(p, default=0) for p in d["percent"]] + [1]) * 1.35)   # room for the legend
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    return fig


def draw_sp_rates(d: dict):
    fig, axes, cmap = _new(d["title"], ncols=2)
    colors = [cmap(i % 10) for i in range(len(d["sources"]))]
    for ax, rate, req, ylabel, sub in zip(axes, (d["insert_rate"], d["msp_rate"]), (d["insert_prob"], d["msp_prob"]),
                                          d["ylabel"], ("SP insertion", "MSP masking")):
        bars = ax.bar(range(len(rate)), rate, 0.6, color=colors)
        ax.bar_label(bars, labels=[f"{r:.1f}" for r in rate], fontsize=8, padding=2)
        ax.axhline(req, color="black", linestyle="--", linewidth=1, label=f"requested {req:g}%")
        ax.set_xticks(range(len(rate)), d["sources"], fontsize=8)
        ax.set_title(sub, fontsize=10)
        ax.set_xlabel(d["xlabel"])
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(rate + [req, 1]) * 1.2)
        ax.legend(fontsize=8, loc="lower right")
    return fig


def draw_packing(d: dict):
    from matplotlib.ticker import MaxNLocator

    fig, (ax,), _ = _new(d["title"])
    _bars(ax, d, [("truncated (--tail drop)", d["dropped_tokens"], "#c0504d"),
                  ("padded (--tail pad)", d["padding_tokens"], "#9bbb59")], d["ylabel"])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not any(d["dropped_tokens"] + d["padding_tokens"]):
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "no token truncated or padded", transform=ax.transAxes, ha="center", color="#555")
    ax.legend(fontsize=8)
    return fig


DRAW = {"token_share": draw_token_share, "doc_lengths": draw_doc_lengths, "sp_rates": draw_sp_rates,
        "packing": draw_packing}


def png(name: str, data: dict) -> bytes:
    """One figure as PNG bytes."""
    fig = DRAW[name](data)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def pngs(info: dict, stats: dict) -> dict[str, tuple[dict, bytes]]:
    """Every figure of a build: name -> (the data drawn, PNG bytes)."""
    _mpl()
    return {name: (d, png(name, d)) for name, d in figure_data(info, stats).items()}


def write_figures(info: dict, stats: dict, out_dir: str) -> list[str]:
    """Write ``<name>.png`` for every figure into ``out_dir``; returns the paths."""
    figs = pngs(info, stats)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise SptokError(f"{out_dir}: cannot create the figure directory ({e.strerror})") from None
    paths = []
    for name, (_, data) in figs.items():
        path = os.path.join(out_dir, f"{name}.png")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths

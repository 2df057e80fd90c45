"""Per-source statistics of a build: gathered from unit results, saved as stats.json, shown as a table; and
what a training run consumed per source next to what was requested and what the build holds (``stats --run``)."""

from __future__ import annotations

import json
import os
from collections import Counter

from .errors import SptokError
from .layout import ID_HASHES, STATS, load_build

# the break of a truncated .gz/.zst: counted with the rejected records in stats.json, but not a record
ARCHIVE_BREAK = "truncated_archive"
TOP_VALUES = 10   # most frequent metadata values of a source in stats.json (`sptok report` lists them)
HIST_BINS = 32   # document length histogram: bin b holds lengths in [2**(b-1), 2**b)
# counts summed over a source's units (see unit.py / pack.assemble / finalize)
COUNT_KEYS = ("docs", "text_chars", "text_tokens", "sp_inserted", "sp_masked", "delimiter_tokens", "eos_tokens",
              "sp_literals", "samples", "sample_tokens", "padding_tokens", "dropped_tokens")


def source_stats(results: list[dict], extra: dict) -> dict:
    """Sum the unit results of one source, plus what finalize added (``extra``: the samples it packed
    from the units' tails, the held-out documents a split moved, and their length histogram ``hist``)."""
    counts: Counter = Counter()
    rejected: Counter = Counter()
    hist = None
    examples: dict = {}
    for r in results:
        counts.update(r["counts"])
        rejected.update(r["rejected"])
        for k, v in r["examples"].items():
            examples.setdefault(k, v)
        hist = r["hist"] if hist is None else [a + b for a, b in zip(hist, r["hist"])]
    extra = dict(extra)
    more = extra.pop("hist", None)
    if more is not None:
        hist = more if hist is None else [a + b for a, b in zip(hist, more)]
    counts.update(extra)
    out = {k: int(counts.get(k, 0)) for k in COUNT_KEYS}
    out["rejected"] = dict(sorted(rejected.items()))
    out["records"] = out["docs"] + skipped_records(rejected)
    out["reject_examples"] = dict(sorted(examples.items()))
    out["doc_length_hist"] = {"bin_edges": "bin b counts documents of [2**(b-1), 2**b) text tokens; bin 0 is empty",
                              "counts": hist or []}
    return out


def skipped_records(rejected: dict) -> int:
    """The records among ``rejected`` (a ``stats.json`` count by reason): all but the archive breaks."""
    return sum(v for k, v in rejected.items() if k != ARCHIVE_BREAK)


def duplicate_ids(unit_dirs: list[str]) -> int:
    """How many documents of a source repeat an id an earlier one had (from the units' sorted key hashes):
    each is still built as its own document, so the count is reported rather than silently accepted."""
    import numpy as np

    parts = [np.load(p) for p in (os.path.join(d, ID_HASHES) for d in unit_dirs) if os.path.exists(p)]
    if not parts:
        return 0
    keys = np.concatenate(parts)
    return int(len(keys) - len(np.unique(keys)))


def metadata_stats(spec: dict, counts: dict, results: list[dict], extra: dict, unit_dirs: list[str] = ()) -> dict:
    """stats.json's ``metadata`` of one source: its documents with metadata and without (no field, an empty
    value, or not drawn by --metadata-prob), its metadata tokens and their share of the source's tokens, and
    from the units (absent in a validation split) the distinct values and the most frequent ones.

    ``distinct`` is exact up to 64-bit hash collisions (the units' value hashes, like the duplicate-id count).
    ``top`` sums each unit's TOP_VALUES most frequent values: a value's count is exact when it is among the
    top of every unit holding it (always, where a unit holds at most that many distinct values); both count
    the documents of both splits."""
    import numpy as np

    from .build.metadata import META_KEYS
    from .layout import META_HASHES

    n: Counter = Counter()
    for r in results:
        n.update({k: r["counts"].get(k, 0) for k in META_KEYS})
    n.update({k: extra.get(k, 0) for k in META_KEYS})
    out = {"field": spec["field"], "form": spec["form"], "docs": int(n["meta_docs"]), "tokens": int(n["meta_tokens"]),
           "share": n["meta_tokens"] / max(1, real_tokens(counts)), "missing": int(n["meta_missing"]),
           "empty": int(n["meta_empty"]), "undrawn": int(n["meta_undrawn"])}
    if results:
        parts = [np.load(p) for p in (os.path.join(d, META_HASHES) for d in unit_dirs) if os.path.exists(p)]
        out["distinct"] = int(len(np.unique(np.concatenate(parts)))) if parts else 0
        top: Counter = Counter()
        for r in results:
            top.update(dict(map(tuple, r.get("meta_values", []))))
        out["top"] = [[v, int(c)] for v, c in sorted(top.items(), key=lambda vc: (-vc[1], vc[0]))[:TOP_VALUES]]
    return out


def totals(per_source: dict) -> dict:
    tot: Counter = Counter()
    rej: Counter = Counter()
    for s in per_source.values():
        tot.update({k: s[k] for k in COUNT_KEYS + ("records",)})
        rej.update(s["rejected"])
    out = {k: int(v) for k, v in tot.items()}
    out["rejected"] = dict(sorted(rej.items()))
    return out


def load_stats(out: str) -> tuple[dict, dict]:
    """(sptok.json, stats.json) of a complete build, or a clear error."""
    info = load_build(out)
    path = os.path.join(out, STATS)
    try:
        with open(path) as f:
            stats = json.load(f)
    except (OSError, ValueError) as e:
        raise SptokError(f"{path}: cannot read the build's statistics ({e})") from None
    _check_stats(path, stats, [e["source"] for e in info["sp_table"]])
    return info, stats


def _check_stats(path: str, stats, sources: list[str]) -> None:
    """stats.json as its schema says, with a record for every source of the build: an edited or foreign one is
    named in one line, not a KeyError in the table."""
    import jsonschema

    from .build.manifest import schema_path

    schema = json.loads(schema_path("stats.schema.json").read_text())
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(stats))
    if error is not None:
        key = ".".join(map(str, error.absolute_path)) or "(top level)"
        raise SptokError(f"{path}: not the statistics sptok writes ({key}: {' '.join(error.message.split())[:200]})")
    missing = [n for n in sources if n not in stats["sources"]]
    if missing:
        raise SptokError(f"{path}: no statistics of source {missing[0]!r}, a source of the build")


def real_tokens(counts: dict) -> int:
    """The tokens of a source's (or the totals') samples that are documents (text, SPs, delimiters, EOS):
    padding (--tail pad) is not data, so it counts in no "tokens" column or share."""
    return counts["sample_tokens"] - counts["padding_tokens"]


def table_rows(info: dict, stats: dict) -> list[dict]:
    total_tokens = max(1, real_tokens(stats["totals"]))
    sps = {e["source"]: e["sp"] for e in info["sp_table"]}
    rows = []
    for name in (e["source"] for e in info["sp_table"]):   # manifest order
        s = stats["sources"][name]
        rows.append({
            "source": name, "sp": sps.get(name, ""), "docs": s["docs"],
            "skipped": skipped_records(s["rejected"]), "archive_breaks": s["rejected"].get(ARCHIVE_BREAK, 0),
            "tokens": real_tokens(s), "share": real_tokens(s) / total_tokens,
            "samples": s["samples"], "sp_inserted": s["sp_inserted"], "sp_masked": s["sp_masked"],
            "skip_reasons": s["rejected"],
        })
    return rows


def format_table(info: dict, stats: dict) -> str:
    rows = table_rows(info, stats)
    head = ["source", "SP", "docs", "skipped", "tokens", "share", "samples", "SPs inserted", "SPs masked"]
    body = [[r["source"], r["sp"], f"{r['docs']:,}", f"{r['skipped']:,}", f"{r['tokens']:,}",
             f"{100 * r['share']:.1f}%", f"{r['samples']:,}", f"{r['sp_inserted']:,}", f"{r['sp_masked']:,}"]
            for r in rows]
    t = stats["totals"]
    body.append(["total", "", f"{t['docs']:,}", f"{skipped_records(t['rejected']):,}", f"{real_tokens(t):,}",
                 "100.0%", f"{t['samples']:,}", f"{t['sp_inserted']:,}", f"{t['sp_masked']:,}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    right = {2, 3, 4, 5, 6, 7, 8}

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body[:-1]]
    lines += [line(["-" * w for w in widths]), line(body[-1])]
    skipped = [(r["source"], r["skip_reasons"]) for r in rows if r["skip_reasons"]]
    if skipped:
        lines.append("")
        lines.append("skipped records (see rejects/<source>.jsonl.zst):")
        for name, reasons in skipped:
            records = ", ".join(f"{k} {v:,}" for k, v in reasons.items() if k != ARCHIVE_BREAK)
            breaks = reasons.get(ARCHIVE_BREAK, 0)
            lines.append(f"  {name}: " + "; ".join(filter(None, [records, breaks and (
                f"archive breaks {breaks:,} ({ARCHIVE_BREAK}: not records; the text before each break is kept)")])))
            for k, ex in stats["sources"][name]["reject_examples"].items():
                lines.append(f"    first {k}: {ex}")
    dups = {n: s["duplicate_ids"] for n, s in stats["sources"].items() if s.get("duplicate_ids")}
    if dups:
        lines.append("")
        lines.append("duplicate document ids (each document was still built): "
                     + ", ".join(f"{n} {v:,}" for n, v in dups.items()))
    meta = {n: stats["sources"][n]["metadata"] for n in (e["source"] for e in info["sp_table"])
            if stats["sources"][n].get("metadata")}
    if meta:
        lines.append("")
        lines.append("metadata (each document's own, before its text):")
        for n, m in meta.items():
            distinct = f"; {m['distinct']:,} distinct value{'s' * (m['distinct'] != 1)}" if "distinct" in m else ""
            top = f", the most frequent (documents with it): {printable_values(m['top'][:3])}" if m.get("top") else ""
            lines.append(f"  {n}: {m['field']}:{m['form']} on {m['docs']:,} documents, {m['tokens']:,} tokens "
                         f"({100 * m['share']:.1f}%); without: {m['missing']:,} no field, {m['empty']:,} empty, "
                         f"{m['undrawn']:,} not drawn{distinct}{top}")
    h = info.get("holdout")
    if h:
        rule = f"{100 * h['fraction']:g}% of each source" if "fraction" in h else \
            f"{h['docs_per_source']:,} documents of each source"
        lines.append("")
        lines.append(f"validation split: {sum(h['docs'].values()):,} documents ({rule}) held out of these samples, "
                     f"in {h['dir']}/ (" + ", ".join(f"{e['source']} {h['docs'][e['source']]:,}"
                                                     for e in info["sp_table"]) + ")")
    if info.get("split"):
        lines.append("")
        lines.append(f"this is the {info['split']} split of build {info['parent'][:12]} (the directory above)")
    if t.get("sp_literals"):
        lines.append("")
        lines.append(f"note: {t['sp_literals']:,} literal SP/delimiter strings found in document text were "
                     f"tokenized as ordinary text (never as SP ids)")
    return "\n".join(lines)


def printable_values(top: list) -> str:
    """`docs.python.org` (236), ... with control characters of a corpus value escaped."""
    return ", ".join(f"{ascii(v)[1:-1] if not v.isprintable() else v} ({c:,})" for v, c in top)


# ----------------------------------------------------- stats --run: what a training run consumed, per source

def run_accounting(info: dict, stats: dict, logdir: str) -> list[dict]:
    """Rows per source: requested share, delivered samples / tokens and their shares, the build's tokens; a run
    with ``data.phases`` has them per phase (each row names its ``phase``)."""
    try:
        return _run_rows(info, stats, logdir)
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
        why = e if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {e}"   # a record lacks a key
        raise SptokError(f"--run {logdir}: not a training log of sptok pretrain (run.json + metrics.jsonl): "
                         f"{why}") from None


def _run_rows(info: dict, stats: dict, logdir: str) -> list[dict]:
    with open(os.path.join(logdir, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(logdir, "metrics.jsonl")) as f:
        trained = [r for r in map(json.loads, filter(str.strip, f)) if r.get("split") != "validation"]
    if not trained:
        raise SptokError(f"--run {logdir}: metrics.jsonl holds no training record yet (a run writes one every "
                         f"log.every steps)")
    last = trained[-1]
    if run["fingerprint"] != info["fingerprint"]:
        raise SptokError(f"--run {logdir}: that run trained on build {run['fingerprint'][:12]}, not on this one "
                         f"({info['fingerprint'][:12]})")
    if not run.get("phases"):
        return _accounting_rows(run["requested"], run["sources"], stats, last["delivered_samples"],
                                last["delivered_tokens"], last["step"])
    rows = []
    for p in run["phases"]:
        i = p["phase"]
        rows += [dict(r, phase=i, start_step=p["start_step"], end_step=p["end_step"])
                 for r in _accounting_rows(p["requested"], run["sources"], stats,
                                           last["delivered_samples_by_phase"][i],
                                           last["delivered_tokens_by_phase"][i], last["step"])]
    return rows


def _accounting_rows(req: dict, sources: list[str], stats: dict, samples: list, tokens: list, step: int) -> list:
    props = {n: r.get("proportion") for n, r in req.items()}
    if any(v is None for v in props.values()):   # natural sizes or repeats: the build's share times the repeat
        total = sum(stats["sources"][n]["samples"] * req[n].get("repeat", 1.0) for n in sources)
        props = {n: stats["sources"][n]["samples"] * req[n].get("repeat", 1.0) / total for n in sources}
    ns, nt = max(1.0, sum(samples)), max(1.0, sum(tokens))
    return [{"source": n, "requested": props[n], "delivered_samples": int(samples[i]),
             "delivered_share": samples[i] / ns, "delivered_tokens": int(tokens[i]), "token_share": tokens[i] / nt,
             "built_tokens": stats["sources"][n]["sample_tokens"], "step": step}
            for i, n in enumerate(sources)]


def format_accounting(rows: list[dict]) -> str:
    if rows and "phase" in rows[0]:
        phases = sorted({r["phase"] for r in rows})
        return "\n\n".join(_format_table([r for r in rows if r["phase"] == i],
                                          f"phase {i} (steps {p['start_step'] + 1}-{p['end_step']}): delivered by "
                                          f"step {p['step']} (all ranks):")
                            for i in phases for p in [next(r for r in rows if r["phase"] == i)])
    step = rows[0]["step"] if rows else 0
    return _format_table(rows, f"delivered to the model by step {step} (all ranks):")


def _format_table(rows: list[dict], title: str) -> str:
    head = ["source", "requested", "delivered", "samples", "tokens", "token share", "built tokens"]
    body = [[r["source"], f"{100 * r['requested']:.1f}%", f"{100 * r['delivered_share']:.1f}%",
             f"{r['delivered_samples']:,}", f"{r['delivered_tokens']:,}", f"{100 * r['token_share']:.1f}%",
             f"{r['built_tokens']:,}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(b) for b in body])

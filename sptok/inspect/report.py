"""One self-contained HTML page about a build: identity, per-source table, figures, skipped records and
decoded samples. Figures are inlined as data URIs and there is no script or external resource, so the file
can be mailed, attached to an experiment log or opened offline. All corpus text is escaped, control and
invisible format characters (bidi overrides...) written as visible escapes.
"""

from __future__ import annotations

import base64
import json
import os
from html import escape

from ..errors import SptokError
from ..layout import STATS, read_json
from ..stats import load_stats, real_tokens, table_rows
from .figures import figure_data
from .show import SampleReader, SampleView, pick, printable

LISTED_FILES = 3   # input files named per source; the rest are counted (20,000 names fill no table cell usefully)

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;vertical-align:top}
th{background:#f4f5f7;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:600;background:#fafafa}code,pre{font-family:ui-monospace,monospace;font-size:12.5px}
figure{margin:1em 0;display:inline-block;width:49%;vertical-align:top}figure img{width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555}.note{color:#666}
.sample{border:1px solid #ccd;border-radius:4px;margin:1em 0}.sample>.head{background:#eef1f7;padding:.3em .6em}
.doc-head{color:#345;font-size:12px;padding:.2em .6em;border-top:1px dashed #ccd}
pre.doc{white-space:pre-wrap;word-break:break-word;margin:0;padding:.3em .6em}
.sp{background:#d9f2d9;color:#175c17;font-weight:700}.msp{background:#b0287a;color:#fff;font-weight:700}
.delim{background:#d8eef5;color:#14606e}.eos{color:#a07400;background:#fff4d6}.pad{color:#888}
.meta{background:#efe3f7;color:#5b2a86}
"""


def _text(s) -> str:
    """HTML for text that may come from the corpus: escaped, its invisible characters shown as escapes."""
    return escape(printable(str(s)))


def _table(head: list[str] | None, rows: list[list], numeric: set[int] = frozenset(), total: list | None = None,
           tid: str = "") -> str:
    def tr(cells, cls=""):
        tds = "".join(f'<td{" class=n" if i in numeric else ""}>{_text(c)}</td>' for i, c in enumerate(cells))
        return f"<tr{cls}>{tds}</tr>"
    body = "".join(tr(r) for r in rows) + (tr(total, ' class="total"') if total else "")
    top = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>" if head else ""
    return f'<table{f" id={tid}" if tid else ""}>{top}{body}</table>'


def identity(out: str, info: dict) -> str:
    """The build's identity from sptok.json: what was built, from what, how, with which tokenizer."""
    tok = info["tokenizer"]
    size = sum(int(i[1]) for i in info.get("inputs", []) if isinstance(i, (list, tuple)) and len(i) > 1)
    facts = [("directory", os.path.abspath(out)), ("fingerprint", info["fingerprint"]),
             ("sptok version", info.get("sptok_version", "?")), ("format", info["format"]),
             ("manifest", info["manifest"].get("path", "")),
             ("inputs", f"{len(info.get('inputs', []))} files, {size:,} bytes"), ("work units", info.get("units", "")),
             ("tokenizer", f"{tok.get('base', '')} (vocabulary {tok.get('vocab_size', '?'):,}, "
                           f"sha256 {tok.get('sha256', '')[:16]}…)"),
             ("special tokens added", " ".join(tok.get("added_specials", []))),
             ("delimiter", f"{info['delimiter']['text']!r} ids {info['delimiter']['ids']} "
                           f"({'special token' if info['delimiter']['special'] else 'plain text'})"),
             ("end of document", f"{info['eos']['token']} (id {info['eos']['id']})"),
             ("padding", f"{info['pad'].get('token')} (id {info['pad'].get('id')})"),
             ("input_ids dtype", info.get("input_ids_dtype", ""))]
    sources = [[s["name"], e["sp"], e["token_id"], s.get("weight", 1.0), s.get("format", ""), s.get("text_field", ""),
                s.get("id_field") or "", _files(s)]
               for s, e in zip(sorted(info["manifest"]["sources"], key=lambda s: s["source_id"]),
                               sorted(info["sp_table"], key=lambda e: e["source_id"]))]
    opts = sorted(info["options"].items())
    return ("<h2>Build</h2>" + _table(None, [[k, v] for k, v in facts], tid="build")
            + "<h3>Manifest sources</h3>"
            + _table(["source", "SP", "SP id", "weight", "format", "text field", "id field", "files"], sources, {2, 3})
            + "<h3>Options</h3>" + _table(["option", "value"], [[k, json.dumps(v)] for k, v in opts]))


def _files(src: dict) -> str:
    """A source's input files for a table cell: all of them when few, else their count and the first few."""
    files = src.get("files", src.get("paths", []))
    if len(files) <= LISTED_FILES:
        return ", ".join(files)
    return (f"{len(files):,} files matched by {', '.join(src.get('paths', []))}: "
            f"{', '.join(files[:LISTED_FILES])}, …")


def source_table(info: dict, stats: dict) -> str:
    rows = table_rows(info, stats)
    t = stats["totals"]
    per = stats["sources"]
    body = [[r["source"], r["sp"]] + [f"{x:,}" for x in (r["docs"], r["skipped"], r["tokens"])]
            + [f"{100 * r['share']:.1f}%"] + [f"{x:,}" for x in (r["samples"], r["sp_inserted"], r["sp_masked"],
                                                                 per[r["source"]]["padding_tokens"],
                                                                 per[r["source"]]["dropped_tokens"])]
            for r in rows]
    total = ["total", ""] + [f"{x:,}" for x in (t["docs"], sum(t["rejected"].values()), real_tokens(t))] \
        + ["100.0%"] + [f"{t[k]:,}" for k in ("samples", "sp_inserted", "sp_masked", "padding_tokens",
                                              "dropped_tokens")]
    head = ["source", "SP", "docs", "skipped", "tokens", "share", "samples", "SPs inserted", "SPs masked",
            "padded", "truncated"]
    note = (f'<p class="note">{t["sp_literals"]:,} literal SP/delimiter strings in document text were tokenized '
            f"as ordinary text (never as SP ids).</p>" if t.get("sp_literals") else "")
    return "<h2>Sources</h2>" + _table(head, body, set(range(2, 11)), total, tid="sources") + note


def figures_html(info: dict, stats: dict) -> str:
    try:
        from .plot import pngs
        figs = pngs(info, stats)
    except SptokError as e:
        return f'<h2>Figures</h2><p class="note">No figures: {escape(e.message)}</p>'
    parts = []
    for name, (d, data) in figs.items():
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f'<figure id="fig-{name}"><img src="{src}" alt="{escape(d["title"])}">'
                     f"<figcaption>{escape(CAPTIONS[name])}</figcaption></figure>")
    return "<h2>Figures</h2>" + "".join(parts)


CAPTIONS = {
    "token_share": "Grey: the share of tokens the manifest weights ask for when the build is read with its "
                   "weights; blue: the share each source holds in the build (labels: its tokens).",
    "doc_lengths": "Share of each source's documents per length bin (text tokens, SPs and EOS excluded); bin "
                   "edges are powers of two.",
    "sp_rates": "Left: documents that carry their SP; right: inserted SPs flagged for masked source "
                "prediction. Dashed: the --insert-prob and --msp-prob the build asked for.",
    "packing": "Tokens cut off (--tail drop) or [PAD] tokens added (--tail pad) to each source's last sample.",
}


def skipped_html(stats: dict) -> str:
    rows = []
    for name, s in stats["sources"].items():
        for reason, count in s["rejected"].items():
            ex = s["reject_examples"].get(reason, "")
            ex = ex if isinstance(ex, str) else json.dumps(ex, ensure_ascii=False)
            rows.append([name, reason, f"{count:,}", ex[:300] + ("…" if len(ex) > 300 else "")])
    if not rows:
        return "<h2>Skipped records</h2><p>No record was skipped.</p>"
    return ("<h2>Skipped records</h2><p>Every skipped record is kept as found in "
            "<code>rejects/&lt;source&gt;.jsonl.zst</code>.</p>"
            + _table(["source", "reason", "records", "first example"], rows, {2}))


def sample_html(v: SampleView) -> str:
    """One decoded sample: SPs, masked SPs, delimiters and EOS as marked spans, one block per document."""
    parts = [f'<div class="sample"><div class="head"><b>{escape(v.source)}</b> sample {v.index:,} of {v.of:,} '
             f"(build index {v.global_index:,}) · SP <code>{escape(v.sp)}</code> · {v.length} tokens · "
             f"{len(v.segments)} document segment{'s' if len(v.segments) != 1 else ''}</div>"]
    for i, g in enumerate(v.segments, 1):
        notes = ("; continued from the previous sample" if g.continued else "") + \
                ("; cut: continues in another sample" if g.cut else "")
        parts.append(f'<div class="doc-head">doc {i} of {len(v.segments)} · tokens {g.start}–{g.end - 1}'
                     f"{notes}</div>")
        body = "".join(_text(p.text) if p.kind == "text" else
                       f'<span class="{p.kind}" title="{_TITLES[p.kind]}">{_text(p.text)}</span>' for p in g.pieces)
        parts.append(f'<pre class="doc">{body}</pre>')
    if v.padding:
        parts.append(f'<pre class="doc"><span class="pad">[PAD] × {v.padding}</span></pre>')
    return "".join(parts) + "</div>"


_TITLES = {"sp": "SP", "msp": "SP masked for MSP", "delim": "delimiter", "eos": "end of document",
           "meta": "metadata"}


def metadata_html(stats: dict) -> str:
    """Per source with metadata: its documents with and without, its tokens' share, and its most frequent
    values (stats.json's ``metadata``: ``stats.metadata_stats`` says what is exact)."""
    per = {n: s["metadata"] for n, s in stats["sources"].items() if s.get("metadata")}
    if not per:
        return ""
    rows = [[n, f"{m['field']}:{m['form']}", f"{m['docs']:,}", f"{m['missing']:,}", f"{m['empty']:,}",
             f"{m['undrawn']:,}", f"{m['tokens']:,}", f"{100 * m['share']:.1f}%", f"{m.get('distinct', 0):,}",
             ", ".join(f"{v} ({c:,})" for v, c in m.get("top", []))] for n, m in per.items()]
    return ("<h2>Metadata</h2><p>Each document's own metadata, tokenized before its text (the "
            "<code>meta_spans</code> column); the most frequent values of each source, with their documents.</p>"
            + _table(["source", "field:form", "with", "no field", "empty", "not drawn", "tokens", "share",
                      "distinct values", "most frequent values"], rows, set(range(2, 9)), tid="metadata"))


def samples_html(out: str, per_source: int, seed: int) -> str:
    if per_source < 1:
        return ""
    reader = SampleReader(out)
    legend = ('<p>Legend: <span class="sp">SP</span> <span class="msp">SP masked for MSP</span> '
              '<span class="delim">delimiter</span> <span class="eos">end of document</span></p>')
    parts = ["<h2>Samples</h2>", legend]
    for name in reader.build.sources:
        parts.append(f"<h3>{escape(name)}</h3>")
        chosen = pick(reader.counts, per_source, seed, [name]) if reader.counts[name] else []
        parts += [sample_html(reader.view(s, i)) for s, i in chosen] or ['<p class="note">no samples</p>']
    return "".join(parts)


def validation_html(out: str, info: dict) -> str:
    """The validation split (--holdout / --holdout-docs), per source, from its own stats.json."""
    h = info.get("holdout")
    if not h:
        return ""
    path = os.path.join(out, h["dir"], STATS)
    try:
        per = read_json(path)["sources"]
    except (OSError, ValueError, KeyError) as e:
        raise SptokError(f"{path}: cannot read the validation split's statistics ({e})") from None
    names = [e["source"] for e in info["sp_table"]]
    rows = [[n] + [f"{x:,}" for x in (per[n]["docs"], real_tokens(per[n]), per[n]["samples"])] for n in names]
    total = ["total"] + [f"{sum(x):,}" for x in zip(*[(per[n]["docs"], real_tokens(per[n]), per[n]["samples"])
                                                      for n in names])]
    rule = f"{100 * h['fraction']:g}% of each source" if "fraction" in h else \
        f"{h['docs_per_source']:,} documents of each source"
    return ("<h2>Validation split</h2>"
            f'<p class="note">{rule} held out of the training samples, in <code>{_text(h["dir"])}/</code> '
            f"(fingerprint <code>{h['fingerprint'][:12]}</code>).</p>"
            + _table(["source", "docs", "tokens", "samples"], rows, {1, 2, 3}, total, tid="validation"))


def mixture_html(path: str, info: dict) -> str:
    """The result of ``sptok mix`` (its OUT directory or its mixture.json): weights, predicted losses, how
    well the fit ranked proxies it had not seen, and, when a confirmation was run, the measured losses.
    Refused unless the search ran on this build (the fingerprint in its plan.json)."""
    d = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        with open(os.path.join(d, "mixture.json")) as f:
            mix = json.load(f)
        searched = read_json(os.path.join(d, "plan.json"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SptokError(f"--mixture {path}: not the --out directory of a finished `sptok mix` (mixture.json and "
                         f"plan.json: {e})") from None
    if searched != info["fingerprint"]:
        raise SptokError(f"--mixture {path}: that search ran on build {str(searched)[:12]}, not on this one "
                         f"({info['fingerprint'][:12]})")
    try:
        return _mixture_parts(d, mix)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:   # an edited or cut result
        raise SptokError(f"--mixture {path}: mixture.json or confirmation.json is not what `sptok mix` writes "
                         f"({type(e).__name__}: {e})") from None


def _mixture_parts(d: str, mix: dict) -> str:
    names, pred = mix["sources"], mix["predicted"]
    kinds = [k for k in ("proposed", "natural", "uniform") if k in pred]
    rows = [[n] + [f"{pred[k]['weights'][n]:.3f}" for k in kinds] + [f"{pred[k]['loss_by_source'][n]:.4f}"
                                                                      for k in kinds] for n in names]
    total = ["objective", *[""] * len(kinds), *[f"{pred[k]['objective']:.4f}" for k in kinds]]
    head = ["source"] + [f"{k} share" for k in kinds] + [f"{k} predicted loss" for k in kinds]
    check = mix["left_out"]
    verdict = (escape(check.get("skipped", "")) if check["spearman"] is None else
               f'rank correlation of predicted and actual objective on the {len(check["proxies"])} proxies left out '
               f'of the fit: {check["spearman"]:.2f}')
    parts = ["<h2>Mixture search</h2>",
             f'<p class="note">{len(mix["proxies"])} proxy runs; {escape(mix["regression"])}; {verdict}.</p>',
             _table(head, rows, set(range(1, len(head))), total, tid="mixture")]
    confirm = os.path.join(d, "confirmation.json")
    if os.path.exists(confirm):
        with open(confirm) as f:
            runs = json.load(f)["runs"]
        rows = [[n] + [f"{runs[k]['loss_by_source'][n]:.4f}" for k in runs] for n in names]
        parts += ["<h3>Confirmation: trained from scratch, same token budget</h3>",
                  _table(["source"] + [f"{k} actual loss" for k in runs], rows, set(range(1, len(runs) + 1)),
                         ["mean"] + [f"{runs[k]['mean']:.4f}" for k in runs], tid="confirmation")]
    png = os.path.join(d, "predicted_vs_actual.png")
    if os.path.exists(png):
        with open(png, "rb") as f:
            src = "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
        parts.append(f'<figure id="fig-mixture"><img src="{src}" alt="predicted against actual loss">'
                     f"<figcaption>Proxies left out of the fit: the loss the fit predicted for them against the "
                     f"loss they reached.</figcaption></figure>")
    return "".join(parts)


def render_report(out: str, samples: int = 2, seed: int = 0, mixture: str | None = None) -> str:
    """The report of the build in ``out`` as one HTML string (with the result of ``sptok mix`` if given)."""
    info, stats = load_stats(out)
    figure_data(info, stats)   # fail early on a stats.json that does not match the build
    title = f"sptok build {os.path.basename(os.path.abspath(out))}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>'
            f"<h1>{escape(title)}</h1><p class=note>{len(info['sp_table'])} sources · "
            f"{real_tokens(stats['totals']):,} tokens · {stats['totals']['samples']:,} samples of "
            f"{info['options']['seq_len']} tokens · fingerprint <code>{info['fingerprint'][:12]}</code></p>"
            + identity(out, info) + source_table(info, stats) + metadata_html(stats) + validation_html(out, info)
            + (mixture_html(mixture, info) if mixture else "")
            + figures_html(info, stats) + skipped_html(stats) + samples_html(out, samples, seed)
            + f'<p class="note">Written by sptok {escape(info.get("sptok_version", ""))}.</p></body></html>\n')


def write_report(out: str, path: str, samples: int = 2, seed: int = 0, mixture: str | None = None) -> str:
    page = render_report(out, samples, seed, mixture)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as e:
        raise SptokError(f"{path}: cannot write the report ({e.strerror})") from None
    return path

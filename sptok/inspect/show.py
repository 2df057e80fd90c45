"""Decoded samples of a build with SPs, delimiters, EOS and document boundaries marked.

The marks come from the shard metadata (``sp_positions``, ``msp_mask``, ``doc_offsets``, ``meta_spans``), not from what
a decoder would make of the ids, so what ``sptok show`` prints is what the collators will see. Text is
decoded run by run between marks with the build's own tokenizer.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..build_info import BuildInfo
from ..errors import SptokError
from ..shards import ShardReader, as_arrays
from ..sp_layout import SPLayout

TEXT, SP, MSP, DELIM, EOS, META = range(6)
KINDS = ("text", "sp", "msp", "delim", "eos", "meta")


@dataclass
class Piece:
    kind: str          # text | sp | msp | delim | eos | meta
    start: int         # position of its first token in the sample
    ids: list[int]
    text: str


@dataclass
class Segment:
    start: int
    end: int
    doc_key: int
    continued: bool    # the document began in the previous sample
    cut: bool          # the document goes on in another sample
    pieces: list[Piece] = field(default_factory=list)


@dataclass
class SampleView:
    source: str
    sp: str
    index: int         # within its source
    of: int            # samples in the source
    global_index: int  # in the whole build, sources in manifest order
    length: int
    padding: int       # trailing [PAD] tokens (--tail pad)
    segments: list[Segment]
    delimiter_special: bool = True

    def to_json(self, ids: bool = False) -> dict:
        segs = [{"start": g.start, "end": g.end, "doc_key": g.doc_key, "continued": g.continued, "cut": g.cut,
                 "pieces": [dict({"kind": p.kind, "start": p.start, "end": p.start + len(p.ids), "text": p.text},
                                 **({"ids": p.ids} if ids else {})) for p in g.pieces]} for g in self.segments]
        return {"source": self.source, "sp": self.sp, "index": self.index, "of": self.of,
                "global_index": self.global_index, "length": self.length, "padding": self.padding,
                "segments": segs}


class SampleReader:
    """Random access to a build's samples by (source, index), with the core's own shard reader (no streaming,
    no ``datasets``: ``show`` and ``report`` work in a core install)."""

    def __init__(self, out: str):
        from tokenizers import Tokenizer

        self.build = BuildInfo.load(out)          # clear errors for missing / incomplete / foreign dirs
        self.out = out
        try:
            self.counts = {n: int(self.build.raw["counts"][n]["samples"]) for n in self.build.sources}
        except (KeyError, TypeError, ValueError) as e:   # an edited sptok.json
            raise SptokError(f"{out}/sptok.json: no sample count of every source ({type(e).__name__}: {e}), as a "
                             f"build writes it: the file was edited") from None
        self.offsets = dict(zip(self.build.sources, np.cumsum([0] + list(self.counts.values()))[:-1].tolist()))
        self.shards = {n: ShardReader(os.path.join(out, n), self.build.format) for n in self.build.sources}
        for n, r in self.shards.items():
            if len(r) != self.counts[n]:
                raise SptokError(f"{out}/{n}: its shard index holds {len(r):,} samples, sptok.json says "
                                 f"{self.counts[n]:,}; run `sptok verify {out}`")
        self.tok = Tokenizer.from_file(f"{self.build.tokenizer_dir}/tokenizer.json")
        self.sp_of = dict(zip(self.build.sp_ids.tolist(), self.build.sps))

    def get(self, source: str, index: int) -> dict:
        try:
            return as_arrays(self.shards[source][index])
        except Exception as e:   # a damaged build: missing or truncated shards
            raise SptokError(f"{self.out}: cannot read sample {index} of {source} ({_one_line(e)}); run "
                             f"`sptok verify {self.out}`") from None

    def view(self, source: str, index: int) -> SampleView:
        s = self.get(source, index)
        prev = self.get(source, index - 1)["doc_keys"][-1] if index > 0 else None
        return layout(s, self, source, index, prev)


def _one_line(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def pick(counts: dict[str, int], n: int, seed: int, sources: list[str] | None = None) -> list[tuple[str, int]]:
    """n distinct samples drawn uniformly from the chosen sources, by (source, index), in build order."""
    names = list(sources) if sources else list(counts)
    for s in names:
        if s not in counts:
            raise SptokError(f"--source {s!r}: the build has no such source (sources: {', '.join(counts)})")
    if n < 1:
        raise SptokError(f"--n: need at least 1 sample, got {n}")
    if seed < 0:
        raise SptokError(f"--seed: must be 0 or more, got {seed}")
    sizes = np.array([counts[s] for s in names], np.int64)
    bounds = np.cumsum(sizes)
    chosen = np.sort(np.random.default_rng(seed).choice(int(bounds[-1]), size=min(n, int(bounds[-1])),
                                                        replace=False))
    which = np.searchsorted(bounds, chosen, side="right")
    return [(names[w], int(g - (bounds[w] - sizes[w]))) for g, w in zip(chosen, which)]


def mark_tokens(s: dict, lay: SPLayout, real: int) -> np.ndarray:
    """The kind of each token of sample ``s`` (TEXT, SP, MSP, DELIM, EOS, META), from its metadata and the SP
    layout; ``real``: the tokens before any padding."""
    ids, pos, starts = s["input_ids"], s["sp_positions"], s["doc_offsets"]
    kind = np.full(len(ids), TEXT, np.int8)
    for a, e in s.get("meta_spans", ()):
        kind[a:e] = META
    kind[lay.delimiter_positions(ids, pos, lay.is_post(s), real)] = DELIM
    kind[:real][lay.stray_delimiters(ids[:real])] = DELIM   # also the half of a pair cut off from its SP
    kind[pos] = np.where(s["msp_mask"], MSP, SP)
    last = np.append(starts[1:], real) - 1
    kind[last[(last >= starts) & (ids[np.maximum(last, 0)] == lay.eos_id)]] = EOS
    return kind


def layout(s: dict, reader: SampleReader, source: str, index: int, prev_key) -> SampleView:
    """Cut one sample into document segments and marked pieces (SP, masked SP, delimiter, EOS, text)."""
    b = reader.build
    ids, starts = s["input_ids"], s["doc_offsets"]
    n = len(ids)
    padding = 0
    if b.raw["options"].get("tail") == "pad" and b.pad_id is not None:
        padding = n - len(np.trim_zeros(ids != b.pad_id, "b"))
    real = n - padding
    kind = mark_tokens(s, b.layout, real)
    ends = np.append(starts[1:], real)
    segs = []
    keys = s["doc_keys"].tolist() if "doc_keys" in s else [0] * len(starts)
    for k, (a, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        seg = Segment(a, e, keys[k], continued=k == 0 and prev_key is not None and keys[0] == int(prev_key),
                      cut=bool(k == len(starts) - 1 and e > a and kind[e - 1] != EOS))
        i = a
        while i < e:
            j = i + 1
            if kind[i] in (TEXT, DELIM, META):
                while j < e and kind[j] == kind[i]:
                    j += 1
            run = ids[i:j].tolist()
            text = reader.sp_of.get(run[0], "") if kind[i] in (SP, MSP) else reader.tok.decode(
                run, skip_special_tokens=False)
            seg.pieces.append(Piece(KINDS[kind[i]], i, run, text))
            i = j
        segs.append(seg)
    return SampleView(source, reader.sp_of.get(int(b.sp_ids[b.sources.index(source)]), ""), index,
                      reader.counts[source], reader.offsets[source] + index, n, padding, segs,
                      b.delimiter_special)


# ------------------------------------------------------------------------------------------------ text

# C0/C1 controls but tab and newline; bidi overrides, embeddings and isolates, which reorder what follows
# ("\u202eevil\u202c" shows as "live"); zero-width and other invisible format characters; line separators
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u180e\u200b-\u200f"
                      "\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000e0000-\U000e007f]")
ANSI = {"sp": "1;32", "msp": "1;97;45", "delim": "36", "eos": "2;33", "meta": "35", "pad": "2", "head": "1;34",
        "doc": "34"}


def printable(text: str) -> str:
    """Document text with control and invisible format characters (ESC, CR, bidi overrides...) written as
    escapes, so a corpus can neither drive the terminal nor make text read as something else (``report`` too)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _mark(p: Piece, color: bool, delim_special: bool) -> str:
    if p.kind == "text":
        return printable(p.text)
    if color:
        return f"\x1b[{ANSI[p.kind]}m{printable(p.text)}\x1b[0m"
    if p.kind == "eos":
        return "[EOS]"
    label = p.text if p.kind not in ("delim", "meta") or delim_special else repr(p.text)
    if p.kind == "meta":
        label = repr(p.text)[1:-1]   # the template's newlines shown, not breaking the line
    return f"[{p.kind.upper()} {label}]"


def legend(color: bool, meta: bool = False) -> str:
    """What the marks mean; ``meta``: a build with metadata (its spans are marked too)."""
    if color:
        return "legend: " + " ".join(f"\x1b[{ANSI[k]}m{t}\x1b[0m" for k, t in
                                     (("sp", "SP"), ("msp", "masked SP (MSP)"), ("delim", "delimiter"),
                                      *((("meta", "metadata"),) if meta else ()),
                                      ("eos", "end of document"), ("pad", "padding"))) + "\n"
    return ("legend: [SP x] SP, [MSP x] SP masked for MSP, [DELIM x] delimiter, "
            + ("[META x] metadata, " if meta else "") + "[EOS] end of document\n")


def render(v: SampleView, k: int, total: int, color: bool = False, tok=None) -> str:
    """One sample as terminal text: a header, then each document segment under its own boundary line.

    With ``tok`` (the build's tokenizer), one row per token instead: position, id, decoded token."""
    paint = (lambda c, t: f"\x1b[{ANSI[c]}m{t}\x1b[0m") if color else (lambda c, t: t)
    nseg = f"{len(v.segments)} segment{'s' if len(v.segments) != 1 else ''}"
    out = [paint("head", f"=== sample {k}/{total}: {v.source} #{v.index} of {v.of} (build index {v.global_index}), "
                         f"SP {v.sp}, {v.length} tokens, {nseg} ===")]
    for i, g in enumerate(v.segments, 1):
        notes = (" (continued from the previous sample)" if g.continued else "") + \
                (" (cut: continues in another sample)" if g.cut else "")
        out.append(paint("doc", f"--- doc {i} of {len(v.segments)}, tokens {g.start}-{g.end - 1}{notes} ---"))
        if tok is None:
            out.append("".join(_mark(p, color, v.delimiter_special) for p in g.pieces))
            continue
        for p in g.pieces:
            for j, t in enumerate(p.ids):
                label = (repr(tok.decode([t], skip_special_tokens=False)) if p.kind == "text"
                         else _mark(p, color, v.delimiter_special))
                out.append(f"{p.start + j:>6}  {t:>6}  {label}")
    if v.padding:
        out.append(paint("pad", f"[PAD x{v.padding}]"))
    return "\n".join(out) + "\n"


def show(out: str, sources: list[str] | None = None, n: int = 3,
         seed: int = 0) -> tuple[SampleReader, list[SampleView]]:
    """The reader and the views of ``n`` samples picked by ``seed`` (from ``sources``, else all)."""
    reader = SampleReader(out)
    return reader, [reader.view(s, i) for s, i in pick(reader.counts, n, seed, sources)]

"""`sptok label`: a model pre-trained with source prompts names the source of text it has never seen
(the `train` extra).

    from sptok.label import load_table, Scorer, run_label
    table = load_table("models/bert-msp")                # sptok.json (+ sptok_train.json) of an exported model
    scorer = Scorer(table, max_tokens=64)                 # the model, on GPU when there is one
    probs = scorer.probs(scorer.encode(["def f(): ..."]))  # (n, K): P(source) over table.sources

``run_label`` is the command: rows in (JSONL / Parquet / CSV), rows out with ``sp_pred``, ``sp_prob``,
``sp_topk`` and, with a mode, the fine-tuning input (``sp_input``); ``--eval`` scores the predictions against
a source field. Modules: ``table`` (what the model directory says), ``scoring`` (the forward passes), ``rows``
(reading and writing), ``modes`` (which SP goes where), ``evaluate`` (metrics, table, figure).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

import numpy as np

from ..build.compression import is_compressed_name
from ..errors import SptokError
from ..extras import require

require("train", "sptok.label")

from .evaluate import evaluate, format_report, write_eval  # noqa: E402 - after the check, which names the extra
from .modes import MODES, place, place_ids, random_sources  # noqa: E402
from .rows import FORMATS, Writer, format_of, parquet_rows, read_chunks  # noqa: E402
from .scoring import DEVICES, PRECISIONS, Scorer  # noqa: E402
from .table import SPTable, load_table, training_warning  # noqa: E402

__all__ = ["run_label", "load_table", "Scorer", "SPTable", "evaluate", "training_warning", "MODES", "FORMATS", "DEVICES",
           "PRECISIONS"]


def _values(chunk, name: str, what: str, required: bool = True) -> list:
    """The field ``name`` of every row of the chunk, checked to be text."""
    out = []
    for row, where in zip(chunk.rows, chunk.where):
        if name not in row:
            have = ", ".join(map(repr, list(row)[:12])) or "none"
            raise SptokError(f"{where}: no field {name!r} ({what}); the row's fields: {have}")
        v = row[name]
        if not isinstance(v, str):
            kind = "null" if v is None else type(v).__name__
            raise SptokError(f"{where}: field {name!r} ({what}) is {kind}, not text")
        out.append(v)
    return out


def run_label(model: str, input: str, out: str, *, text_field: str = "text", pair_field: str | None = None,
              pair_sep: str = "\n", source_field: str | None = None, mode: str | None = None, seed: int = 0,
              ids: bool = False, predict: bool = True, top_k: int = 5, batch_size: int = 32,
              max_tokens: int | None = None, device: str = "auto", precision: str = "fp32",
              input_format: str | None = None, do_eval: bool = False, eval_out: str | None = None,
              quiet: bool = False, log=None) -> dict:
    """Label ``input`` into ``out``; returns a summary (rows, seconds, predicted counts, eval, report, files).

    Per chunk of rows: predict the source (the model), choose each row's SP (``--mode``), place it."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))

    def warn(m):
        say(f"warning: {m}")

    in_fmt, out_fmt = _validate(input, out, mode, source_field, do_eval, predict, top_k, batch_size, input_format,
                                device, precision, seed)
    table = load_table(model)
    scorer = Scorer(table, device=device, precision=precision, max_tokens=max_tokens, load_model=predict)
    note = training_warning(table) if predict else None
    if note:
        warn(note)
    run = _Run(table, scorer, min(top_k, len(table.sources)), source_field, do_eval)
    writer = Writer(out, out_fmt)
    from tqdm import tqdm

    bar = tqdm(total=parquet_rows(input) if in_fmt == "parquet" else None, unit=" rows", disable=quiet,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0, desc="labelling")
    t0 = time.perf_counter()
    try:
        for chunk in read_chunks(input, in_fmt, max(8 * batch_size, 512)):
            texts = _values(chunk, text_field, "--text-field")
            pairs = _values(chunk, pair_field, "--pair-field") if pair_field else None
            new, text_ids, pred = {}, None, None
            if predict:
                text_ids, pred = run.predict([a + pair_sep + b for a, b in zip(texts, pairs)] if pairs else texts,
                                             batch_size, new)
            given = run.given(chunk) if source_field else None
            if mode:
                choice = _choose_sps(mode, chunk, given, pred, seed, table, source_field)
                new.update(_place(table, scorer, choice, texts, pairs, text_ids if not pairs else None, ids))
            if run.n == 0:
                clash = [f for f in new if f in (chunk.fields or chunk.rows[0])]
                if clash:
                    warn(f"the input already has field(s) {', '.join(clash)}: this run's values replace them")
            writer.write(chunk, new)
            run.n += len(chunk.rows)
            bar.update(len(chunk.rows))
        run.check(input)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return _summarize(run, model, input, out, mode, time.perf_counter() - t0, predict, eval_out, quiet, say, warn)


def _validate(input: str, out: str, mode, source_field, do_eval: bool, predict: bool, top_k: int, batch_size: int,
              input_format, device: str, precision: str, seed: int) -> tuple[str, str]:
    """Every check of the arguments that needs no file read; returns the input's and the output's formats."""
    for flag, value, allowed in (("--mode", mode, MODES + (None,)), ("--device", device, DEVICES),
                                 ("--precision", precision, PRECISIONS)):
        if value not in allowed:
            raise SptokError(f"{flag} {value!r}: expected one of {', '.join(a for a in allowed if a)}")
    if mode == "manual" and not source_field:
        raise SptokError("--mode manual needs --source-field: the field naming each row's source")
    if do_eval and not source_field:
        raise SptokError("--eval needs --source-field: the field naming each row's true source")
    if not predict and (mode == "auto" or do_eval or mode is None):
        raise SptokError("--no-predict skips the model, so it goes only with --mode manual, random or none "
                         "(and without --eval)")
    if top_k < 1 or batch_size < 1:
        raise SptokError("--top-k and --batch-size must be at least 1")
    if not 0 <= seed < 2**64:
        raise SptokError(f"--seed: must be an integer from 0 to 2**64 - 1 (draws mix it as a uint64), got {seed}")
    in_fmt = input_format or format_of(input)
    if in_fmt is None:
        raise SptokError(f"--input {input}: cannot tell the format from the extension; name it .jsonl, .parquet or "
                         f".csv, or pass --input-format {'|'.join(FORMATS)}")
    if is_compressed_name(out):
        raise SptokError(f"--out {out}: compressed output is not written; give a .jsonl, .parquet or .csv name")
    if os.path.abspath(out) == os.path.abspath(input):
        raise SptokError(f"--out {out} is the input file; write the labels to another file")
    return in_fmt, format_of(out) or in_fmt


class _Run:
    """What a labelling run gathers over the chunks: rows, predicted sources, and the rows to evaluate."""

    def __init__(self, table: SPTable, scorer: Scorer, k: int, source_field: str | None, do_eval: bool):
        self.table, self.scorer, self.k = table, scorer, k
        self.source_field, self.do_eval = source_field, do_eval
        self.n, self.predicted = 0, Counter()
        self.true, self.probs, self.unknown = [], [], Counter()
        self._P = None

    def predict(self, texts: list[str], batch_size: int, new: dict) -> tuple[list[list[int]], np.ndarray]:
        """The model's sources for ``texts``, added to ``new`` (sp_pred, sp_prob, sp_topk); returns the text
        ids and the predicted source ids."""
        sources = self.table.sources
        text_ids = self.scorer.encode(texts)
        P = self._P = self.scorer.probs(text_ids, batch_size)
        pred = P.argmax(1)
        top = np.argsort(-P, axis=1, kind="stable")[:, :self.k]
        new["sp_pred"] = [sources[j] for j in pred]
        new["sp_prob"] = [float(P[i, j]) for i, j in enumerate(pred)]
        new["sp_topk"] = [[{"source": sources[j], "prob": float(P[i, j])} for j in row] for i, row in enumerate(top)]
        self.predicted.update(new["sp_pred"])
        return text_ids, pred

    def given(self, chunk) -> list[int | None]:
        """The source id each row names in --source-field (None: one the model does not know); with --eval,
        the rows that name one are kept with their predictions."""
        field = self.source_field
        for row, where in zip(chunk.rows, chunk.where):
            if field not in row:
                raise SptokError(f"{where}: no field {field!r} (--source-field); the row's fields: "
                                 f"{', '.join(map(repr, list(row)[:12]))}")
        values = [row[field] for row in chunk.rows]
        given = [self.table.source_index(v) for v in values]
        if self.do_eval:
            for i, (g, v) in enumerate(zip(given, values)):
                if g is None:
                    self.unknown[str(v)] += 1
                else:
                    self.true.append(g)
                    self.probs.append(self._P[i])
        return given

    def check(self, input: str) -> None:
        if self.n == 0:
            raise SptokError(f"--input {input}: no rows to label")
        if self.do_eval and not self.true:
            raise SptokError(f"--eval: no row of {input} names one of the model's sources "
                             f"({', '.join(self.table.sources)}) in field {self.source_field!r}")


def _choose_sps(mode: str, chunk, given, pred, seed: int, table: SPTable, source_field) -> list[int | None]:
    """The source id whose SP each row gets (None: no SP), as --mode says."""
    if mode == "manual":
        bad = next((i for i, g in enumerate(given) if g is None), None)
        if bad is not None:
            raise SptokError(f"{chunk.where[bad]}: source {chunk.rows[bad].get(source_field)!r} "
                             f"(--source-field {source_field}) is not one of the model's sources: "
                             f"{', '.join(table.sources)} (or their SPs {' '.join(table.sps)})")
        return given
    if mode == "auto":
        return pred.tolist()
    if mode == "random":
        return random_sources(seed, chunk.start, len(chunk.rows), len(table.sources)).tolist()
    return [None] * len(chunk.rows)


def _place(table: SPTable, scorer: Scorer, choice: list, texts: list[str], pairs: list[str] | None,
           text_ids: list | None, ids: bool) -> dict[str, list]:
    """The fine-tuning input fields: sp_used, sp_input (+ sp_input_pair), and with ``ids`` their token ids
    (``text_ids``: the texts' ids when the model already encoded them)."""
    lay = table.layout
    new = {"sp_used": [None if c is None else table.sps[c] for c in choice]}
    placed = [place(lay, s, a, b) for s, a, b in zip(new["sp_used"], texts, pairs or [None] * len(texts))]
    new["sp_input"] = [p[0] for p in placed]
    if pairs:
        new["sp_input_pair"] = [p[1] for p in placed]
    if ids:
        a_ids = text_ids if text_ids is not None else scorer.encode(texts)
        b_ids = scorer.encode(pairs) if pairs else [None] * len(texts)
        placed_ids = [place_ids(lay, None if c is None else table.sp_ids[c], a, b)
                      for c, a, b in zip(choice, a_ids, b_ids)]
        new["sp_input_ids"] = [p[0] for p in placed_ids]
        if pairs:
            new["sp_input_pair_ids"] = [p[1] for p in placed_ids]
    return new


def _summarize(run: _Run, model: str, input: str, out: str, mode, seconds: float, predict: bool, eval_out,
               quiet: bool, say, warn) -> dict:
    """The summary line, and with --eval the metrics and their files."""
    table, n = run.table, run.n
    summary = {"rows": n, "out": out, "seconds": seconds, "predicted": dict(run.predicted), "mode": mode,
               "files": [out], "eval": None, "report": None}
    line = f"labelled {n:,} rows of {input} -> {out} in {seconds:.1f}s ({n / max(seconds, 1e-9):,.0f} rows/s)"
    if predict:
        line += "; predicted: " + ", ".join(f"{s} {run.predicted[s]:,}" for s in table.sources if run.predicted[s])
    if not quiet:
        say(line)
    if run.do_eval:
        if run.unknown:
            warn(f"{sum(run.unknown.values()):,} rows name a source the model does not know "
                 f"({', '.join(sorted(run.unknown)[:5])}): left out of the evaluation")
        ev = evaluate(table.sources, np.array(run.true), np.stack(run.probs), dict(run.unknown), top_k=run.k)
        ev.update(model=os.path.abspath(model), input=os.path.abspath(input), source_field=run.source_field,
                  max_tokens=run.scorer.max_tokens)
        summary["files"] += write_eval(ev, eval_out or (os.path.splitext(out)[0] + ".eval"), warn)
        summary["eval"], summary["report"] = ev, format_report(ev)
    return summary

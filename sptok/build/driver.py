"""`sptok build`: plan, run the units (in worker processes), finalize.

The output is a function of (manifest, options, tokenizer, seed) only: units are planned without regard
to the worker count, every SP decision is keyed by the document, and finalize reads committed units in
plan order. So 1 or 8 workers, a resumed run, and a partitioned run merged afterwards give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass


from .. import __version__
from ..errors import SptokError
from .. import layout
from . import outdir
from .expand import refuse_output_as_input
from .finalize import clear_outputs, finalize, fingerprint_of, unit_problem
from ..layout import FAILED, MARKER, PARTITION, WORK, write_json
from .manifest import Manifest, Unit, describe_sources, input_fingerprint, load_manifest, plan_units
from .options import BuildOptions
from ..sp import SPEntry
from .encoders import EncoderMismatch
from .tokenizer import (default_roles, encoding_problem, extend, find_eos, find_pad, literal_specials,
                        load_tokenizer, save_tokenizer_dir, sp_tokens)
from .runner import WorkerPool, choose_here, needs_workers, run_units, unmap_freed_blocks
from .unit import is_committed, unit_dir
from .writers import ids_dtype


@dataclass
class BuildResult:
    out: str
    info: dict | None          # sptok.json, when the build is complete
    committed: int
    total_units: int
    skipped: bool = False      # the directory already held this exact build
    seconds: float = 0.0


def run_build(manifest_path: str, out: str, flags: dict, overwrite: bool = False,
              partition: tuple[int, int] | None = None, log=print, remote: str | None = None) -> BuildResult:
    """Build ``manifest_path`` into ``out``. ``remote``: the remote --out that ``out`` stages, for the Ray tasks of
    ``--executor ray`` to upload their units' shards to (the driver uploads the rest once it finalized)."""
    t0 = time.time()
    manifest, opts = resolve_build(manifest_path, out, flags)
    if not opts.tokenizer:
        raise SptokError("no tokenizer: pass --tokenizer PATH (a tokenizer.json or a Hugging Face tokenizer "
                         "directory), set build.tokenizer in the manifest, or train one with "
                         "`sptok tokenizer train`")
    units = plan_units(manifest, opts.unit_size)
    return run_pooled(opts, lambda pool: _build(manifest, opts, out, overwrite, partition, log, pool, units), t0,
                      needs_workers(units), remote)


def resolve_build(manifest_path: str, out: str, flags: dict) -> tuple[Manifest, BuildOptions]:
    """The manifest and the options of a build into ``out``: flags over its ``build:`` values over the defaults."""
    unmap_freed_blocks()   # the probes read whole documents here too
    manifest = load_manifest(manifest_path)
    refuse_output_as_input(manifest, out)    # before --overwrite removes anything
    defaults = dict(manifest.build)
    if defaults.get("tokenizer"):
        defaults["tokenizer"] = os.path.join(manifest.root, defaults["tokenizer"])
    return manifest, BuildOptions.resolve(defaults, flags, {s.name: s.metadata for s in manifest.sources})


def run_pooled(opts: BuildOptions, work, t0: float, workers_needed: bool = True,
               remote: str | None = None) -> BuildResult:
    """``work(pool)``, the worker processes (None for one worker, or where ``workers_needed`` is false: no unit
    but one can hold a record) started while it plans and closed after."""
    pool = _start_pool(opts, workers_needed, remote)   # starts while we plan
    try:
        res = work(pool)
    except BaseException:
        if pool is not None:
            pool.close(kill=True)
        raise
    if pool is not None:
        pool.close()
    res.seconds = time.time() - t0
    return res


def _start_pool(opts: BuildOptions, needed: bool = True, remote: str | None = None):
    """Where the units run: worker processes here (none for one worker, or none ``needed``), or a Ray cluster
    (whose tasks upload their units to ``remote``, if given)."""
    if opts.executor == "ray":
        from .ray_executor import RayPool

        return RayPool(opts.ray_address, opts.workers, remote)
    return WorkerPool(opts.workers) if opts.workers > 1 and needed else None


def _build(manifest: Manifest, opts: BuildOptions, out: str, overwrite: bool, partition, log,
           pool: WorkerPool | None, units: list[Unit]) -> BuildResult:
    plan, tok = make_plan(manifest, opts, units)
    _refuse_foreign(out)
    if not overwrite and _holds(out, plan) and not outdir.work_left(out):   # nothing to write, so no lock
        return _already(out, plan, opts.strict)                              # either: it may be a read-only copy
    with outdir.writing(out, "build") as held:
        state = _prepare_out(out, plan, overwrite, log)
        if state == "complete":
            return _already(out, plan, opts.strict)
        if state == "replace" and partition is not None and partition[1] > 1:   # a slice replaces no whole build
            outdir.clear_dir(out)
            state = "fresh"
        if state != "replace":
            return _fill(out, state, plan, tok, units, manifest, opts, partition, log, pool)
        return _replace(held, lambda new: _fill(new, _prepare_beside(new, plan), plan, tok, units, manifest,
                                                opts, None, log, pool), log)


def _holds(out: str, plan: dict) -> bool:
    """Whether ``out`` holds the complete build of ``plan``."""
    try:
        return layout.read_json(os.path.join(out, MARKER)).get("fingerprint") == plan["fingerprint"]
    except (OSError, ValueError, AttributeError):
        return False


def _already(out: str, plan: dict, strict: bool = False) -> BuildResult:
    """The result of a build or merge that finds its build complete in ``out``: nothing to do."""
    if strict:
        _refuse_skipped(out)
    n = len(plan["units"])
    return BuildResult(out, layout.read_json(os.path.join(out, MARKER)), n, n, skipped=True)


def _replace(held: "outdir.Held", build_into, log) -> BuildResult:
    """--overwrite of a complete build: ``build_into`` a directory beside it, then exchange the two, so that a
    reader finds the old build or the new one, never a mix; the old one is removed after. An interrupted
    --overwrite resumes beside, and the old build stays whole until the exchange."""
    new = outdir.beside(held.out)
    if new is None:
        log(f"note: {held.out} is a mount point, so no build can be made beside it: --overwrite replaces it in "
            f"place, not in one step")
        outdir.clear_dir(held.out)
        return build_into(held.out)
    _refuse_foreign(new)
    with outdir.writing(new, "build") as mine:
        res = build_into(new)
        outdir.exchange(mine, held)
    shutil.rmtree(new)   # the old build, now there
    res.out = held.out
    return res


def _fill(out: str, state: str, plan: dict, tok, units: list[Unit], manifest: Manifest, opts: BuildOptions,
          partition, log, pool: WorkerPool | None) -> BuildResult:
    """Run the units of ``out`` not yet committed (state 'fresh' or 'resume'), then finalize, unless it is one
    partition of the build; a 'complete' directory (a finished --overwrite not yet swapped in) is kept."""
    work = os.path.join(out, WORK)
    if state == "complete":
        return BuildResult(out, layout.read_json(os.path.join(out, MARKER)), len(units), len(units))
    if state == "fresh":
        os.makedirs(work, exist_ok=True)
        save_tokenizer_dir(tok, os.path.join(work, layout.TOKENIZER), plan["tokenizer"]["roles"],
                           plan["tokenizer"]["added_specials"], model_max_length=opts.seq_len)
        write_json(os.path.join(work, layout.PLAN), plan)
    shutil.rmtree(os.path.join(work, layout.TMP), ignore_errors=True)
    part_file = os.path.join(work, PARTITION)
    if partition is not None and partition[1] > 1:   # what `sptok show` & co. say about this directory
        write_json(part_file, {"index": partition[0], "count": partition[1]})
    elif os.path.exists(part_file):
        os.remove(part_file)

    mine = [u for u in units if partition is None or u.index % partition[1] == partition[0]]
    todo = [u for u in mine if not is_committed(work, u)]
    if len(todo) < len(mine) and not opts.quiet:
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} units already committed")
    # stops the build when a source ends without documents (or metadata, or a sample --tail drop leaves)
    watch = _SourceWatch(work, units, opts.holdout_docs, opts.metadata,
                         drop_below=opts.seq_len if opts.tail == "drop" else None)
    if todo:
        sample = corpus_sample(manifest, units)
        name, why = pool.choose_encoder(work, opts.encoder, sample) if pool else \
            choose_here(work, opts.encoder, sample, tok)
        if not opts.quiet:
            log(f"encoder: {name} ({why})")
        _run_with_fallback(work, mine, todo, opts, name, pool, log, watch)
    committed = sum(is_committed(work, u) for u in units)
    if partition is not None and partition[1] > 1:
        return BuildResult(out, None, committed, len(units))
    info = finalize(plan, {u.index: unit_dir(work, u) for u in units}, out, os.path.join(work, layout.TOKENIZER),
                    uploading_to=pool.remote if pool is not None else None)
    outdir.clear_work(out)   # the writer's lock goes last, when the writer lets go
    return BuildResult(out, info, committed, len(units))


def _run_with_fallback(work: str, mine: list[Unit], todo: list[Unit], opts: BuildOptions, name: str, pool, log,
                       watch: "_SourceWatch"):
    """Run the units with encoder ``name``. When a spot check finds a mismatch under ``--encoder auto``, every
    unit that encoder built is discarded and all are built again with the Hugging Face tokenizer, so the
    output is the reference's exactly; under any other ``--encoder`` the mismatch is the error."""
    try:
        run_units(work, todo, opts, name, pool, on_done=watch.unit_done)
    except EncoderMismatch as e:
        if opts.encoder != "auto":
            raise
        built = [u for u in mine if is_committed(work, u)
                 and layout.read_result(unit_dir(work, u))["encoder"].split()[0] == name]
        for u in built:
            shutil.rmtree(unit_dir(work, u))
        if not opts.quiet:
            log(f"encoder: hf ({e.message.split(';')[0]}; building again the {len(built)} units it built)")
        watch.recount()
        run_units(work, [u for u in mine if not is_committed(work, u)], opts, "hf", pool, on_done=watch.unit_done)


# ------------------------------------------------------------------------------------------------ plan

def make_plan(manifest: Manifest, opts: BuildOptions, units: list[Unit], named: Manifest | None = None):
    """Resolve everything that determines the output: SP table, tokenizer, layout, inputs, for ``units``
    (``plan_units``).

    ``named``: for an append, the whole manifest (the build's sources, then ``manifest``'s new ones): SPs are
    named, added to the tokenizer and tabled for all its sources, as a build of it would, while only
    ``manifest``'s sources are planned."""
    named = named or manifest
    sps, special = sp_tokens(named, opts)
    special_delim = special is not None
    if opts.policy != "custom" and any(s.sp for s in manifest.sources):
        print(f"note: `sp:` values in the manifest are used only with --policy custom (now {opts.policy})",
              file=sys.stderr)
    lt = load_tokenizer(opts.tokenizer)
    with open(lt.path, "rb") as f:
        base_sha = hashlib.sha256(f.read()).hexdigest()
    ids = extend(lt, sps, opts.delimiter if special_delim else None)
    tok = lt.tok
    if special_delim:
        delim_ids = [ids[opts.delimiter]]
    elif opts.delimiter:
        with literal_specials(tok) as enc:
            delim_ids = enc.encode(opts.delimiter, add_special_tokens=False).ids
    else:
        delim_ids = []
    eos = find_eos(lt, opts.eos)
    if eos in sps or (special_delim and eos == opts.delimiter):
        # readers find SPs, delimiters and document ends by these ids: one id in two roles is read wrongly
        # (`strip` would remove every EOS with the delimiters)
        role = "the delimiter" if eos == opts.delimiter else "the SP of a source"
        raise SptokError(f"EOS clash: --eos {eos} is also {role}; choose another --eos (the tokenizer's own "
                         f"end-of-document token, the default)")
    pad = find_pad(lt)
    if opts.tail == "pad" and pad is None:
        raise SptokError("--tail pad: the tokenizer has no padding token ([PAD], <pad>); use --tail keep or drop")
    roles = {**default_roles(tok), **lt.roles}
    vocab = tok.get_vocab_size(with_added_tokens=True)
    tok_json = tok.to_str()
    _probe_sources(manifest, units)
    _probe_metadata(manifest, units, opts.metadata)
    _probe_encoding(manifest, units, tok, roles.get("unk_token"), opts.strict)
    identity = {
        "sptok_version": __version__,
        # root: where `sptok verify` finds the inputs again; not fingerprinted (where a corpus lives is not
        # what it is), like the tokenizer's base path
        "manifest": {"path": os.path.basename(manifest.path), "root": manifest.root,
                     "sources": describe_sources(manifest)},
        "options": opts.identity(),
        "tokenizer": {"sha256": hashlib.sha256(tok_json.encode()).hexdigest(), "base": os.path.abspath(lt.path),
                      "base_sha256": base_sha, "vocab_size": vocab, "roles": roles,
                      "added_specials": sps + ([opts.delimiter] if special_delim else [])},
        "inputs": input_fingerprint(manifest, opts.hash_inputs),
        "units": [u.to_json() for u in units],
    }
    plan = dict(identity)
    plan["fingerprint"] = fingerprint_of(dict(
        identity, manifest={k: v for k, v in identity["manifest"].items() if k != "root"},
        tokenizer={k: v for k, v in identity["tokenizer"].items() if k != "base"}))
    plan["sp_table"] = [SPEntry(s.name, s.source_id, sp, ids[sp]).to_json() for s, sp in zip(named.sources, sps)]
    plan["delimiter"] = {"text": opts.delimiter, "special": special_delim, "ids": list(delim_ids)}
    plan["eos"] = {"token": eos, "id": tok.token_to_id(eos)}
    plan["pad"] = {"token": pad, "id": tok.token_to_id(pad) if pad else None}
    plan["input_ids_dtype"] = ids_dtype(vocab)
    return plan, tok


def _probe_sources(manifest: Manifest, units: list[Unit]) -> None:
    """Fail before anything is written when a source cannot give a document: a field or column that is
    not there (checked in every table file's schema, and in the first JSONL records), or a first unit
    without one document in its first bytes when those are all of the source's only unit (then the whole
    source was read)."""
    from .readers import TABLES, Rejects, read_prefix, schema_problem, table_schema

    for src in manifest.sources:
        where = f"manifest {manifest.path}: source {src.name!r}"
        mine = [u for u in units if u.source == src.name]
        if src.format in TABLES:
            for path, rel in dict.fromkeys((u.path, u.relpath) for u in mine):
                problem = schema_problem(table_schema(path, src.format, rel), src.text_field, src.id_field)
                if problem:
                    raise SptokError(f"{where}: {rel}: {problem}; set text_field (and id_field) to columns the "
                                     f"files have")
        if not mine:
            continue
        probe = Rejects(source=src.name)
        texts, whole = read_prefix(mine[0], src.text_field, src.id_field, probe)
        if texts:
            continue
        if "missing_field" in probe.counts:
            raise SptokError(f"{where}: {probe.examples['missing_field']}; set text_field (and id_field) to "
                             f"fields the records have")
        if len(mine) == 1 and whole:
            raise SptokError(f"manifest {manifest.path}: " + no_documents(src.name, dict(probe.counts),
                                                                          probe.examples))


def _probe_metadata(manifest: Manifest, units: list[Unit], metadata: dict | None) -> None:
    """Fail before anything is written when a source's metadata field cannot be in any of its records: a
    source of plain text files (no fields), or a table source none of whose files has the column. In JSONL
    a field missing from every record is found once the source's units are all committed
    (``source_problem``), as a source without documents is."""
    from .readers import TABLES, table_schema

    for src in manifest.sources:
        spec = (metadata or {}).get(src.name)
        if not spec:
            continue
        where = f"manifest {manifest.path}: source {src.name!r}"
        if src.format == "text":
            raise SptokError(f"{where}: metadata field {spec['field']!r}: plain text files have no fields; give "
                             f"this source `metadata: false`, or convert it to JSONL with a {spec['field']!r} field")
        files = dict.fromkeys((u.path, u.relpath) for u in units if u.source == src.name)
        if src.format in TABLES and files and not any(spec["field"] in table_schema(p, src.format, rel).names
                                                      for p, rel in files):
            raise SptokError(f"{where}: metadata field {spec['field']!r} is a column of none of its files; set "
                             f"metadata.field to a column they have, or `metadata: false` for this source")


def _probe_encoding(manifest: Manifest, units: list[Unit], tok, unk: str | None, strict: bool) -> None:
    """Warn (refuse under --strict) about a source the tokenizer cannot encode, judged on its first documents:
    such a build completes, and trains on runs of one token."""
    for name, texts in source_samples(manifest, units).items():
        problem = encoding_problem(tok, texts, unk)
        if problem is None:
            continue
        message = f"source {name!r}: the tokenizer cannot encode its text: {problem}; check --tokenizer"
        if strict:
            raise SptokError(f"--strict: {message}")
        print(f"warning: {message} (--strict stops here)", file=sys.stderr)


def no_documents(name: str, rejected: dict, examples: dict) -> str:
    """What to tell about a source that gave no document, and the way out."""
    why = "; ".join(f"{k} x{v} (first: {examples.get(k, '?')})" for k, v in sorted(rejected.items()))
    return (f"source {name!r} produced no documents" + (f": every record was skipped: {why}" if why else
                                                         ": its files hold no records")
            + ". Fix its records or its text_field, or remove the source from the manifest, then run "
              "`sptok build` again (it starts over)")


class _SourceWatch:
    """Checks each source once all its units are committed: a source without one document makes the
    build impossible, so it stops there (not after every other source is tokenized), and records why in
    ``.sptok/failed.json`` so that every command reading the directory says so."""

    def __init__(self, work: str, units: list[Unit], holdout_docs: int | None, metadata: dict | None = None,
                 drop_below: int | None = None):
        self.work, self.holdout_docs, self.metadata = work, holdout_docs, metadata or {}
        self.drop_below = drop_below
        self.by_source: dict[str, list[Unit]] = {}
        for u in units:
            self.by_source.setdefault(u.source, []).append(u)
        self.recount()
        for name, left in self.left.items():
            if left == 0:
                self._check(name)

    def recount(self) -> None:
        """How many units of each source are still to commit (again, after a fallback discarded some)."""
        self.left = {n: sum(not is_committed(self.work, u) for u in us) for n, us in self.by_source.items()}

    def unit_done(self, unit: Unit) -> None:
        self.left[unit.source] -= 1
        if self.left[unit.source] == 0:
            self._check(unit.source)

    def _check(self, name: str) -> None:
        results = [layout.read_result(unit_dir(self.work, u)) for u in self.by_source[name]]
        problem = source_problem(name, results, self.holdout_docs, self.metadata.get(name), self.drop_below)
        if problem:
            write_json(os.path.join(self.work, FAILED), {"error": problem})
            raise SptokError(problem)


def source_problem(name: str, results: list[dict], holdout_docs: int | None = None,
                   metadata: dict | None = None, drop_below: int | None = None) -> str | None:
    """Why a source leaves the build without training documents, from its committed units' results, or
    None: it has no document at all, or the validation split would take every one; or its metadata field is
    in none of its records (then every document would go without); or, with ``drop_below`` (the --seq-len of
    --tail drop), its tokens fill no sample (a source without samples cannot be read: streaming refuses it)."""
    candidates = sum(r.get("held_docs", 0) for r in results)              # set aside by the units
    kept = min(candidates, holdout_docs) if holdout_docs else candidates    # the validation split
    if sum(r["counts"].get("docs", 0) for r in results) + candidates - kept:   # documents to train on
        if any("held_docs" in r for r in results) and not kept:   # a split without the source cannot be read
            return (f"the validation split would hold no document of source {name!r} (--holdout takes each "
                    f"document by its hash, and took none of its "
                    f"{sum(r['counts'].get('docs', 0) for r in results):,}): hold out a larger share, or a number "
                    f"of documents of each source with --holdout-docs, then run `sptok build` again")
        tokens = sum(r["tail_tokens"] for r in results)   # the units' tails, stitched: the source's last samples
        if drop_below and not candidates and not sum(r["counts"].get("samples", 0) for r in results) \
                and tokens < drop_below:   # (held documents trained on after all would add tokens: not told)
            return (f"source {name!r} fills no sample: its {tokens:,} tokens are fewer than one sample of --seq-len "
                    f"{drop_below:,}, and --tail drop drops them; use --tail keep or pad, or a smaller --seq-len, "
                    f"then run `sptok build` again")
        if metadata and not any(r["counts"].get("meta_seen") or r["rejected"].get("non_string_metadata")
                                for r in results):
            return (f"source {name!r}: no record has the metadata field {metadata['field']!r}; set metadata.field "
                    f"to a field its records have (or `metadata: false` for this source), then run `sptok build` "
                    f"again")
        return None
    if kept:
        return (f"the validation split would hold out every document of source {name!r} ({kept:,}), leaving "
                f"it none to train on: hold out fewer (--holdout, --holdout-docs), then run `sptok build` again")
    rejected, examples = Counter(), {}
    for r in results:
        rejected.update(r["rejected"])
        for k, v in r["examples"].items():
            examples.setdefault(k, v)
    return no_documents(name, dict(rejected), examples)


def corpus_sample(manifest: Manifest, units: list[Unit], per_source: int = 32 << 10) -> list[str]:
    """The first documents of every source, ``per_source`` characters of each source at most (a longer
    document is cut): where the fast encoder is checked against the Hugging Face tokenizer before a build
    uses it. The cut keeps the check's cost flat: the reference needs ~100 bytes of memory per byte of text."""
    return [t for texts in source_samples(manifest, units, per_source).values() for t in texts]


def source_samples(manifest: Manifest, units: list[Unit], per_source: int = 32 << 10) -> dict[str, list[str]]:
    """Source name -> its first documents, ``per_source`` characters at most (a longer document is cut), for
    the checks made before a build; read from the first bytes of the source only (``readers.read_prefix``)."""
    from .readers import Rejects, read_prefix

    out = {}
    for src in manifest.sources:
        first = next((u for u in units if u.source == src.name), None)
        if first is None:
            continue
        found, _ = read_prefix(first, src.text_field, src.id_field, Rejects(source=src.name))
        if not found:
            continue
        texts, left = [], per_source
        for text in found:
            if left <= 0:
                break
            texts.append(text[:left])
            left -= len(texts[-1])
        out[src.name] = texts
    return out


def _prepare_out(out: str, plan: dict, overwrite: bool, log=print) -> str:
    """'fresh', 'resume', 'complete' or 'replace' (--overwrite of a complete build); refuses a changed resume.
    Called with the writer's lock held."""
    work = os.path.join(out, WORK)
    marker = os.path.join(out, MARKER)
    if os.path.exists(marker):
        try:
            old = layout.read_json(marker)
        except (OSError, ValueError):
            old = {}
        if overwrite:
            _refuse_removing_foreign(out, old, "a complete")
            return "replace"
        if old.get("fingerprint") == plan["fingerprint"]:
            outdir.clear_work(out)   # what a writer killed after its sptok.json left behind
            return "complete"
        raise SptokError(f"--out {out}: already holds a complete build of different inputs or options "
                         f"({describe_changes(old, plan) or 'fingerprint differs'}); pass --overwrite to replace it")
    try:
        old = layout.read_json(os.path.join(work, layout.PLAN))
    except (OSError, ValueError):   # nothing of a build yet (a new directory, or only a lock left)
        outdir.clear_work(out)
        return "fresh"
    if overwrite:
        _refuse_removing_foreign(out, old, "an unfinished")
        outdir.clear_dir(out)
        return "fresh"
    if old.get("fingerprint") != plan["fingerprint"] and os.path.exists(os.path.join(work, FAILED)):
        log(f"note: {out} held a build that failed; starting over with the changed inputs or options")
        outdir.clear_work(out)
        return "fresh"
    if old.get("fingerprint") != plan["fingerprint"]:
        raise SptokError(f"--out {out}: cannot resume: {describe_changes(old, plan) or 'the build differs'} since "
                         f"the interrupted build started; run the original command to finish it, or pass "
                         f"--overwrite to start over")
    # a resumed build first removes what an interrupted finalize wrote, so nothing looks complete
    clear_outputs(out, plan)
    return "resume"


def _prepare_beside(new: str, plan: dict) -> str:
    """The state of the directory an --overwrite builds in: kept or resumed when it holds this build (an
    interrupted --overwrite), else started over (it is sptok's own scratch)."""
    for path in (os.path.join(new, MARKER), os.path.join(new, WORK, layout.PLAN)):
        try:
            same = layout.read_json(path).get("fingerprint") == plan["fingerprint"]
        except (OSError, ValueError, AttributeError):
            continue
        if same and path.endswith(MARKER):
            outdir.clear_work(new)   # what a writer killed after its sptok.json left behind (swapped in next)
            return "complete"
        if same:
            clear_outputs(new, plan)
            return "resume"
        break
    outdir.clear_dir(new)
    return "fresh"


def _refuse_foreign(out: str) -> None:
    """Before anything is written: a directory holding files but no sptok build is never touched."""
    if _has_entries(out) and not os.path.exists(os.path.join(out, MARKER)) \
            and not os.path.isdir(os.path.join(out, WORK)):
        raise SptokError(f"--out {out}: the directory is not empty and holds no sptok build; choose an empty "
                         f"or new directory (sptok never deletes files it did not write)")


def _has_entries(out: str) -> bool:
    """Whether --out holds anything; a file there is a user error, not a traceback."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SptokError(f"--out {out}: exists and is not a directory; give a new or empty directory")
    return os.path.exists(out) and bool(os.listdir(out))


def describe_changes(old: dict, new: dict) -> str:
    """Name what differs between two plans, the way a person would look for it."""
    changes = []
    oo, no = old.get("options", {}), new.get("options", {})
    rehashed = oo.get("hash_inputs") != no.get("hash_inputs")
    for k in sorted((set(oo) | set(no)) - {"hash_inputs"}):
        if oo.get(k) != no.get(k):
            changes.append(f"option {k}: {oo.get(k)!r} -> {no.get(k)!r}")
    if rehashed:   # every input's fingerprint changes form: the files themselves may not have
        how = {True: "content (xxh64)", False: "size + mtime"}
        changes.append(f"the --hash-inputs option changed: inputs were fingerprinted by "
                       f"{how[bool(oo.get('hash_inputs'))]}, now by {how[bool(no.get('hash_inputs'))]}")
    om, nm = old.get("manifest", {}).get("sources"), new.get("manifest", {}).get("sources")
    if om != nm:
        changes.append("the manifest's sources changed")
    if old.get("tokenizer", {}).get("sha256") != new.get("tokenizer", {}).get("sha256"):
        changes.append("the tokenizer changed")
    oi = {r[0]: r[1:] for r in old.get("inputs", [])}
    ni = {r[0]: r[1:] for r in new.get("inputs", [])}
    changed = sorted(p for p in set(oi) | set(ni) if oi.get(p) != ni.get(p)
                     and not (rehashed and p in oi and p in ni and oi[p][0] == ni[p][0]))
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        changes.append(f"input files changed: {', '.join(changed[:3])}{more}")
    if old.get("sptok_version") != new.get("sptok_version"):
        changes.append(f"sptok version {old.get('sptok_version')} -> {new.get('sptok_version')}")
    return "; ".join(changes)


def _refuse_skipped(out: str) -> None:
    """--strict on a build that is already complete: pass only if it skipped nothing (--strict is not part
    of a build's identity, so the existing build is what a strict run would have checked)."""
    from ..rejects import iter_rejects, select

    names, reasons, stats = select(out)
    rejected = stats["totals"]["rejected"]
    if rejected:
        first = next(iter_rejects(out, names, reasons, stats))   # in build order, as --strict would stop
        raise SptokError(f"--strict: {out} already holds this build, and it skipped {sum(rejected.values()):,} "
                         f"records ({', '.join(f'{k} {v:,}' for k, v in rejected.items())}); the first: "
                         f"{first['where']}: {first['detail']}; `sptok rejects {out}` lists them")


# ------------------------------------------------------------------------------------------------ merge

def run_merge(parts: list[str], out: str, overwrite: bool = False, log=print) -> BuildResult:
    """Join partition directories (``--partition i/N`` builds) into one complete build in ``out``; a no-op
    where ``out`` already holds this build, as for `sptok build`.

    Finalize reads only the plan and the committed units, so the result is byte-identical to a build of
    the whole corpus on one machine.
    """
    plans = []
    for p in parts:
        path = os.path.join(p, WORK, layout.PLAN)
        writer = layout.writer_of(p)
        if writer is not None:
            raise SptokError(f"{p}: a partition still being built ({layout.describe_writer(writer)} is writing it); "
                             f"merge once it is done")
        if os.path.exists(os.path.join(p, MARKER)):
            raise SptokError(f"{p}: already a complete build, not a partition; merge only --partition outputs")
        try:
            plans.append(layout.read_json(path))
        except (OSError, ValueError):
            raise SptokError(f"{p}: not a partition of an sptok build (no {WORK}/{layout.PLAN})") from None
    plan = plans[0]
    for p, other in zip(parts[1:], plans[1:]):
        if other["fingerprint"] != plan["fingerprint"]:
            raise SptokError(f"{p} is a partition of another build than {parts[0]}: "
                             f"{describe_changes(plan, other) or 'the plans differ'}")
    unit_dirs: dict[int, str] = {}
    for p in parts:
        for u in plan["units"]:
            d = layout.unit_dir(os.path.join(p, WORK), u["index"])
            if u["index"] not in unit_dirs and layout.is_committed(d):
                unit_dirs[u["index"]] = d
    missing = [u for u in plan["units"] if u["index"] not in unit_dirs]
    if missing:
        first = ", ".join(f"{u['file']} (unit {u['index']})" for u in missing[:3])
        raise SptokError(f"cannot merge: {len(missing)} of {len(plan['units'])} units are committed in none of the "
                         f"given directories (first: {first}); finish or add the missing partitions")
    for d in unit_dirs.values():   # partitions may have travelled from other machines: a damaged one is named
        problem = unit_problem(d, plan["options"]["format"])
        if problem:
            raise SptokError(f"cannot merge: the committed unit {d} is damaged: {problem}; remove that directory "
                             f"and run its partition's `sptok build ... --partition i/N` again to rebuild it")
    for src in plan["manifest"]["sources"]:
        problem = source_problem(src["name"], [layout.read_result(unit_dirs[u["index"]])
                                               for u in plan["units"] if u["source"] == src["name"]],
                                 plan["options"].get("holdout_docs"),
                                 (plan["options"].get("metadata") or {}).get(src["name"]),
                                 plan["options"]["seq_len"] if plan["options"]["tail"] == "drop" else None)
        if problem:
            raise SptokError(problem)
    tokenizer_dir = os.path.join(parts[0], WORK, layout.TOKENIZER)
    if os.path.abspath(out) in map(os.path.abspath, parts):   # into one of the partitions: finalize beside its units
        with outdir.writing(out, "merge"):
            return BuildResult(out, finalize(plan, unit_dirs, out, tokenizer_dir), len(unit_dirs), len(unit_dirs))
    inside = [p for p in parts if os.path.abspath(p).startswith(os.path.join(os.path.abspath(out), ""))]
    if inside:   # --overwrite would replace --out, and the partition with it
        raise SptokError(f"--out {out} holds the partition {inside[0]}: merge into another directory (or into a "
                         f"partition itself)")
    marker = os.path.join(out, MARKER)
    if not os.path.exists(marker) and not _merge_leftovers_only(out, plan):
        raise SptokError(f"--out {out}: the directory is not empty and holds no sptok build")
    if not overwrite and _holds(out, plan) and not outdir.work_left(out):
        return _already(out, plan)
    with outdir.writing(out, "merge") as held:
        state = _prepare_out(out, plan, overwrite) if os.path.exists(marker) else "fresh"
        if state == "complete":
            return _already(out, plan)

        def merge_into(d: str) -> BuildResult:
            outdir.clear_dir(d)   # what an interrupted merge left (here, or beside for --overwrite)
            info = finalize(plan, unit_dirs, d, tokenizer_dir)
            outdir.clear_work(d)
            return BuildResult(d, info, len(unit_dirs), len(unit_dirs))

        if state == "replace":
            return _replace(held, merge_into, log)
        return merge_into(out)


def _merge_leftovers_only(out: str, plan: dict) -> bool:
    """Whether ``out`` is empty or holds only what an interrupted merge of ``plan`` left (finalize's outputs,
    which finalize clears first, and a lock): a merge may start over there."""
    if not _has_entries(out):
        return True
    work = os.path.join(out, WORK)
    return not _foreign(out, plan) and (not os.path.isdir(work) or set(os.listdir(work)) <= {layout.LOCK})


def _refuse_removing_foreign(out: str, plan: dict, state: str) -> None:
    """--overwrite removes the build in ``out`` whole: refused while files it did not write lie beside it."""
    foreign = _foreign(out, plan)
    if foreign:
        raise SptokError(f"--out {out}: holds {', '.join(foreign[:3])}, which no sptok build wrote there, beside "
                         f"{state} build; --overwrite would remove them with it: move them out first")


def _foreign(out: str, plan: dict) -> list[str]:
    """The entries of ``out`` that no build of ``plan`` writes there (its top-level files, their ``.tmp`` while
    written, its sources' directories, the work directory): what starting over there must not remove."""
    top = set(layout.TOP_LEVEL) | {s.get("name") for s in (plan.get("manifest") or {}).get("sources") or []}
    return sorted(set(os.listdir(out)) - top - {f"{n}.tmp" for n in layout.TOP_LEVEL} - {WORK})

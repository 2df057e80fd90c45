"""``sptok build MANIFEST --out OUT --append``: add sources to a complete build, every file it holds left as it is.

The manifest lists the build's sources, unchanged and in their order, then the new ones; the options are the
build's, and the tokenizer is the build's own (``OUT/tokenizer``) with the new SPs added after every existing id.
Only the new sources are built: as a build of their own in ``OUT/.sptok/append`` (the ordinary units, workers and
resume). Then they join OUT: their directories, rejects and validation split move in; the merged ``index.json``,
``stats.json``, ``tokenizer/`` and the split's top files are written again; ``sptok.json`` last, its fingerprint
derived from the old one (``parent``) and the new sources' plan, naming them (``appended``).

While an append runs, the old ``sptok.json`` and tokenizer wait in ``OUT/.sptok/parent``: OUT reads as a build in
progress, never as complete with a mix, and an interrupted append resumes with the same command.

What an appended build equals: a one-go build of the whole manifest made with the appended build's own
tokenizer (``--tokenizer OUT/tokenizer``), byte for byte in every file but the ``sptok.json`` files (fingerprint,
lineage) and, in ``stats.json``, the ``sp_literals`` count of an old source whose text holds a new SP literally
(it was built before that SP existed). Old SP ids are unchanged, so the old sources' shards are also byte-equal to
the build's before the append.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from collections import Counter

from .. import layout
from ..errors import SptokError
from ..layout import MARKER, STATS, TOKENIZER, WORK, write_json
from ..stats import totals
from . import outdir
from .driver import (BuildResult, _fill, _prepare_out, _refuse_skipped, describe_changes, make_plan, resolve_build,
                     run_pooled)
from .finalize import _copy_dir, fingerprint_of
from .manifest import Manifest, describe_sources, input_fingerprint, plan_units
from .options import BuildOptions
from .runner import needs_workers
from .tokenizer import load_tokenizer, sp_tokens, tokenizer_file


def run_append(manifest_path: str, out: str, flags: dict, overwrite: bool = False,
               partition: tuple[int, int] | None = None, log=print) -> BuildResult:
    """Build the sources of the manifest that the complete build in ``out`` lacks, and join them to it; a no-op
    where it holds them all."""
    t0 = time.time()
    manifest, opts = resolve_build(manifest_path, out, flags)
    return run_pooled(opts, lambda pool: _append(manifest, opts, out, overwrite, partition, log, pool), t0,
                      needs_workers(plan_units(_new_sources(manifest, out), opts.unit_size)))


def _new_sources(manifest: Manifest, out: str) -> Manifest:
    """The manifest's sources past those of the build in ``out`` (all of them where there is none to read): what
    decides whether worker processes are worth starting, before the checks that refuse what does not fit."""
    try:
        built = len(layout.read_json(os.path.join(_parent_dir(out), MARKER))["manifest"]["sources"])
    except (SptokError, OSError, ValueError, KeyError, TypeError):
        built = 0
    return dataclasses.replace(manifest, sources=manifest.sources[built:])


def _append(manifest: Manifest, opts: BuildOptions, out: str, overwrite: bool, partition, log,
            pool) -> BuildResult:
    if overwrite:
        raise SptokError("--append and --overwrite: give one (--append adds sources to the build in --out, "
                         "--overwrite replaces it)")
    if partition is not None and partition[1] > 1:
        raise SptokError("--append with --partition: an append runs on one machine (its --workers share the new "
                         "sources' units); drop --partition")
    if _parent_dir(out) == out:   # no lock for a no-op: the build may be a read-only copy
        parent = layout.load_build(out)
        if len(parent["manifest"]["sources"]) >= len(manifest.sources) and \
                _refuse_changes(manifest, opts, parent, out) == len(manifest.sources):
            return _unchanged(out, parent, opts)
    with outdir.writing(out, "build --append"):
        where = _parent_dir(out)
        parent = layout.read_json(os.path.join(where, MARKER))
        n_old = _refuse_changes(manifest, opts, parent, out)
        if n_old == len(manifest.sources):
            if where != out:
                _give_up(out, log)
            return _unchanged(out, parent, opts)
        new = dataclasses.replace(manifest, sources=manifest.sources[n_old:])
        new_opts = dataclasses.replace(opts, tokenizer=os.path.join(where, TOKENIZER))
        units = plan_units(new, opts.unit_size)
        plan, tok = make_plan(new, new_opts, units, named=manifest)
        if plan["input_ids_dtype"] != parent["input_ids_dtype"]:
            raise SptokError(f"--append: the new SPs take the vocabulary to {plan['tokenizer']['vocab_size']:,} "
                             f"tokens, which need {plan['input_ids_dtype']} ids; the build's shards hold "
                             f"{parent['input_ids_dtype']}: rebuild it whole (without --append)")
        lineage = _lineage(parent, plan)
        scratch = os.path.join(out, WORK, layout.APPEND)
        if where == out:
            _set_aside(out, lineage)
        else:
            _resume(out, scratch, lineage, log)
        try:
            res = _fill(scratch, _prepare_out(scratch, plan, False, log), plan, tok, units, new, new_opts, None,
                        log, pool)
        except SptokError as e:
            if os.path.exists(os.path.join(scratch, WORK, layout.FAILED)):   # a new source without documents
                raise SptokError(f"{e.message}; {layout.append_way_out(out)}") from None
            raise
        info = _join(out, parent, scratch, lineage)
        outdir.clear_work(out)
    return BuildResult(out, info, res.committed, res.total_units)


def _parent_dir(out: str) -> str:
    """Where the build appended to lies: ``out`` when complete, ``out/.sptok/parent`` while an append runs."""
    if os.path.exists(os.path.join(out, MARKER)):
        return out
    aside = os.path.join(out, WORK, layout.PARENT)
    if os.path.exists(os.path.join(aside, MARKER)):
        return aside
    try:
        layout.load_build(out)   # raises, saying what the directory is
    except SptokError as e:
        raise SptokError(f"--append needs a complete build in --out: {e.message}") from None
    raise AssertionError(f"{out}: load_build accepted a directory without {MARKER}")


def _unchanged(out: str, parent: dict, opts: BuildOptions) -> BuildResult:
    """The build already holds every source of the manifest: nothing to append, as a repeated build."""
    if opts.strict:
        _refuse_skipped(out)
    return BuildResult(out, parent, parent["units"], parent["units"], skipped=True)


# ------------------------------------------------------------------------------------------------ checks

def _refuse_changes(manifest: Manifest, opts: BuildOptions, parent: dict, out: str) -> int:
    """Refuse, naming what differs, a manifest or options that do not extend the build; return how many of the
    manifest's sources are the build's (the rest are new)."""
    mine, theirs = opts.identity(), parent["options"]
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k != "metadata")
    _refuse_metadata_changes(mine.get("metadata"), theirs.get("metadata"), out)
    if diff:
        raise SptokError(f"--append: other options than the build in {out} ("
                         + "; ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in diff)
                         + "); an append keeps the build's options")
    old = parent["manifest"]["sources"]
    problem = _source_problem(old, describe_sources(manifest))
    if problem:
        raise SptokError(f"--append: {manifest.path}: {problem}; list the build's sources unchanged and in their "
                         f"order, then the new ones")
    built = {r[0]: r for r in parent["inputs"]}
    now = {r[0]: r for r in input_fingerprint(dataclasses.replace(manifest, sources=manifest.sources[:len(old)]),
                                              opts.hash_inputs)}
    changed = sorted(p for p in set(built) | set(now) if built.get(p) != now.get(p))
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise SptokError(f"--append: input files of the build's sources changed since it was built: "
                         f"{', '.join(changed[:3])}{more}; an append leaves the old sources as built: rebuild "
                         f"(without --append) to take the changes")
    _refuse_tokenizer(opts.tokenizer, parent, out)
    sps, _ = sp_tokens(manifest, opts)
    for entry in sorted(parent["sp_table"], key=lambda e: e["source_id"]):
        if sps[entry["source_id"]] != entry["sp"]:
            raise SptokError(f"--append: with the new sources, --policy {opts.policy} names source "
                             f"{entry['source']!r} {sps[entry['source_id']]}, not {entry['sp']} as in the build; an "
                             f"append keeps every SP, so it needs a policy that names each source alone "
                             f"(abbreviation, alphabet, custom)")
    return len(old)


def _refuse_metadata_changes(mine: dict | None, theirs: dict | None, out: str) -> None:
    """The build's sources keep their metadata options; a new source may have its own only where the build has
    metadata at all (its shards have the ``meta_spans`` column, which an append cannot add to the old ones)."""
    if theirs is None:
        if mine:
            first = next(n for n, m in mine.items() if m)
            raise SptokError(f"--append: source {first!r} would get metadata, but the build in {out} has none: its "
                             f"shards have no meta_spans column; rebuild it whole (without --append) with --metadata")
        return
    mine = mine or {}
    for name, spec in theirs.items():
        if mine.get(name) != spec:
            raise SptokError(f"--append: other metadata options for source {name!r} than the build in {out} "
                             f"({spec!r} -> {mine.get(name)!r}); an append keeps the build's options")


def _source_problem(old: list[dict], now: list[dict]) -> str | None:
    """The first of the build's sources (``describe_sources`` entries) that the manifest's do not keep as
    they were, in their place, and how."""
    names = [s["name"] for s in now]
    for i, a in enumerate(old):
        if a["name"] not in names:
            return f"source {a['name']!r} of the build was removed"
        j = names.index(a["name"])
        if j != i:
            return f"source {a['name']!r} moved from position {i} to {j}"
        b = now[i]
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff:
            return f"source {a['name']!r} changed: " + ", ".join(_change(k, a.get(k), b.get(k)) for k in diff)
    return None


def _change(key: str, was, now) -> str:
    if isinstance(was, list) and isinstance(now, list) and len(was) + len(now) > 6:   # a glob's files
        gone, added = sorted(set(was) - set(now)), sorted(set(now) - set(was))
        return f"{key}: " + ", ".join([f"+{f}" for f in added[:3]] + [f"-{f}" for f in gone[:3]])
    return f"{key} {was!r} -> {now!r}"


def _refuse_tokenizer(path: str | None, parent: dict, out: str) -> None:
    """An append extends the build's own tokenizer: a --tokenizer given must be the one the build started from
    (its base, by the file's sha256) or the build's own (``OUT/tokenizer``, by its content's)."""
    if not path:
        return
    file = tokenizer_file(path)
    if os.path.realpath(file) == os.path.realpath(layout.tokenizer_json(out)):
        return   # the build's own, already extended where an interrupted append had begun to join
    with open(file, "rb") as f:
        file_sha = hashlib.sha256(f.read()).hexdigest()
    t = parent["tokenizer"]
    if file_sha == t.get("base_sha256") or \
            hashlib.sha256(load_tokenizer(path).tok.to_str().encode()).hexdigest() == t["sha256"]:
        return   # the base, by its file's bytes (read as a tokenizer only when they differ), or the build's own
    raise SptokError(f"--append: --tokenizer {path} is another tokenizer than the build in {out} started from "
                     f"(sha256 {file_sha[:12]}, the build's {str(t.get('base_sha256'))[:12]}, {t.get('base')}); an "
                     f"append extends the build's own: give that one, {os.path.join(out, TOKENIZER)}, or no "
                     f"--tokenizer")


# ------------------------------------------------------------------------------------------------ state

def _lineage(parent: dict, plan: dict) -> dict:
    """The appended build's description but for what its outputs count: the parent's, extended by ``plan``'s
    new sources, with a fingerprint derived from the parent's and the plan's."""
    info = {k: v for k, v in parent.items() if k not in ("holdout", "encoder", "counts", "complete")}
    tokenizer = dict(plan["tokenizer"], path=TOKENIZER, base=parent["tokenizer"].get("base"),
                     base_sha256=parent["tokenizer"].get("base_sha256"))
    info.update(sptok_version=plan["sptok_version"], parent=parent["fingerprint"],
                fingerprint=fingerprint_of({"parent": parent["fingerprint"], "append": plan["fingerprint"]}),
                appended=[s["name"] for s in plan["manifest"]["sources"]],
                manifest={**plan["manifest"], "sources": parent["manifest"]["sources"] + plan["manifest"]["sources"]},
                sp_table=plan["sp_table"], tokenizer=tokenizer, inputs=parent["inputs"] + plan["inputs"],
                units=parent["units"] + len(plan["units"]))
    if parent["options"].get("metadata") is not None:   # the new sources' metadata options join the build's
        new = plan["options"].get("metadata") or {}
        info["options"] = dict(parent["options"], metadata={**parent["options"]["metadata"],
                                                            **{n: new.get(n) for n in info["appended"]}})
    return info


def _set_aside(out: str, lineage: dict) -> None:
    """Start an append: the build's tokenizer and then its sptok.json move into ``.sptok/parent`` (from then on
    OUT reads as a build in progress), beside the append's description (``.sptok/plan.json``, which a plain
    ``sptok build`` on OUT finds and refuses to resume)."""
    work = os.path.join(out, WORK)
    outdir.clear_work(out)   # what an append interrupted before this point left
    aside = os.path.join(work, layout.PARENT)
    _copy_dir(os.path.join(out, TOKENIZER), os.path.join(aside, TOKENIZER))
    write_json(os.path.join(work, layout.PLAN), lineage)
    os.replace(os.path.join(out, MARKER), os.path.join(aside, MARKER))


def _resume(out: str, scratch: str, lineage: dict, log) -> None:
    """Go on with the append in progress in ``out``. One of other sources or options starts its new sources
    over, unless they have begun to join the build (only the command that started it may finish that)."""
    path = os.path.join(out, WORK, layout.PLAN)
    try:
        recorded = layout.read_json(path)
    except (OSError, ValueError):
        recorded = {}
    if recorded.get("fingerprint") == lineage["fingerprint"]:
        return
    changes = describe_changes(recorded, lineage) or "the appended sources differ"
    if os.path.exists(os.path.join(scratch, MARKER)):
        raise SptokError(f"--out {out}: the sources of another append are joining the build ({changes}); run the "
                         f"command that started it to finish it")
    log(f"note: {out} held an interrupted append of other sources or options ({changes}); starting its new "
        f"sources over")
    shutil.rmtree(scratch, ignore_errors=True)
    write_json(path, lineage)


def _give_up(out: str, log) -> None:
    """An append in progress, asked for with the build's own manifest: the build comes back as it was, unless the
    new sources have begun to join it."""
    if os.path.exists(os.path.join(out, WORK, layout.APPEND, MARKER)):
        raise SptokError(f"--out {out}: the new sources of an append are joining the build, and the manifest lists "
                         f"none; run the command that started the append to finish it")
    os.replace(os.path.join(out, WORK, layout.PARENT, MARKER), os.path.join(out, MARKER))
    outdir.clear_work(out)
    log(f"note: {out} held an unfinished append; the manifest lists only the build's sources, so the append was "
        f"given up and the build is as it was")


# ------------------------------------------------------------------------------------------------ join

def _join(out: str, parent: dict, scratch: str, lineage: dict) -> dict:
    """Join the new sources, complete in ``scratch``, to the build in ``out``; write sptok.json last and return
    it. Each step can run again: an interrupted join resumes where it stopped."""
    sub = layout.read_json(os.path.join(scratch, MARKER))
    old, new = [s["name"] for s in parent["manifest"]["sources"]], lineage["appended"]
    for name in new:
        _move_in(os.path.join(scratch, name), os.path.join(out, name))
        _move_in(layout.rejects_path(scratch, name), layout.rejects_path(out, name))
    per_source = _merge_stats(out, scratch, old, new)
    _move_in(os.path.join(scratch, TOKENIZER), os.path.join(out, TOKENIZER))
    info = dict(lineage, complete=True, counts=_counts(per_source),
                encoder=dict(sorted((Counter(parent["encoder"]) + Counter(sub["encoder"])).items())))
    if parent.get("holdout"):
        info["holdout"] = _join_split(out, parent, scratch, info)
    _write_merged_index(out, parent["format"], old + new)
    write_json(os.path.join(out, MARKER), info)   # last: its presence means complete
    return info


def _join_split(out: str, parent: dict, scratch: str, info: dict) -> dict:
    """The validation split's part of the join: what ``finalize._write_validation`` writes, for all sources."""
    split = parent["holdout"]["dir"]
    vout, vnew = os.path.join(out, split), os.path.join(scratch, split)
    old, new = [s["name"] for s in parent["manifest"]["sources"]], info["appended"]
    for name in new:
        _move_in(os.path.join(vnew, name), os.path.join(vout, name))
    per_source = _merge_stats(vout, vnew, old, new)
    shutil.rmtree(os.path.join(vout, TOKENIZER), ignore_errors=True)
    _copy_dir(os.path.join(out, TOKENIZER), os.path.join(vout, TOKENIZER))
    _write_merged_index(vout, parent["format"], old + new)
    fingerprint = fingerprint_of({"parent": info["fingerprint"], "split": split})
    vinfo = {k: v for k, v in info.items() if k not in ("holdout", "appended")}
    vinfo.update(counts=_counts(per_source), split=split, parent=info["fingerprint"], fingerprint=fingerprint)
    write_json(os.path.join(vout, MARKER), vinfo)
    return {**parent["holdout"], "fingerprint": fingerprint,
            "docs": {n: s["docs"] for n, s in per_source.items()}}


def _move_in(src: str, dst: str) -> None:
    """Move a file or directory of the new sources into the build (replacing what was there: the tokenizer);
    gone from ``src`` means already moved by an interrupted join."""
    if not os.path.exists(src):
        return
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)


def _merge_stats(dst: str, src: str, old: list[str], new: list[str]) -> dict:
    """``dst/stats.json`` for all sources: the old ones' entries as they were, the new ones' from ``src``, the
    totals summed again. Returns the per-source entries."""
    was = layout.read_json(os.path.join(dst, STATS))["sources"]
    now = layout.read_json(os.path.join(src, STATS))["sources"]
    per_source = {**{n: was[n] for n in old}, **{n: now[n] for n in new}}
    write_json(os.path.join(dst, STATS), {"sources": per_source, "totals": totals(per_source)})
    return per_source


def _counts(per_source: dict) -> dict:
    return {n: {k: s[k] for k in ("docs", "samples", "sample_tokens")} for n, s in per_source.items()}


def _write_merged_index(d: str, fmt: str, names: list[str]) -> None:
    """The top-level MDS index over every source's (their own indexes are left as they are)."""
    if fmt == "mds":
        layout.write_mds_index(d, layout.merged_index({n: layout.read_index(os.path.join(d, n), fmt)
                                                      for n in names}))

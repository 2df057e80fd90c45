"""Turn committed units into the output directory, then write ``sptok.json`` last.

Runs once all units of a build are committed (on one machine, or by ``sptok merge`` over partitions).
It depends only on the plan and the units' committed files, so every route to it gives the same bytes.
Unit shards are hard-linked into place (no copy), renumbered per source; each source's unit tails are
stitched, in unit order, into its final samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter

import numpy as np

from .. import layout
from ..errors import SptokError
from .holdout import Held, smallest
from ..layout import MARKER, write_json
from .manifest import file_xxh64
from .pack import Packer, Stream, pad
from ..stats import HIST_BINS, duplicate_ids, metadata_stats, source_stats, totals
from .writers import open_writer


def _copy_dir(src: str, dst: str) -> None:
    """Copy a flat directory (a tokenizer's). Not shutil.copytree: it gathers OSErrors into one shutil.Error
    without their errno, so a full disk would not read as one."""
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def finalize(plan: dict, unit_dirs: dict[int, str], out: str, tokenizer_dir: str,
             uploading_to: str | None = None) -> dict:
    """Write the per-source shards, indexes, rejects, stats, tokenizer, the validation split when there is
    one, and finally sptok.json. ``unit_dirs``: the committed directory of each unit, by unit index.
    ``uploading_to``: the remote --out whose Ray tasks upload the units' shards themselves: a unit they uploaded
    (``layout.UPLOADED``) holds no shards, they are in the remote under the names they get here; only their index
    entries are made."""
    opts = plan["options"]
    fmt = opts["format"]
    os.makedirs(out, exist_ok=True)
    clear_outputs(out, plan)
    held = _held_out(plan, unit_dirs)    # source -> (validation documents, per unit: documents trained on)
    if held and opts["tail"] == "drop":   # a split's source without samples cannot be read: streaming refuses it
        for name, (validation, _) in held.items():
            if len(validation.stream) < opts["seq_len"]:
                raise SptokError(f"the validation split of source {name!r} fills no sample: its "
                                 f"{len(validation.stream):,} tokens are fewer than one sample of --seq-len "
                                 f"{opts['seq_len']:,}, and --tail drop drops them; hold out more of it (--holdout, "
                                 f"--holdout-docs) or use --tail keep or pad, with --overwrite (it starts over)")
    per_source, indexes, encoders = {}, {}, Counter()
    for src in plan["manifest"]["sources"]:
        name = src["name"]
        units = [u for u in plan["units"] if u["source"] == name]
        dirs = [unit_dirs[u["index"]] for u in units]
        results = [layout.read_result(d) for d in dirs]
        encoders.update(r["encoder"] for r in results)
        sdir = os.path.join(out, name)
        os.makedirs(sdir)
        entries = []
        for d, r in zip(dirs, results):
            uploaded = _uploaded(d, uploading_to)
            for f in r["files"]:
                entries.append(_place(os.path.join(d, file_basename(f, fmt)), sdir, f, fmt, len(entries),
                                      link=not uploaded))
        back = held[name][1] if held else [Held.empty()] * len(units)
        streams = (s for d, b in zip(dirs, back) for s in (Stream.load(os.path.join(d, layout.TAIL)), b.stream))
        extra = _pack_streams(plan, streams, src, sdir, entries)
        for b in back:
            extra.update(b.totals())
        extra["hist"] = np.bincount(np.concatenate([b.bins for b in back]), minlength=HIST_BINS).tolist()
        indexes[name] = entries
        per_source[name] = source_stats(results, extra)
        if opts["tail"] == "drop" and not per_source[name]["samples"]:   # held documents trained on after all
            raise SptokError(f"source {name!r} fills no sample: its tokens are fewer than one sample of --seq-len "
                             f"{opts['seq_len']:,}, and --tail drop drops them; use --tail keep or pad, or a smaller "
                             f"--seq-len, with --overwrite (it starts over)")
        per_source[name]["files"] = len(entries)
        per_source[name]["rejects_file"] = _gather_rejects(out, name, dirs)
        dups = duplicate_ids(dirs)
        if dups:   # only then: a build without duplicates keeps the stats.json it always had
            per_source[name]["duplicate_ids"] = dups
        spec = (opts.get("metadata") or {}).get(name)
        if spec:
            per_source[name]["metadata"] = metadata_stats(spec, per_source[name], results, extra, dirs)
    stats = {"sources": per_source, "totals": totals(per_source)}
    write_json(os.path.join(out, layout.STATS), stats)
    _copy_dir(tokenizer_dir, os.path.join(out, layout.TOKENIZER))
    info = _describe(plan, per_source)
    # which encoder built how many units: how the build ran, the one record here that may differ between
    # builds of the same bytes (worker counts, resumes and partitions may each have used another encoder)
    info["encoder"] = dict(sorted(encoders.items()))
    if held:
        info["holdout"] = _write_validation(plan, {n: h[0] for n, h in held.items()}, out, info["fingerprint"],
                                            info["encoder"])
    # What makes a directory readable (the MDS indexes) goes last, right before sptok.json, so an
    # interrupted finalize leaves nothing a reader would take for complete (a resume removes it all).
    layout.write_indexes(out, fmt, indexes)
    write_json(os.path.join(out, MARKER), info)   # last: its presence means complete
    return info


def unit_problem(udir: str, fmt: str) -> str | None:
    """What is wrong with the files of a committed unit, or None: its result unreadable, a file it lists missing
    or of another size, its tail or held-out documents not an npz archive. Cheap (stats and a few small reads):
    what ``sptok merge`` checks of units that came from other machines before it builds on them."""
    import zipfile

    try:
        result = layout.read_result(udir)
        files = [(file_basename(f, fmt), (f["zip_data"] if fmt == "mds" else f)["bytes"]) for f in result["files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{layout.RESULT} unreadable ({e})"
    if not os.path.exists(os.path.join(udir, layout.UPLOADED)):   # else its shards are in a remote, not here
        for name, size in files:
            path = os.path.join(udir, name)
            if not os.path.exists(path):
                return f"{name} is missing"
            if os.path.getsize(path) != size:
                return f"{name} holds {os.path.getsize(path):,} bytes, {layout.RESULT} says {size:,}"
    for name in (layout.TAIL, layout.HOLDOUT):
        path = os.path.join(udir, name)
        if (name == layout.TAIL or os.path.exists(path)) and not zipfile.is_zipfile(path):
            return f"{name} is missing or not an npz archive"
    return None


def _uploaded(unit_dir: str, uploading_to: str | None) -> bool:
    """Whether a Ray task uploaded the unit's shards to the remote output (then it holds none); to another remote,
    or for a build that uploads nothing itself, the build cannot be finished here: one line."""
    try:
        with open(os.path.join(unit_dir, layout.UPLOADED)) as f:
            where = f.read()
    except FileNotFoundError:
        return False
    if where != uploading_to:
        raise SptokError(f"the units of this build were uploaded by Ray tasks to {where}: finish it with the same "
                         f"command (--out {where} --executor ray)")
    return True


def _held_out(plan: dict, unit_dirs: dict[int, str]) -> dict | None:
    """Per source: (its validation documents, and for each unit the held documents trained on after all),
    or None when the build has no validation split."""
    opts = plan["options"]
    if opts.get("holdout") is None and opts.get("holdout_docs") is None:
        return None
    out = {}
    for src in plan["manifest"]["sources"]:
        helds = [Held.load(os.path.join(unit_dirs[u["index"]], layout.HOLDOUT))
                 for u in plan["units"] if u["source"] == src["name"]]
        chosen = smallest(helds, opts["holdout_docs"]) if opts.get("holdout_docs") else [
            np.ones(len(h), bool) for h in helds]
        validation = Held.empty()
        for h, c in zip(helds, chosen):
            validation = validation + h.take(c)
        out[src["name"]] = (validation, [h.take(~c) for h, c in zip(helds, chosen)])
    return out


def _write_validation(plan: dict, held: dict[str, Held], out: str, parent: str, encoder: dict) -> dict:
    """OUT/validation: the held-out documents as a build of their own (same tokenizer, SP table and
    options), its fingerprint derived from the training build's. Returns what sptok.json says of it."""
    vdir = os.path.join(out, layout.SPLIT_DIR)
    fmt = plan["options"]["format"]
    per_source, indexes = {}, {}
    for src in plan["manifest"]["sources"]:
        name, docs = src["name"], held[src["name"]]
        os.makedirs(os.path.join(vdir, name))
        indexes[name] = []
        extra = _pack_streams(plan, [docs.stream], src, os.path.join(vdir, name), indexes[name])
        extra.update(docs.totals())
        extra["hist"] = np.bincount(docs.bins, minlength=HIST_BINS).tolist()
        per_source[name] = source_stats([], extra)
        per_source[name]["files"] = len(indexes[name])
        spec = (plan["options"].get("metadata") or {}).get(name)
        if spec:
            per_source[name]["metadata"] = metadata_stats(spec, per_source[name], [], extra)
    write_json(os.path.join(vdir, layout.STATS), {"sources": per_source, "totals": totals(per_source)})
    _copy_dir(os.path.join(out, layout.TOKENIZER), os.path.join(vdir, layout.TOKENIZER))
    info = _describe(plan, per_source)
    split = layout.SPLIT_DIR
    info.update(split=split, parent=parent, fingerprint=fingerprint_of({"parent": parent, "split": split}),
                encoder=encoder)
    layout.write_indexes(vdir, fmt, indexes)
    write_json(os.path.join(vdir, MARKER), info)
    opts = plan["options"]
    rule = {"docs_per_source": opts["holdout_docs"]} if opts.get("holdout_docs") else {"fraction": opts["holdout"]}
    return {**rule, "dir": split, "fingerprint": info["fingerprint"],
            "docs": {n: s["docs"] for n, s in per_source.items()}}


def file_basename(f: dict, fmt: str) -> str:
    """The name of a data file, from its entry in a unit's result (or an index)."""
    return f["zip_data"]["basename"] if fmt == "mds" else f["basename"]


def _place(src_path: str, sdir: str, f: dict, fmt: str, k: int, link: bool = True) -> dict:
    """Link one unit file into the source directory as file number k (unless ``link`` is false: it is there
    already); return its index entry."""
    e = json.loads(json.dumps(f))
    if fmt == "mds":
        e["raw_data"]["basename"] = layout.mds_shard(k)
        e["zip_data"]["basename"] = layout.data_file(k, fmt)
    else:
        e["basename"] = layout.data_file(k, fmt)
    if link:
        _link(src_path, os.path.join(sdir, file_basename(e, fmt)))
    return e


def _pack_streams(plan: dict, streams, src: dict, sdir: str, entries: list[dict]) -> Counter:
    """Pack streams (the units' tails, in unit order) into full samples, apply --tail to the last one, and
    add the files to ``entries``; returns the samples and tokens this added."""
    opts = plan["options"]
    seq_len, fmt = opts["seq_len"], opts["format"]
    tmp = os.path.join(sdir, layout.STITCH)
    os.makedirs(tmp)
    writer = open_writer(fmt, tmp, plan["input_ids_dtype"], opts["shard_size"], meta=bool(opts.get("metadata")))
    sid = src["source_id"]
    packer = Packer(seq_len, emit=lambda s: writer.write(s, sid))
    for s in streams:
        packer.add(s)
    last = packer.take_tail()
    extra = Counter(samples=packer.samples, sample_tokens=packer.samples * seq_len)
    if len(last):
        if opts["tail"] == "drop":
            extra["dropped_tokens"] = len(last)
        else:
            if opts["tail"] == "pad":
                extra["padding_tokens"] = seq_len - len(last)
                last = pad(last, seq_len, plan["pad"]["id"])
            writer.write(last, sid)
            extra["samples"] += 1
            extra["sample_tokens"] += len(last)
    for f in writer.finish():
        entries.append(_place(os.path.join(tmp, file_basename(f, fmt)), sdir, f, fmt, len(entries)))
    shutil.rmtree(tmp)
    return extra


def _gather_rejects(out: str, name: str, dirs: list[str]) -> dict | None:
    """Concatenate the units' quarantine files (zstd frames concatenate into one valid stream); returns its
    size and xxh64 for stats.json (what `sptok verify` checks it against), or None when nothing was rejected."""
    parts = [os.path.join(d, layout.QUARANTINE) for d in dirs]
    parts = [p for p in parts if os.path.exists(p)]
    if not parts:
        return None
    os.makedirs(os.path.join(out, layout.REJECTS), exist_ok=True)
    path = layout.rejects_path(out, name)
    with open(path, "wb") as dst:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, dst)
    return {"bytes": os.path.getsize(path), "xxh64": file_xxh64(path)}


def clear_outputs(out: str, plan: dict) -> None:
    """Remove what an interrupted finalize may have left, so it can run again from scratch."""
    for p in list(layout.TOP_LEVEL) + [s["name"] for s in plan["manifest"]["sources"]]:
        full = os.path.join(out, p)
        if os.path.isdir(full):
            shutil.rmtree(full)
        elif os.path.exists(full):
            os.remove(full)


def _describe(plan: dict, per_source: dict) -> dict:
    info = {k: plan[k] for k in ("manifest", "options", "sp_table", "delimiter", "eos", "pad",
                                 "input_ids_dtype", "inputs")}
    info["sptok_version"] = plan["sptok_version"]
    info["format"] = plan["options"]["format"]
    info["tokenizer"] = dict(plan["tokenizer"], path=layout.TOKENIZER)
    info["fingerprint"] = plan["fingerprint"]
    info["units"] = len(plan["units"])
    info["counts"] = {name: {k: s[k] for k in ("docs", "samples", "sample_tokens")} for name, s in per_source.items()}
    info["complete"] = True
    return info


def fingerprint_of(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


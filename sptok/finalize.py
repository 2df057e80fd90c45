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

from . import __version__
from .errors import SptokError
from .pack import Packer, Stream, pad
from .stats import source_stats, totals
from .writers import open_writer, write_mds_index

WORK = ".sptok"
MARKER = "sptok.json"
# per-source list of Parquet/Arrow files with their bytes and xxh64 (what `sptok verify` checks); the leading
# underscore keeps pyarrow's and datasets' directory discovery from taking it for a data file
TABLE_INDEX = "_files.json"


def load_build(out: str) -> dict:
    """The ``sptok.json`` of a complete build, or a one-line error saying what the directory is."""
    path = os.path.join(out, MARKER)
    if not os.path.isdir(out):
        raise SptokError(f"{out}: no such build directory")
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(out, WORK)):
            raise SptokError(f"{out}: the build is incomplete (no {MARKER}); run the same `sptok build` "
                             f"command again to resume it")
        raise SptokError(f"{out}: not an sptok build (no {MARKER})")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise SptokError(f"{path}: unreadable ({e})") from None
    if not isinstance(info, dict) or "sp_table" not in info:
        raise SptokError(f"{path}: not an sptok build description")
    return info


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def finalize(plan: dict, unit_dirs: dict[str, str], out: str, tokenizer_dir: str) -> dict:
    """Write the per-source shards, indexes, rejects, stats, tokenizer, and finally sptok.json."""
    opts = plan["options"]
    fmt = opts["format"]
    os.makedirs(out, exist_ok=True)
    clear_outputs(out, plan)
    per_source, merged_shards, indexes, encoders = {}, [], {}, Counter()
    for src in plan["manifest"]["sources"]:
        name = src["name"]
        units = [u for u in plan["units"] if u["source"] == name]
        results = [_read_json(os.path.join(unit_dirs[_uid(u)], "result.json")) for u in units]
        encoders.update(r["encoder"] for r in results)
        sdir = os.path.join(out, name)
        os.makedirs(sdir)
        entries = []
        for u, r in zip(units, results):
            for f in r["files"]:
                entries.append(_place(os.path.join(unit_dirs[_uid(u)], _basename(f, fmt)), sdir, f, fmt,
                                      len(entries)))
        extra = _stitch_tails(plan, [os.path.join(unit_dirs[_uid(u)], "tail.npz") for u in units], src, sdir,
                              entries)
        indexes[sdir] = entries
        if fmt == "mds":
            for e in entries:
                e = json.loads(json.dumps(e))
                for part in ("raw_data", "zip_data"):
                    e[part]["basename"] = f"{name}/{e[part]['basename']}"
                merged_shards.append(e)
        _gather_rejects(out, name, [unit_dirs[_uid(u)] for u in units])
        per_source[name] = source_stats(results, extra)
        per_source[name]["files"] = len(entries)
    stats = {"sources": per_source, "totals": totals(per_source)}
    write_json(os.path.join(out, "stats.json"), stats)
    shutil.copytree(tokenizer_dir, os.path.join(out, "tokenizer"))
    info = _describe(plan, per_source)
    # which encoder built how many units: how the build ran, the one record here that may differ between
    # builds of the same bytes (worker counts, resumes and partitions may each have used another encoder)
    info["encoder"] = dict(sorted(encoders.items()))
    # What makes a directory readable (the MDS indexes) goes last, right before sptok.json, so an
    # interrupted finalize leaves nothing a reader would take for complete (a resume removes it all).
    if fmt == "mds":
        for sdir, entries in indexes.items():
            write_mds_index(sdir, entries)
        write_mds_index(out, merged_shards)
    else:
        for sdir, entries in indexes.items():
            write_json(os.path.join(sdir, TABLE_INDEX), {"version": 1, "format": fmt, "files": entries})
    write_json(os.path.join(out, MARKER), info)   # last: its presence means complete
    return info


def _uid(u: dict) -> str:
    return f"u{u['index']:06d}"


def _basename(f: dict, fmt: str) -> str:
    return f["zip_data"]["basename"] if fmt == "mds" else f["basename"]


def _place(src_path: str, sdir: str, f: dict, fmt: str, k: int) -> dict:
    """Link one unit file into the source directory as file number k; return its index entry."""
    e = json.loads(json.dumps(f))
    if fmt == "mds":
        e["raw_data"]["basename"] = f"shard.{k:05}.mds"
        e["zip_data"]["basename"] = f"shard.{k:05}.mds.zstd"
        _link(src_path, os.path.join(sdir, e["zip_data"]["basename"]))
    else:
        e["basename"] = f"data-{k:05}.{fmt}"
        _link(src_path, os.path.join(sdir, e["basename"]))
    return e


def _stitch_tails(plan: dict, tail_files: list[str], src: dict, sdir: str, entries: list[dict]) -> dict:
    """Pack the units' tails (in unit order) into full samples, then apply --tail to the last one."""
    opts = plan["options"]
    seq_len, fmt = opts["seq_len"], opts["format"]
    tmp = os.path.join(sdir, ".stitch")
    os.makedirs(tmp)
    writer = open_writer(fmt, tmp, plan["input_ids_dtype"], opts["shard_size"])
    sid = src["source_id"]
    packer = Packer(seq_len, emit=lambda s: writer.write(s, sid))
    for path in tail_files:
        with np.load(path) as z:
            packer.add(Stream(**{k: z[k] for k in z.files}))
    last = packer.take_tail()
    extra = {"samples": packer.samples, "sample_tokens": packer.samples * seq_len, "padding_tokens": 0,
             "dropped_tokens": 0}
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
        entries.append(_place(os.path.join(tmp, _basename(f, fmt)), sdir, f, fmt, len(entries)))
    shutil.rmtree(tmp)
    return extra


def _gather_rejects(out: str, name: str, dirs: list[str]) -> None:
    """Concatenate the units' quarantine files (zstd frames concatenate into one valid stream)."""
    parts = [os.path.join(d, "rejects.jsonl.zst") for d in dirs]
    parts = [p for p in parts if os.path.exists(p)]
    if not parts:
        return
    os.makedirs(os.path.join(out, "rejects"), exist_ok=True)
    with open(os.path.join(out, "rejects", f"{name}.jsonl.zst"), "wb") as dst:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, dst)


def clear_outputs(out: str, plan: dict) -> None:
    """Remove what an interrupted finalize may have left, so it can run again from scratch."""
    for p in [MARKER, "index.json", "stats.json", "tokenizer", "rejects"] + \
             [s["name"] for s in plan["manifest"]["sources"]]:
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
    info["tokenizer"] = dict(plan["tokenizer"], path="tokenizer")
    info["fingerprint"] = plan["fingerprint"]
    info["units"] = len(plan["units"])
    info["counts"] = {name: {k: s[k] for k in ("docs", "samples", "sample_tokens")} for name, s in per_source.items()}
    info["complete"] = True
    return info


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    """Atomic: a reader sees the old file, or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def fingerprint_of(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


__all__ = ["finalize", "load_build", "fingerprint_of", "WORK", "MARKER", "TABLE_INDEX", "__version__"]

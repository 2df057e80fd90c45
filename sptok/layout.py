"""The build directory: every name in it, and how it is read. The one module that knows where things are.

    OUT/sptok.json             written last: its presence means the build is complete (``load_build``)
    OUT/stats.json             per-source statistics
    OUT/index.json             MDS only: the merged index of every source's shards
    OUT/tokenizer/             the build's tokenizer (tokenizer.json and its configs)
    OUT/rejects/<source>.jsonl.zst   the records the build skipped
    OUT/validation/            the validation split, itself a complete build
    OUT/<source>/              shard.00000.mds.zstd ... + index.json (MDS), or data-00000.parquet ... + _files.json
    OUT/.sptok/                work in progress: plan.json, tokenizer/, units/u000123/, tmp/, failed.json,
                               partition.json, lock (held by the writer); removed when the build completes
    .sptok/parent/             while ``sptok build --append`` runs: the build appended to (its sptok.json, tokenizer/)
    .sptok/append/             ... and its new sources, built as a build of their own before they join OUT
    .sptok/units/u000123/      one committed unit: result.json (written last), its shards, tail.npz,
                               holdout.npz, rejects.jsonl.zst; or, for a remote --out built by Ray tasks, all
                               but its shards, and ``uploaded`` naming the remote they are in

Writers (``build``, ``unit``, ``finalize``) and readers (``data``, ``verify``, ``stats``, ``remote``, ``inspect``,
``label``) import the names from here; nothing here imports the rest of sptok but its error type.
"""

from __future__ import annotations

import fcntl
import json
import os
import re

from .errors import SptokError

MARKER = "sptok.json"
STATS = "stats.json"
MDS_INDEX = "index.json"
# per-source list of Parquet/Arrow files with their bytes and xxh64 (what `sptok verify` checks); the leading
# underscore keeps pyarrow's and datasets' directory discovery from taking it for a data file
TABLE_INDEX = "_files.json"
TOKENIZER = "tokenizer"
TOKENIZER_JSON = "tokenizer.json"
REJECTS = "rejects"
SPLIT_DIR = "validation"
# what the top of an output directory holds besides the source directories: no source may take these names
TOP_LEVEL = (MARKER, MDS_INDEX, STATS, TOKENIZER, REJECTS, SPLIT_DIR)

WORK = ".sptok"
PLAN = "plan.json"
FAILED = "failed.json"         # in WORK: why the build cannot complete (a source without documents)
PARTITION = "partition.json"   # in WORK: this directory builds partition i/N (join with `sptok merge`)
LOCK = "lock"                  # in WORK: flock-ed by the process writing the directory, and names it (outdir.py)
PARENT = "parent"              # in WORK: the complete build an append extends, set aside (append.py)
APPEND = "append"              # in WORK: the append's new sources, built as a build of their own
UNITS = "units"
TMP = "tmp"
# in a unit's directory
RESULT = "result.json"         # written last: its presence means the unit is committed
TAIL = "tail.npz"              # the unit's remainder (< seq_len tokens), stitched by finalize
HOLDOUT = "holdout.npz"        # the unit's held-out documents (the validation split)
QUARANTINE = "rejects.jsonl.zst"
ID_HASHES = "ids.npy"           # the sorted doc keys (uint64) of a source with id_field: duplicate ids are counted
UPLOADED = "uploaded"          # the remote --out a Ray task uploaded the unit's shards to (then it holds none)
META_HASHES = "meta_values.npy"   # the sorted hashes (uint64) of a unit's metadata values: distinct values counted
STITCH = ".stitch"             # in a source directory while finalize packs the tails
# a model directory written by `sptok export` holds the build's MARKER too, and how the model was trained:
TRAIN_CONFIG = "sptok_train.json"


# ------------------------------------------------------------------------------------------------ names

def unit_id(index: int) -> str:
    """``u000123``: the name of unit 123's directory."""
    return f"u{index:06d}"


def unit_dir(work: str, index: int) -> str:
    return os.path.join(work, UNITS, unit_id(index))


def unit_tmp(work: str, index: int, pid: int) -> str:
    """Where a process builds a unit before the rename that commits it."""
    return os.path.join(work, TMP, f"{unit_id(index)}.{pid}")


def is_committed(udir: str) -> bool:
    return os.path.exists(os.path.join(udir, RESULT))


def read_result(udir: str) -> dict:
    return read_json(os.path.join(udir, RESULT))


def data_file(k: int, fmt: str) -> str:
    """The name of file k of a source directory: ``shard.00007.mds.zstd`` (MDS) or ``data-00007.parquet``."""
    return mds_shard(k) + ".zstd" if fmt == "mds" else f"data-{k:05}.{fmt}"


def mds_shard(k: int) -> str:
    """The decompressed name of MDS shard k (streaming writes it beside the .zstd when it reads the shard)."""
    return f"shard.{k:05}.mds"


def data_file_pattern(fmt: str) -> re.Pattern:
    """What a data file of this format is named (MDS: the .zstd shard or streaming's decompressed copy)."""
    return re.compile(r"shard\.\d+\.mds(\.zstd)?$" if fmt == "mds" else rf"data-\d+\.{fmt}$")


def index_name(fmt: str) -> str:
    return MDS_INDEX if fmt == "mds" else TABLE_INDEX


def rejects_path(out: str, source: str) -> str:
    return os.path.join(out, REJECTS, f"{source}.jsonl.zst")


def tokenizer_json(d: str) -> str:
    """The tokenizer.json of a build (or of its work directory)."""
    return os.path.join(d, TOKENIZER, TOKENIZER_JSON)


# ------------------------------------------------------------------------------------------------ files

def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj, allow_nan: bool = True) -> None:
    """Atomic: a reader sees the old file, or the whole new one. ``allow_nan=False`` refuses NaN and infinity,
    which Python writes but strict JSON parsers reject."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=allow_nan)
        f.write("\n")
    os.replace(tmp, path)


def writer_of(out: str) -> dict | None:
    """Who is writing ``out`` now (command, pid, host, started), or None: a shared flock taken and dropped at
    once tells whether a writer holds the lock (a writer waits such a probe out)."""
    try:
        fd = os.open(os.path.join(out, WORK, LOCK), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}
    finally:
        os.close(fd)


def describe_writer(w: dict) -> str:
    """``sptok build (pid 123 on host, started 2026-01-01 10:00:00 UTC)``."""
    return f"sptok {w.get('command', 'build')} (pid {w.get('pid', '?')} on {w.get('host', '?')}, started " \
           f"{w.get('started', '?')})"


def append_way_out(out: str) -> str:
    """What to run after an append that cannot complete (a new source without documents): not a plain build,
    which would refuse to resume the append, nor --overwrite, which would rebuild the old sources too."""
    return (f"for an append, that is `sptok build MANIFEST --out {out} --append` with the fixed manifest, or with "
            f"the build's own manifest to give the append up (the build is then as it was)")


def load_build(out: str) -> dict:
    """The ``sptok.json`` of a complete build, or a one-line error saying what the directory is."""
    path = os.path.join(out, MARKER)
    if not os.path.isdir(out):
        raise SptokError(f"{out}: no such build directory")
    if not os.path.exists(path):
        work = os.path.join(out, WORK)
        writer = writer_of(out)
        if writer is not None:
            raise SptokError(f"{out}: a build is in progress ({describe_writer(writer)} is writing it); read it "
                             f"once it is complete")
        if os.path.exists(os.path.join(work, FAILED)):
            raise SptokError(f"{out}: the build failed: {read_json(os.path.join(work, FAILED))['error']}")
        failed_append = os.path.join(work, APPEND, WORK, FAILED)
        if os.path.exists(failed_append):
            raise SptokError(f"{out}: an append to the build failed: {read_json(failed_append)['error']}; "
                             f"{append_way_out(out)}")
        if os.path.exists(os.path.join(work, PARTITION)):
            p = read_json(os.path.join(work, PARTITION))
            raise SptokError(f"{out}: partition {p['index']}/{p['count']} of a build, not a whole build: join all "
                             f"{p['count']} partition directories with `sptok merge PART ... --out DIR` and read DIR")
        if os.path.isdir(work):
            raise SptokError(f"{out}: the build is incomplete (no {MARKER}); run the same `sptok build` "
                             f"command again to resume it")
        raise SptokError(f"{out}: not an sptok build (no {MARKER})")
    try:
        info = read_json(path)
    except (OSError, ValueError) as e:
        raise SptokError(f"{path}: unreadable ({e})") from None
    if not isinstance(info, dict) or "sp_table" not in info:
        raise SptokError(f"{path}: not an sptok build description")
    return info


# ---------------------------------------------------------------------------------------------- indexes

def index_entries(index: dict, fmt: str) -> list:
    """The file entries of a source's index (MDS ``index.json`` or ``_files.json``)."""
    return index["shards"] if fmt == "mds" else index["files"]


def read_index(sdir: str, fmt: str) -> list:
    """The entries of one source directory's index; OSError / ValueError / KeyError when unreadable."""
    return index_entries(read_json(os.path.join(sdir, index_name(fmt))), fmt)


def listed_files(out: str, name: str, fmt: str) -> list[str]:
    """The data files of source ``name`` that its index lists, in its order, each on disk at the size listed
    (MDS: streaming's decompressed copy where it made one, else the .zstd shard), or a one-line error. A stat
    per file, so training can afford it before every read: streaming ends an epoch early without a word at a
    shard it cannot read, and a table build read by globbing would lose a deleted file's rows unnoticed."""
    sdir = os.path.join(out, name)
    index_rel = f"{name}/{index_name(fmt)}"
    try:
        entries = read_index(sdir, fmt)
        parts = [[p for p in (e["raw_data"], e.get("zip_data")) if p] if fmt == "mds" else [e] for e in entries]
        wanted = [[(p["basename"], int(p["bytes"])) for p in part] for part in parts]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SptokError(f"{out}/{index_rel}: cannot read the source's index ({e}); the build is damaged: "
                         f"`sptok verify {out}` says what is wrong") from None
    paths = []
    for options in wanted:
        for basename, size in options:
            path = os.path.join(sdir, basename)
            try:
                got = os.path.getsize(path)
                break
            except FileNotFoundError:
                continue
        else:
            raise SptokError(f"{out}/{name}/{options[-1][0]}: missing (listed in {index_rel}); the build is damaged: "
                             f"`sptok verify {out}` says what else is")
        if got != size:
            raise SptokError(f"{path}: {got:,} bytes, {index_rel} lists {size:,} (cut or changed after the build); "
                             f"`sptok verify {out}` says what else is damaged")
        paths.append(path)
    return paths


def write_index(sdir: str, fmt: str, entries: list[dict]) -> None:
    """A source's index: MDS ``index.json`` as streaming writes it, or ``_files.json``."""
    if fmt == "mds":
        write_mds_index(sdir, entries)
    else:
        write_json(os.path.join(sdir, TABLE_INDEX), {"version": 1, "format": fmt, "files": entries})


def write_mds_index(d: str, shards: list[dict]) -> None:
    """``index.json`` exactly as streaming's MDSWriter writes it."""
    with open(os.path.join(d, MDS_INDEX), "w") as f:
        json.dump({"version": 2, "shards": shards}, f, sort_keys=True)


def merged_index(indexes: dict[str, list[dict]]) -> list[dict]:
    """The top-level MDS index: every source's shard entries in source order, their names under the source's
    directory (what one ``StreamingDataset`` over OUT reads)."""
    merged = []
    for name, entries in indexes.items():
        for e in entries:
            e = json.loads(json.dumps(e))
            for part in ("raw_data", "zip_data"):
                e[part]["basename"] = f"{name}/{e[part]['basename']}"
            merged.append(e)
    return merged


def write_indexes(out: str, fmt: str, indexes: dict[str, list[dict]]) -> None:
    """Each source's index, then (MDS) the merged one: what makes a directory readable, so written last."""
    for name, entries in indexes.items():
        write_index(os.path.join(out, name), fmt, entries)
    if fmt == "mds":
        write_mds_index(out, merged_index(indexes))

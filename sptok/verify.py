"""`sptok verify OUT`: are the shards still the bytes the build wrote, and are the inputs still what it read?

Outputs are re-hashed against what the build recorded: MDS shards against the xxh64 and sizes of their
source's ``index.json`` (compressed and decompressed), Parquet/Arrow files against ``_files.json``, the
tokenizer against the sha256 in ``sptok.json``. Inputs are fingerprinted again the way the build did
(size + mtime, or content with ``--hash-inputs``) and compared file by file, so the report names each
file that changed, went missing, or is newly matched by the manifest's paths.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from .build import expand
from .errors import SptokError
from . import layout
from .layout import load_build
from .build.manifest import FORMAT_ALIASES, expand_source, file_xxh64, input_row, read_document, source_files

CHUNK = 8 << 20
LISTED = 5   # problems of one kind listed one per line; more are summed up in one line (--json lists each)


@dataclass
class Problem:
    kind: str      # shard | index | tokenizer | rejects | stats | input | manifest | split
    path: str      # relative to OUT (outputs) or to the manifest's directory (inputs)
    what: str      # changed | missing | new | unlisted | corrupt | mismatch | unreadable
    detail: str

    def line(self) -> str:
        return f"{self.kind:<9} {self.path}: {self.what}: {self.detail}"


@dataclass
class Report:
    out: str
    fingerprint: str
    outputs_checked: int = 0
    inputs_checked: int | None = None     # None: inputs not checked
    inputs_mode: str = ""
    problems: list[Problem] = field(default_factory=list)
    hint: str = ""                        # what to try, when the problems suggest it (--inputs after a move)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def text(self) -> str:
        checked = f"{self.outputs_checked} output files"
        if self.inputs_checked is not None:
            checked += f" and {self.inputs_checked} input files ({self.inputs_mode})"
        head = f"{self.out} (fingerprint {self.fingerprint[:12]})"
        if self.ok:
            return f"ok: {head}: {checked} match the build"
        n = len(self.problems)
        lines = [f"{head}: {n} problem{'s' if n > 1 else ''}"] + [f"  {x}" for x in _summed_up(self.problems)]
        return "\n".join(lines + [f"checked {checked}"] + ([f"hint: {self.hint}"] if self.hint else []))


def _summed_up(problems: list[Problem]) -> list[str]:
    """One line per problem, but one line for all problems of a (kind, what) with more than LISTED of them:
    608 missing inputs are one fact (the corpus moved), not a screenful."""
    groups: dict[tuple, list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.kind, p.what), []).append(p)
    lines = []
    for p in problems:
        g = groups[p.kind, p.what]
        if len(g) <= LISTED:
            lines.append(p.line())
        elif p is g[0]:
            lines.append(f"{p.kind:<9} {len(g):,} files {p.what}: {', '.join(q.path for q in g[:3])} and "
                         f"{len(g) - 3:,} more (--json lists each)")
    return lines


def verify_build(out: str, inputs_root: str | None = None, check_inputs: bool = True) -> Report:
    info = load_build(out)
    try:
        rep = Report(out=out, fingerprint=info["fingerprint"])
        _check_outputs(out, info, rep)
        if check_inputs:
            _check_inputs(info, inputs_root, rep)
    except (KeyError, TypeError, AttributeError) as e:
        raise SptokError(f"{out}/sptok.json: not the description of a build sptok can verify (no {e})") from None
    if info.get("holdout"):
        _check_split(out, info["holdout"], rep)
    return rep


def _check_split(out: str, holdout: dict, rep: Report) -> None:
    """The validation split is part of the build: its files are checked too (its inputs are the build's)."""
    rel = holdout["dir"]
    try:
        sub = verify_build(os.path.join(out, rel), check_inputs=False)
    except SptokError as e:
        rep.problems.append(Problem("split", f"{rel}/", "unreadable", e.message))
        return
    rep.outputs_checked += sub.outputs_checked
    rep.problems += [Problem(p.kind, f"{rel}/{p.path}", p.what, p.detail) for p in sub.problems]
    if sub.fingerprint != holdout["fingerprint"]:
        rep.problems.append(Problem("split", f"{rel}/sptok.json", "mismatch", f"fingerprint {sub.fingerprint[:12]}, "
                                    f"the build's sptok.json says {holdout['fingerprint'][:12]}"))


# --------------------------------------------------------------------------------------------- outputs

def _check_outputs(out: str, info: dict, rep: Report) -> None:
    fmt = info["format"]
    indexes = {}
    for src in info["manifest"]["sources"]:
        name = src["name"]
        index_name = layout.index_name(fmt)
        index_rel = f"{name}/{index_name}"
        if not os.path.isdir(os.path.join(out, name)):
            rep.problems.append(Problem("shard", f"{name}/", "missing", f"the directory of source {name!r} is gone"))
            continue
        try:
            entries = layout.read_index(os.path.join(out, name), fmt)
            if not isinstance(entries, list) or not all(_entry_ok(e, fmt) for e in entries):
                raise ValueError("an entry lacks its basename, bytes, hashes.xxh64 or samples")
        except FileNotFoundError:
            rep.problems.append(Problem("index", index_rel, "missing", f"the list of {name}'s files and their hashes "
                                                                       f"is gone"))
            continue
        except (OSError, ValueError, KeyError, TypeError) as e:
            rep.problems.append(Problem("index", index_rel, "corrupt", f"cannot read it ({e})"))
            continue
        for e in entries:
            rep.outputs_checked += 1
            if fmt == "mds":
                _check_mds_shard(out, name, e, rep)
            else:
                _check_file(out, f"{name}/{e['basename']}", e["bytes"], e["hashes"]["xxh64"], index_rel, rep)
        indexes[name] = entries
        samples = sum(e["samples"] for e in entries)
        want = info.get("counts", {}).get(name, {}).get("samples")
        if want is not None and samples != want:
            rep.problems.append(Problem("index", index_rel, "mismatch",
                                        f"lists {samples} samples, sptok.json counts {want}"))
        # streaming decompresses a shard it reads into `shard.N.mds` beside it: a listed file too
        listed = {e[part]["basename"] for e in entries for part in ("zip_data", "raw_data")} if fmt == "mds" \
            else {e["basename"] for e in entries}
        pattern = layout.data_file_pattern(fmt)
        sdir = os.path.join(out, name)
        for extra in sorted(set(os.listdir(sdir)) - listed if os.path.isdir(sdir) else ()):
            if pattern.match(extra):
                rep.problems.append(Problem("shard", f"{name}/{extra}", "unlisted",
                                            f"a data file that {index_name} does not list (not written by this build)"))
    if fmt == "mds":
        _check_merged_index(out, indexes, rep)
    if info["options"].get("metadata"):
        for name in indexes:
            _check_meta_spans(out, name, fmt, int(info["eos"]["id"]), rep)
    _check_tokenizer(out, info, rep)
    _check_rejects(out, [s["name"] for s in info["manifest"]["sources"]], rep)


def _check_meta_spans(out: str, name: str, fmt: str, eos_id: int, rep: Report) -> None:
    """In a build with metadata, every sample's ``meta_spans``: pairs inside the sample, sorted and apart, on
    no SP and no EOS token (metadata is text before a document's text). Reads every sample of the source."""
    from .shards import ShardReader, as_arrays

    try:
        reader = ShardReader(os.path.join(out, name), fmt)
        for i in range(len(reader)):
            s = as_arrays(reader[i])
            why = meta_spans_problem(s["meta_spans"], s["input_ids"], s["sp_positions"], eos_id)
            if why:
                rep.problems.append(Problem("shard", f"{name}/", "corrupt", f"sample {i}: meta_spans {why}"))
                return
    except (SptokError, OSError, ValueError, KeyError, IndexError, AssertionError) as e:
        rep.problems.append(Problem("shard", f"{name}/", "corrupt", f"cannot read its samples' meta_spans ({e})"))


def meta_spans_problem(spans, ids, sp_positions, eos_id: int) -> str | None:
    """What is wrong with one sample's metadata spans (int64 (k, 2)), or None."""
    import numpy as np

    if not len(spans):
        return None
    starts, ends = spans[:, 0], spans[:, 1]
    if starts.min() < 0 or ends.max() > len(ids) or np.any(ends <= starts):
        return f"holds a span outside the sample of {len(ids)} tokens, or empty: {spans.tolist()[:4]}"
    if np.any(starts[1:] < ends[:-1]):
        return "are not sorted and apart"
    inside = np.zeros(len(ids) + 1, np.int64)
    np.add.at(inside, starts, 1)
    np.add.at(inside, ends, -1)
    covered = np.cumsum(inside[:-1]) > 0
    if covered[np.asarray(sp_positions, np.int64)].any() or (covered & (ids == eos_id)).any():
        return "cover an SP or EOS token"
    return None


def _check_merged_index(out: str, indexes: dict[str, list], rep: Report) -> None:
    top = layout.MDS_INDEX
    try:
        entries = layout.read_index(out, "mds")
    except (OSError, ValueError, KeyError, TypeError) as e:
        rep.problems.append(Problem("index", top, "corrupt", f"cannot read the merged index ({e})"))
        return
    if entries != layout.merged_index(indexes):
        rep.problems.append(Problem("index", top, "mismatch",
                                    f"the merged index differs from the per-source {top} files"))


def _entry_ok(e, fmt: str) -> bool:
    """Whether an index entry has what the checks read (a hand-edited index must not crash them)."""
    if not isinstance(e, dict):
        return False
    parts = [e.get("zip_data"), e.get("raw_data")] if fmt == "mds" else [e]
    return isinstance(e.get("samples"), int) and all(
        isinstance(p, dict) and isinstance(p.get("basename"), str) and isinstance(p.get("bytes"), int)
        and isinstance(p.get("hashes"), dict) and isinstance(p["hashes"].get("xxh64"), str) for p in parts)


def _check_mds_shard(out: str, name: str, e: dict, rep: Report) -> None:
    import xxhash
    import zstandard

    rel = f"{name}/{e['zip_data']['basename']}"
    index_rel = f"{name}/index.json"
    if not _check_file(out, rel, e["zip_data"]["bytes"], e["zip_data"]["hashes"]["xxh64"], index_rel, rep):
        return
    raw = e["raw_data"]
    h, n = xxhash.xxh64(), 0
    try:
        with open(os.path.join(out, rel), "rb") as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            for block in iter(lambda: reader.read(CHUNK), b""):
                h.update(block)
                n += len(block)
    except zstandard.ZstdError as err:
        rep.problems.append(Problem("shard", rel, "corrupt", f"does not decompress ({err})"))
        return
    if n != raw["bytes"] or h.hexdigest() != raw["hashes"]["xxh64"]:
        rep.problems.append(Problem("shard", rel, "mismatch",
                                    f"decompresses to {n:,} bytes with xxh64 {h.hexdigest()}, {index_rel} says "
                                    f"{raw['bytes']:,} bytes with xxh64 {raw['hashes']['xxh64']}"))
    raw_rel = f"{name}/{raw['basename']}"
    if os.path.exists(os.path.join(out, raw_rel)):
        # the decompressed copy streaming made when the build was read: it is what streaming reads from now on
        rep.outputs_checked += 1
        _check_file(out, raw_rel, raw["bytes"], raw["hashes"]["xxh64"], index_rel, rep,
                    note="streaming's decompressed copy of the shard, read instead of it")


def _check_file(out: str, rel: str, size: int, xxh64: str, index_rel: str, rep: Report, note: str = "",
                kind: str = "shard") -> bool:
    path = os.path.join(out, rel)
    if not os.path.exists(path):
        rep.problems.append(Problem(kind, rel, "missing", f"listed in {index_rel}, not on disk"))
        return False
    got_size = os.path.getsize(path)
    got = file_xxh64(path)
    if got_size != size or got != xxh64:
        sizes = f"{got_size:,} bytes, {index_rel} says {size:,}; " if got_size != size else ""
        what = f" ({note})" if note else ""
        rep.problems.append(Problem(kind, rel, "changed", f"{sizes}xxh64 {got} differs from {index_rel}'s "
                                                             f"{xxh64} (modified after the build){what}"))
        return False
    return True


def _check_rejects(out: str, names: list[str], rep: Report) -> None:
    """Each quarantine file against stats.json: the size and xxh64 the build recorded (builds before that was
    recorded: none), and its number of records against the rejected count, so a cut, deleted or replaced
    file cannot hide skipped records."""
    from .rejects import read_quarantine

    try:
        stats = layout.read_json(os.path.join(out, layout.STATS))["sources"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        rep.problems.append(Problem("stats", layout.STATS, "corrupt", f"cannot read it ({e})"))
        return
    for name in names:
        rel = os.path.relpath(layout.rejects_path(out, name), out)
        s = stats.get(name, {})
        want = sum(s.get("rejected", {}).values())
        recorded = s.get("rejects_file")
        if not os.path.exists(os.path.join(out, rel)):
            if want or recorded:
                rep.problems.append(Problem("rejects", rel, "missing", f"stats.json counts {want} rejected records "
                                                                       f"of source {name!r}"))
            continue
        rep.outputs_checked += 1
        if recorded and not _check_file(out, rel, recorded["bytes"], recorded["xxh64"], layout.STATS, rep,
                                        kind="rejects"):
            continue
        try:
            n = sum(1 for _ in read_quarantine(os.path.join(out, rel)))
        except SptokError as e:
            rep.problems.append(Problem("rejects", rel, "corrupt", e.message.split(": ", 1)[-1]))
            continue
        if n != want:
            rep.problems.append(Problem("rejects", rel, "mismatch", f"holds {n} records, stats.json counts {want} "
                                                                    f"rejected records of source {name!r}"))


def _check_tokenizer(out: str, info: dict, rep: Report) -> None:
    from tokenizers import Tokenizer

    rel = f"{layout.TOKENIZER}/{layout.TOKENIZER_JSON}"
    rep.outputs_checked += 1
    try:
        tok = Tokenizer.from_file(os.path.join(out, rel))
    except Exception as e:  # tokenizers raises a bare Exception
        rep.problems.append(Problem("tokenizer", rel, "corrupt", f"cannot be loaded ({e})"))
        return
    got = hashlib.sha256(tok.to_str().encode()).hexdigest()
    if got != info["tokenizer"]["sha256"]:
        rep.problems.append(Problem("tokenizer", rel, "changed", f"sha256 {got[:12]} differs from sptok.json's "
                                                                 f"{info['tokenizer']['sha256'][:12]}"))


# ---------------------------------------------------------------------------------------------- inputs

def _check_inputs(info: dict, inputs_root: str | None, rep: Report) -> None:
    recorded_root = info["manifest"].get("root")
    root = os.path.abspath(inputs_root) if inputs_root else recorded_root
    if not root:
        rep.problems.append(Problem("manifest", info["manifest"].get("path", "?"), "missing",
                                    "sptok.json does not record where the manifest was (an older build); pass "
                                    "--inputs DIR, the manifest's directory"))
        return
    hashed = bool(info["options"].get("hash_inputs"))
    rep.inputs_mode = "xxh64 of the content" if hashed else "size + mtime"
    recorded = {r[0]: r for r in info["inputs"]}
    rep.inputs_checked = len(recorded)
    for rel, old in recorded.items():
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            rep.problems.append(Problem("input", rel, "missing", f"read by the build, now gone ({path})"))
            continue
        try:
            new = input_row(path, rel, hashed)
        except OSError as e:
            rep.problems.append(Problem("input", rel, "unreadable", f"{e.strerror} ({path})"))
            continue
        if new != list(old):
            rep.problems.append(Problem("input", rel, "changed", _describe_change(old, new)))
    gone = sum(p.kind == "input" and p.what == "missing" for p in rep.problems)
    if gone and not inputs_root:
        rep.hint = (f"{gone:,} of {len(recorded):,} input files are gone from {root}; if the corpus moved, "
                    f"pass --inputs DIR, the manifest's directory now")
    _check_manifest(info, root, recorded, rep)
    _check_base_tokenizer(info, root, recorded_root, rep)


def _describe_change(old: list, new: list) -> str:
    parts = []
    if old[1] != new[1]:
        parts.append(f"size {old[1]:,} -> {new[1]:,} bytes")
    if isinstance(old[2], str):
        if old[2] != new[2]:
            parts.append(f"content {old[2]} -> {new[2]}")
    elif old[2] != new[2]:
        parts.append(f"modified {_when(old[2])} -> {_when(new[2])}")
        if old[1] == new[1]:
            parts.append("same size: perhaps only touched (build with --hash-inputs to compare content)")
    return "; ".join(parts)


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


def _check_manifest(info: dict, root: str, recorded: dict, rep: Report) -> None:
    """Read the manifest again: an edited source, or a glob or directory that now matches more files,
    makes a build of it differ. Paths are expanded one by one, so a missing file (already reported)
    does not hide a new one elsewhere."""
    name = info["manifest"].get("path") or "manifest"
    mpath = os.path.join(root, name)
    try:
        doc = read_document(mpath)
    except SptokError as e:
        rep.problems.append(Problem("manifest", name, "unreadable", e.message))
        return
    old = {s["name"]: s for s in info["manifest"]["sources"]}
    now = {s["name"]: s for s in doc["sources"]}
    for src in sorted(set(old) ^ set(now)):
        rep.problems.append(Problem("manifest", name, "changed",
                                    f"source {src!r} was {'added' if src in now else 'removed'} since the build"))
    owner: dict[str, str] = {}
    for i, spec in enumerate(doc["sources"]):
        if spec["name"] not in old:
            continue
        a = old[spec["name"]]
        paths = [spec["paths"]] if isinstance(spec["paths"], str) else list(spec["paths"])
        b = {"paths": paths, "text_field": spec.get("text_field", "text"), "id_field": spec.get("id_field"),
             "sp": spec.get("sp"), "weight": float(spec.get("weight", 1.0)),
             "format": FORMAT_ALIASES.get(spec.get("format"), spec.get("format")) or a["format"]}
        diff = [k for k in b if a.get(k) != b[k]]
        if diff:
            rep.problems.append(Problem("manifest", name, "changed", f"source {spec['name']!r}: " + ", ".join(
                f"{k} {a.get(k)!r} -> {b[k]!r}" for k in diff)))
        for path in paths:
            full = os.path.join(root, os.path.expanduser(path))
            if not (expand.match(full) if glob.has_magic(full) else os.path.exists(full)):
                continue   # what it matched at build time is reported missing
            try:
                src = expand_source(mpath, root, i, dict(spec, paths=[path]))
            except SptokError as e:
                rep.problems.append(Problem("manifest", name, "unreadable", e.message))
                continue
            for f in source_files(src):
                owner.setdefault(os.path.relpath(f, root), spec["name"])
    for rel in sorted(set(owner) - set(recorded)):
        rep.problems.append(Problem("input", rel, "new", f"now matched by the paths of source {owner[rel]!r}, "
                                                         f"not read by the build"))


def _check_base_tokenizer(info: dict, root: str, recorded_root: str | None, rep: Report) -> None:
    base, want = info["tokenizer"].get("base"), info["tokenizer"].get("base_sha256")
    if not base or not want:
        return
    if recorded_root and root != recorded_root and os.path.commonpath([base, recorded_root]) == recorded_root:
        base = os.path.join(root, os.path.relpath(base, recorded_root))   # moved with the inputs
    shown = os.path.relpath(base, root) if os.path.commonpath([base, root]) == root else base
    if not os.path.exists(base):
        rep.problems.append(Problem("tokenizer", shown, "missing", "the tokenizer the build started from is gone"))
        return
    h = hashlib.sha256()
    with open(base, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    if h.hexdigest() != want:
        rep.problems.append(Problem("tokenizer", shown, "changed",
                                    f"sha256 {h.hexdigest()[:12]} differs from the build's {want[:12]}"))

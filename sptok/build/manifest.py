"""Load and validate a source manifest, expand its paths, and plan work units.

A manifest (YAML or JSON, schema in ``schemas/manifest.schema.json``) lists the sources of a corpus and
optional build defaults. Planning turns it into an ordered list of ``Unit``s: the order, and where one
unit ends, depend only on the input files and ``unit_size``, never on the number of workers, so the
output of a build is the same for any worker count.
"""

from __future__ import annotations

import difflib
import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import expand
from .compression import sniff_file, strip_extension
from ..errors import SptokError, shown
from ..layout import TOP_LEVEL
from ..yamlfile import load_yaml



@dataclass(frozen=True)
class Source:
    name: str
    source_id: int          # position in the manifest: the id written to every sample
    paths: tuple[str, ...]  # as written in the manifest
    files: tuple[str, ...]  # expanded, absolute, sorted
    format: str
    text_field: str = "text"
    id_field: str | None = None
    sp: str | None = None
    weight: float = 1.0
    links_outside: bool = False   # read files that symlinks found in a walk or glob lead out of its directory
    metadata: dict | bool | None = None   # its `metadata:` as written (options.resolve_metadata completes it)


@dataclass
class Manifest:
    path: str                 # the manifest file
    root: str                 # directory relative paths are resolved against
    sources: list[Source]
    build: dict = field(default_factory=dict)   # build defaults (CLI flags override)
    raw: dict = field(default_factory=dict)     # the document as loaded

    def relpath(self, path: str) -> str:
        """A file's name relative to the manifest: stable across machines, used in doc keys and messages."""
        return os.path.relpath(path, self.root)


@dataclass(frozen=True)
class Unit:
    """One independent piece of input work, processed by one worker and committed atomically."""
    index: int              # position in the plan, which is also the output order
    source: str
    source_id: int
    format: str
    path: str               # absolute path of the file (text format: first file of the group)
    relpath: str
    start: int = 0          # jsonl: first byte; parquet: first row group
    stop: int = -1          # exclusive; -1 means to the end
    files: tuple[tuple[str, str], ...] = ()   # text format: (path, relpath) of each file
    size: int = 0           # input bytes, for scheduling and progress

    def to_json(self) -> dict:
        return {"index": self.index, "source": self.source, "format": self.format, "file": self.relpath,
                "start": self.start, "stop": self.stop, "files": [r for _, r in self.files], "size": self.size}


# ---------------------------------------------------------------------------------------------- loading

def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read, validate and expand a manifest; every problem is a SptokError naming the key."""
    path = str(path)
    doc = read_document(path)
    root = os.path.dirname(os.path.abspath(path))
    names: dict[str, int] = {}
    sources = []
    for i, s in enumerate(doc["sources"]):
        if s["name"] in names:
            raise SptokError(f"manifest {path}: sources[{i}].name: duplicate source name {s['name']!r} "
                             f"(also sources[{names[s['name']]}]); every source needs a unique name")
        if s["name"] in TOP_LEVEL:
            raise SptokError(f"manifest {path}: sources[{i}].name: {s['name']!r} is reserved (the output directory "
                             f"has a file or folder of that name); choose another name")
        names[s["name"]] = i
        sources.append(expand_source(path, root, i, s))
    return Manifest(path=path, root=root, sources=sources, build=dict(doc.get("build") or {}), raw=doc)


def read_document(path: str) -> dict:
    """The manifest document, parsed and validated against the schema, its paths not yet expanded."""
    if not os.path.exists(path):
        raise SptokError(f"manifest not found: {path}")
    if os.path.isdir(path):
        raise SptokError(f"manifest {path} is a directory; expected a .yaml or .json file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SptokError(f"cannot read manifest {path}: {e.strerror}") from None
    doc = _parse(path, data)
    validate_document(doc, "manifest.schema.json", what=f"manifest {path}")
    return doc


def _parse(path: str, data: bytes) -> dict:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SptokError(f"manifest {path}: not valid UTF-8 (byte {e.start})") from None
    if path.endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise SptokError(f"manifest {path} line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
        except RecursionError:
            raise SptokError(f"manifest {path}: invalid JSON: nested too deeply to read") from None
    else:
        doc = load_yaml(text, f"manifest {path}")
    if not isinstance(doc, dict):
        raise SptokError(f"manifest {path}: expected a mapping with a `sources:` list at the top, "
                         f"got {type(doc).__name__}")
    return doc


def schema_path(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "schemas" / name


def validate_document(doc, schema_name: str, what: str) -> None:
    """Validate against one of ``schemas/``; every problem is named at once, each by its key path, with
    what was expected (a misspelt key gets its likely spelling, a pattern its meaning from the schema)."""
    import jsonschema

    schema = json.loads(schema_path(schema_name).read_text())
    base = jsonschema.Draft202012Validator
    # YAML reads .nan and .inf as numbers, and every bound lets NaN through: no key means them
    finite = base.TYPE_CHECKER.redefine(
        "number", lambda checker, x: base.TYPE_CHECKER.is_type(x, "number") and math.isfinite(x))
    validator = jsonschema.validators.extend(base, type_checker=finite)
    errors = sorted(validator(schema).iter_errors(doc),
                    key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if not errors:
        return
    meant: set[tuple[str, str]] = set()   # (key path, key) that a misspelt key stands for
    lines = []
    for err in errors:
        key = _key_path(err.absolute_path) or "(top level)"
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            for k in sorted(set(err.instance) - set(allowed)):
                close = difflib.get_close_matches(k, allowed, n=1, cutoff=0.6)
                meant.update((key, c) for c in close)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                lines.append((key, f"{key}: unknown key {k!r}{hint}; allowed keys: {', '.join(allowed)}"))
        elif err.validator == "required":
            for k in (r for r in err.validator_value if r not in err.instance):
                lines.append((key, k, f"{key}: missing key {k!r}"))
        else:
            lines.append((key, f"{key}: {_what_failed(err)}"))
    # a missing key explained by a misspelt one is not a second problem
    lines = [ln[-1] for ln in lines if not (len(ln) == 3 and (ln[0], ln[1]) in meant)]
    lines = list(dict.fromkeys(lines))
    if len(lines) == 1:
        raise SptokError(f"{what}: {lines[0]}")
    raise SptokError(f"{what}: {len(lines)} problems:\n" + "\n".join(f"  {ln}" for ln in lines))


# a number YAML 1.1 reads as text: an exponent without a dot in the mantissa (1e-3)
_YAML_TEXT_NUMBER = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")


def _what_failed(err) -> str:
    if err.validator in ("oneOf", "anyOf") and err.context:
        import jsonschema

        return _what_failed(jsonschema.exceptions.best_match(err.context))
    if err.validator == "type" and isinstance(err.instance, float) and not math.isfinite(err.instance):
        return f"{err.instance} is not a finite number"
    if err.validator == "type" and isinstance(err.instance, str) and _YAML_TEXT_NUMBER.match(err.instance):
        mantissa, exponent = re.split("[eE]", err.instance)
        value = float(err.instance)
        meant = int(value) if err.validator_value == "integer" and value.is_integer() else f"{mantissa}.0e{exponent}"
        return f"{err.instance!r} is text to YAML, not a number: write {meant}"
    if err.validator == "enum":
        return f"{shown(err.instance)} is not one of {', '.join(map(str, err.validator_value))}"
    if err.validator == "maxLength":
        return f"{shown(err.instance)} is longer than {err.validator_value} characters"
    if "errorMessage" in err.schema:   # the schema says what the pattern or bound means, and why
        return f"{shown(err.instance)}: {err.schema['errorMessage']}"
    full = repr(err.instance)           # jsonschema's messages open with the whole value
    return shown(err.instance) + err.message[len(full):] if err.message.startswith(full) else err.message


def _key_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def expand_source(mpath: str, root: str, i: int, s: dict) -> Source:
    key = f"manifest {mpath}: sources[{i}] ({s['name']})"
    paths = [s["paths"]] if isinstance(s["paths"], str) else list(s["paths"])
    fmt = s.get("format")
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    files: list[str] = []
    outside = bool(s.get("links_outside"))
    where = lambda f: f"{key}: paths: {os.path.relpath(f, root)}"   # noqa: E731
    for p in paths:
        full = os.path.join(root, os.path.expanduser(p))
        if glob.has_magic(full):
            found = [m for m in expand.match(full) if os.path.isfile(m) or _is_hf_dir(m) or not os.path.exists(m)]
            matches = expand.unique_inside(found, expand.split_glob(full)[0], outside, where)
            if not matches:
                raise SptokError(f"{key}: paths: no files match {p!r} (resolved to {full})")
        elif os.path.isdir(full):
            if fmt == "hf" or (fmt is None and _is_hf_dir(full)):
                matches = [full]
            else:
                matches = expand.unique_inside(list(expand.walk(full)), full, outside, where)
                if fmt is None:
                    matches = [m for m in matches if _infer_format(m) is not None]
                if not matches:
                    raise SptokError(f"{key}: paths: directory {p!r} holds no input files")
        elif os.path.exists(full):
            matches = [full]
        else:
            raise SptokError(f"{key}: paths: file not found: {p!r} (resolved to {full})")
        files.extend(os.path.abspath(m) for m in matches)
    files = _once(files)
    if fmt is None:
        inferred = {f: _infer_format(f) for f in files}
        unknown = [f for f, v in inferred.items() if v is None]
        if unknown:
            raise SptokError(f"{key}: cannot infer the format of {os.path.relpath(unknown[0], root)}; "
                             f"set format: to one of {', '.join(format_names())}")
        kinds = set(inferred.values())
        if len(kinds) > 1:
            raise SptokError(f"{key}: files of several formats ({', '.join(sorted(kinds))}); "
                             f"split them into sources or set format:")
        fmt = kinds.pop()
    for f in files:
        if fmt != "hf" and not os.path.isfile(f):   # a read of a pipe or a device would wait, or never end
            raise SptokError(f"{key}: {os.path.relpath(f, root)} is not a regular file (a pipe, device or socket); "
                             f"sptok reads every input more than once and by byte ranges: save it to a file first")
        if not os.access(f, os.R_OK):
            raise SptokError(f"{key}: cannot read {os.path.relpath(f, root)} (permission denied)")
        if fmt == "hf" and not _is_hf_dir(f):
            raise SptokError(f"{key}: {os.path.relpath(f, root)} is not a `datasets` directory "
                             f"saved with save_to_disk (no state.json)")
    return Source(name=s["name"], source_id=i, paths=tuple(paths), files=tuple(files), format=fmt,
                  text_field=s.get("text_field", "text"), id_field=s.get("id_field"), sp=s.get("sp"),
                  weight=float(s.get("weight", 1.0)), links_outside=outside, metadata=s.get("metadata"))


def _once(files: list[str]) -> list[str]:
    """Sorted, each real file once (under its first path): two paths to one file are one input."""
    firsts: dict[str, str] = {}
    for f in sorted(files):
        firsts.setdefault(os.path.realpath(f), f)
    return sorted(firsts.values())


def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json"))


def _infer_format(path: str) -> str | None:
    if _is_hf_dir(path):
        return "hf"
    return _EXT_FORMAT.get(os.path.splitext(strip_extension(path.lower()))[1])


# ---------------------------------------------------------------------------------------------- planning

def plan_units(manifest: Manifest, unit_size: int) -> list[Unit]:
    """Split every source into units of about ``unit_size`` input bytes, in manifest then file order."""
    units: list[Unit] = []
    for src in manifest.sources:
        for kw in FORMATS[src.format].plan(src, manifest.relpath, unit_size):
            units.append(Unit(index=len(units), source=src.name, source_id=src.source_id, format=src.format, **kw))
    return units


def _plan_text(src: Source, relpath, unit_size: int) -> Iterator[dict]:
    """Text files, one document each, grouped into units of about ``unit_size`` bytes."""
    group: list[tuple[str, str]] = []
    size = 0
    for f in src.files:
        group.append((f, relpath(f)))
        size += os.path.getsize(f)
        if size >= unit_size:
            yield dict(path=group[0][0], relpath=group[0][1], files=tuple(group), size=size)
            group, size = [], 0
    if group:
        yield dict(path=group[0][0], relpath=group[0][1], files=tuple(group), size=size)


def _plan_jsonl(src: Source, relpath, unit_size: int) -> Iterator[dict]:
    """Byte ranges of ``unit_size`` (a line belongs to the unit holding its first byte); a compressed file whole."""
    for f in src.files:
        rel, size = relpath(f), os.path.getsize(f)
        if sniff_file(f) or size <= unit_size:
            yield dict(path=f, relpath=rel, start=0, stop=-1, size=size)
            continue
        for a in range(0, size, unit_size):
            yield dict(path=f, relpath=rel, start=a, stop=min(a + unit_size, size), size=min(unit_size, size - a))


def _plan_parquet(src: Source, relpath, unit_size: int) -> Iterator[dict]:
    """Groups of row groups of about ``unit_size`` bytes."""
    for f in src.files:
        rel = relpath(f)
        for a, b, size in _parquet_groups(f, rel, unit_size):
            yield dict(path=f, relpath=rel, start=a, stop=b, size=size)


def _plan_hf(src: Source, relpath, unit_size: int) -> Iterator[dict]:
    """Each Arrow file of a `datasets` directory."""
    for f in src.files:
        for arrow_file in _hf_arrow_files(f):
            yield dict(path=arrow_file, relpath=relpath(arrow_file), size=os.path.getsize(arrow_file))


def _parquet_groups(path: str, rel: str, unit_size: int):
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises several types for a bad file
        raise SptokError(f"{rel}: not a readable Parquet file ({e})") from None
    start, size = 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= unit_size:
            yield start, g + 1, size
            start, size = g + 1, 0
    if start < meta.num_row_groups or meta.num_row_groups == 0:
        yield start, meta.num_row_groups, size


def _hf_arrow_files(path: str) -> list[str]:
    try:
        state = json.loads(Path(path, "state.json").read_text())
        names = [d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SptokError(f"{path}/state.json: not a `datasets` save_to_disk state file ({e})") from None
    files = [os.path.join(path, n) for n in names]
    for f in files:
        if not os.path.exists(f):
            raise SptokError(f"{path}: state.json lists {os.path.basename(f)}, which is missing")
    return files


@dataclass(frozen=True)
class InputFormat:
    extensions: tuple[str, ...]     # file endings it is inferred from (after any .gz / .zst / .zstd)
    plan: Callable[[Source, Callable[[str], str], int], Iterator[dict]]   # (source, relpath, unit_size) -> units


# The input formats: a new one needs an entry here, its reader in readers.py (READERS) and its name in
# schemas/manifest.schema.json (tests/test_cli.py holds the schema to this table).
FORMATS = {
    "jsonl": InputFormat((".jsonl", ".json", ".ndjson"), _plan_jsonl),
    "parquet": InputFormat((".parquet", ".pq"), _plan_parquet),
    "text": InputFormat((".txt", ".text", ".md", ".rst"), _plan_text),
    "hf": InputFormat((), _plan_hf),     # a directory written by datasets' save_to_disk (it holds state.json)
}
# `jsonl.gz` / `jsonl.zst` are accepted for readability; compression is detected from magic bytes.
FORMAT_ALIASES = {"jsonl.gz": "jsonl", "jsonl.zst": "jsonl"}
_EXT_FORMAT = {ext: name for name, f in FORMATS.items() for ext in f.extensions}


def format_names() -> list[str]:
    """What `format:` accepts, each format followed by its aliases."""
    return [n for name in FORMATS for n in [name] + [a for a, to in FORMAT_ALIASES.items() if to == name]]


def describe_sources(manifest: Manifest) -> list[dict]:
    """The resolved sources as recorded in sptok.json (and compared on resume)."""
    return [{"name": s.name, "source_id": s.source_id, "format": s.format, "paths": list(s.paths),
             "files": [manifest.relpath(f) for f in s.files], "text_field": s.text_field,
             "id_field": s.id_field, "sp": s.sp, "weight": s.weight,
             **({"links_outside": True} if s.links_outside else {})} for s in manifest.sources]


def input_files(manifest: Manifest) -> list[str]:
    """Every input file, in source then file order."""
    return [p for src in manifest.sources for p in source_files(src)]


def source_files(src: Source) -> list[str]:
    """The files of one source; a `datasets` directory counts with every file in it."""
    out = []
    for f in src.files:
        out += [f] if not os.path.isdir(f) else sorted(os.path.join(d, n) for d, _, ns in os.walk(f) for n in ns)
    return out


def input_fingerprint(manifest: Manifest, hash_inputs: bool = False) -> list[list]:
    """(relative path, size, mtime_ns) of every input file, or (relative path, size, "xxh64:<hex>") with
    ``hash_inputs``: what a resume must find unchanged and what `sptok verify` re-checks. Content hashes
    survive copies and touches but read every byte; size + mtime cost nothing."""
    return [input_row(p, manifest.relpath(p), hash_inputs) for p in input_files(manifest)]


def input_row(path: str, rel: str, hash_inputs: bool) -> list:
    st = os.stat(path)
    return [rel, st.st_size, f"xxh64:{file_xxh64(path)}" if hash_inputs else st.st_mtime_ns]


def file_xxh64(path: str, chunk: int = 8 << 20) -> str:
    """xxh64 of a file's bytes, read in chunks (inputs and shards can be large)."""
    import xxhash

    h = xxhash.xxh64()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()

"""One reader per input format: a unit in, batches of (document key, text, metadata value) out.

Readers never tokenize. Every record they cannot use goes to ``Rejects`` with a reason and its location
(file, line or row, byte), so nothing disappears silently; a truncated archive keeps every record before
the break and records the break itself.
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .compression import sniff
from ..errors import SptokError
from .manifest import Unit

BATCH_BYTES = 1 << 20       # text handed to the tokenizer at once
READ_CHUNK = 4 << 20        # bytes read from a file at once
PROBE_BYTES = 256 << 10     # what the checks before a build read of a unit (``read_prefix``)
FEED_SLICE = 64 << 10      # compressed bytes handed to a decompressor at once
# an escape that may encode a lone surrogate (\ud800-\udfff): one regex pass, 3-4x faster than `b"\\ud" in raw`
# (whose last byte, a common letter, makes bytes.find check most positions)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD]")
REASONS = ("malformed_json", "invalid_utf8", "not_an_object", "missing_field", "non_string_text",
           "empty_text", "invalid_id", "truncated_archive", "non_string_metadata")


@dataclass
class Batch:
    keys: list[str]      # document keys: the id field, or "file:byte" / "file:row" / "file"
    texts: list[str]
    nbytes: int          # input bytes consumed so far in the unit (for progress)
    # with a metadata field: each document's value as found, "" when empty, None when the record has none
    meta: list[str | None] | None = None
    cut: bool = False    # a read of ``limit`` bytes ended before the unit: the last batch, maybe empty


@dataclass
class Rejects:
    """Counts skipped records by reason and hands each one, as found, to ``sink`` (the quarantine)."""
    source: str
    strict: bool = False
    sink: Callable[[dict], None] | None = None
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)   # reason -> first location, for the end-of-build report

    def add(self, reason: str, where: str, detail: str, raw: bytes | None = None, **loc) -> None:
        assert reason in REASONS, reason
        if self.strict:
            raise SptokError(f"{where}: {detail} (--strict stops at the first bad record; drop --strict to "
                             f"skip and count bad records instead)")
        self.counts[reason] += 1
        self.examples.setdefault(reason, f"{where}: {detail}")
        if self.sink is not None:
            rec = {"source": self.source, "reason": reason, "where": where, "detail": detail, **loc}
            if raw is not None:
                try:
                    rec["raw"] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    rec["raw_b64"] = base64.b64encode(raw).decode("ascii")
            self.sink(rec)


def read_unit(unit: Unit, text_field: str, id_field: str | None, rejects: Rejects,
              batch_bytes: int = BATCH_BYTES, limit: int | None = None,
              meta_field: str | None = None) -> Iterator[Batch]:
    """Yield batches of documents of one unit, in file order; with ``limit``, of its first ``limit`` input bytes
    (JSONL and text; a table's first batch is read whole), a record or file cut there giving the start of its
    text where that can be told, and the last batch saying ``cut``. With ``meta_field``, each document's value
    of that field too (a record whose value is not a string is rejected)."""
    for batch in READERS[unit.format](unit, text_field, id_field, rejects, batch_bytes, limit, meta_field):
        if meta_field is not None and batch.meta is None:   # a format without fields: no values
            batch.meta = [None] * len(batch.keys)
        yield batch


def meta_value(rec: dict, meta_field: str):
    """A record's metadata value: the string ("" when empty or blank), None when it has none (no field, or
    null), or the Problem of a value that is not a string."""
    v = rec.get(meta_field)
    if isinstance(v, str) and not _valid_unicode(v):
        return Problem("invalid_utf8", f"field {meta_field!r} (metadata) holds a lone surrogate escape (not valid "
                                       f"UTF-8)")
    if v is None or isinstance(v, str):
        return v if v is None or v.strip() else ""
    return Problem("non_string_metadata", f"field {meta_field!r} (metadata) holds {type(v).__name__}, expected a "
                                          f"string")


def read_prefix(unit: Unit, text_field: str, id_field: str | None, rejects: Rejects,
                nbytes: int = PROBE_BYTES) -> tuple[list[str], bool]:
    """(texts, whole): the documents in about the first ``nbytes`` of ``unit`` (a long one cut short), and whether
    that was all of the unit. What the checks before a build read: they cost the same on a 50 MB document as on
    a small one, and never hold a whole long record."""
    for batch in read_unit(unit, text_field, id_field, rejects, batch_bytes=nbytes, limit=nbytes):
        return batch.texts, not batch.cut and unit.format not in TABLES
    return [], True


# ------------------------------------------------------------------------------------------------ JSONL

def _read_jsonl(unit, text_field, id_field, rejects, batch_bytes, limit=None, meta_field=None):
    keys, texts, size = [], [], 0
    meta = [] if meta_field else None
    lines = _JsonlLines(unit, rejects, limit)
    at_file_start = unit.start == 0
    for offset, local_line, raw in lines:
        if not raw.strip():
            continue  # a blank line is not a record
        first, at_file_start = at_file_start, False
        if lines.cut:   # the read ended inside this record
            text = _text_prefix(raw, text_field)
            if text is None and first:
                _refuse_json_array(unit, raw)
            if text is not None:
                keys.append(f"{unit.relpath}:{offset}")
                texts.append(text)
                if meta is not None:   # the value may lie beyond the cut: not told here
                    meta.append(None)
            break

        def reject(reason, detail, raw):
            n = lines.line_number(local_line)
            rejects.add(reason, f"{unit.relpath} line {n}", detail, raw, file=unit.relpath, line=n, byte=offset)

        encoding = json.detect_encoding(raw)
        try:   # decoded here as json.loads(raw) would, so that the raw line goes before the parse: a long line is
            # held twice at most (as text and as the record's value), not three times
            line = raw.decode(encoding)
            surrogates = not encoding.startswith("utf-8") or (b"\\u" in raw and bool(_SURROGATE_ESCAPE.search(raw)))
        except UnicodeDecodeError:
            try:
                line, surrogates = raw.decode(encoding, "surrogatepass"), True
            except UnicodeDecodeError as e:
                reject("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line", raw)
                continue
        nbytes, raw = len(raw), None
        got = _parse_record(unit, line, first, text_field, id_field, surrogates,
                            lambda reason, detail: reject(reason, detail, line.encode(encoding, "surrogatepass")),
                            meta_field)
        line = None
        if got is None:
            continue
        key, text, value = got
        if meta is not None:
            meta.append(value)
        keys.append(key if key is not None else f"{unit.relpath}:{offset}")
        texts.append(text)
        size += nbytes
        if size >= batch_bytes:
            got = text = None   # a long line is not held here while its batch is processed
            yield Batch(keys, texts, lines.consumed, meta)
            keys, texts, size = [], [], 0
            meta = [] if meta_field else None
    if keys or lines.cut:
        yield Batch(keys, texts, lines.consumed, meta, cut=lines.cut)


def _parse_record(unit, line: str, first: bool, text_field: str, id_field: str | None, surrogates: bool, reject,
                  meta_field: str | None = None):
    """(key or None, text, metadata value or None) of one JSONL line, or None when it is rejected (through
    ``reject(reason, detail)``). ``surrogates``: whether the line may decode to a lone surrogate (else its text is
    not searched for one)."""
    try:
        rec = json.loads(line)
    except ValueError as e:
        if first:
            _refuse_json_array(unit, line)
        col = f" (column {e.colno})" if hasattr(e, "colno") else ""
        reject("malformed_json", f"malformed JSON: {getattr(e, 'msg', e)}{col}")
        return None
    except RecursionError:   # the decoder recurses per level: a record nested too deeply is malformed for us
        reject("malformed_json", "malformed JSON: nested too deeply to read")
        return None
    if first and isinstance(rec, list):
        _refuse_json_array(unit, line)
    got = check_record(rec, text_field, id_field, surrogates)
    if isinstance(got, Problem):
        reject(got.reason, got.detail)
        return None
    value = meta_value(rec, meta_field) if meta_field else None
    if isinstance(value, Problem):
        reject(value.reason, value.detail)
        return None
    return (*got, value)


_SPACE = re.compile(r"[ \t\n\r]*")   # JSON's whitespace


def _text_prefix(raw: bytes, text_field: str) -> str | None:
    """The start of the text of a JSON record of which ``raw`` holds only the start (a read cut it), or None
    where that start cannot be told: the record is no object, its text field lies beyond ``raw``, or what it
    holds there is not a usable text."""
    try:
        line = codecs.getincrementaldecoder("utf-8")("surrogatepass").decode(raw, final=False)
        i = _SPACE.match(line).end()
        if line[i:i + 1] != "{":
            return None
        while True:
            i = _SPACE.match(line, i + 1).end()
            if line[i:i + 1] != '"':
                return None
            key, i = json.decoder.scanstring(line, i + 1)
            i = _SPACE.match(line, i).end()
            if line[i:i + 1] != ":":
                return None
            i = _SPACE.match(line, i + 1).end()
            if key == text_field:
                break
            _, i = json.JSONDecoder().raw_decode(line, i)
            i = _SPACE.match(line, i).end()
            if line[i:i + 1] != ",":
                return None
    except ValueError:   # malformed JSON or UTF-8 before the text: the reader will say so
        return None
    if line[i:i + 1] != '"':
        return None
    text = _string_start(line[i + 1:])
    if text and "\ud800" <= text[-1] <= "\udbff":   # half of a pair cut in two
        text = text[:-1]
    if not text or text.isspace() or not _valid_unicode(text):   # may hold more, or be rejected: not told here
        return None
    return text


def _string_start(body: str) -> str | None:
    """The decoded start of a JSON string of which ``body`` holds the part after the opening quote, cut anywhere
    (in an escape too: up to 12 characters are dropped until the rest decodes)."""
    for end in range(len(body), max(len(body) - 12, -1), -1):
        try:
            return json.decoder.scanstring(body[:end] + '"', 0)[0]
        except ValueError:
            continue
    return None


def starts_a_record(unit: Unit) -> bool:
    """Whether a unit may hold a record: false only for a byte range of a JSONL file that lies inside one line
    (which belongs to an earlier unit). Reads from the unit's start to the first newline."""
    if unit.format != "jsonl" or unit.start == 0:
        return True
    with open(unit.path, "rb") as f:
        f.seek(unit.start - 1)   # as _JsonlLines: a newline just before the start begins a line at the start
        pos = unit.start - 1
        while pos < unit.stop:
            chunk = f.read(min(READ_CHUNK, unit.stop - pos))
            if not chunk:
                return False
            nl = chunk.find(b"\n")
            if nl >= 0:
                return pos + nl + 1 < unit.stop
            pos += len(chunk)
    return False


def _refuse_json_array(unit, line: str | bytes) -> None:
    """A file whose first record opens a JSON array is a JSON document, not JSON Lines: say so once, rather
    than reject each of its lines with a parse error."""
    if line.lstrip(" \t\n\r\x0b\x0c" if isinstance(line, str) else None)[:1] in ("[", b"["):
        raise SptokError(f"{unit.relpath}: holds a JSON array, not JSON Lines (one object per line); convert it, "
                         f"e.g. `jq -c '.[]' {os.path.basename(unit.relpath)} > records.jsonl`, and list that file")


class _JsonlLines:
    """(byte offset, line index in the unit, raw line) of every line whose first byte lies in the unit.

    A byte-range unit [start, stop) skips the line that began before ``start`` (the previous unit owns
    it) and reads past ``stop`` to finish its own last line. Compressed files are one unit each.
    """

    def __init__(self, unit: Unit, rejects: Rejects, limit: int | None = None):
        self.unit = unit
        self.rejects = rejects
        self.limit = limit              # read at most about this many bytes
        self.cut = False                # the limit ended the read: the last line yielded may be cut short
        self.consumed = 0               # bytes read so far, for progress
        self._base: int | None = 0 if unit.start == 0 else None
        self._first = unit.start     # file offset of the unit's first line

    def __iter__(self) -> Iterator[tuple[int, int, bytes]]:
        unit = self.unit
        with open(unit.path, "rb") as f:
            magic = f.read(4)
            f.seek(0)
            skip_first, stop, pos = False, None, 0
            if sniff(magic):
                chunks = _Decompressed(f, magic)
            else:
                if unit.start > 0:   # start one byte early: if that byte is a newline, nothing is skipped
                    f.seek(unit.start - 1)
                    pos, skip_first = unit.start - 1, True
                stop = unit.stop if unit.stop >= 0 else None
                chunks = iter(lambda: f.read(READ_CHUNK if self.limit is None else self.limit), b"")
            buf, idx, held = b"", 0, []
            for chunk in chunks:
                if self.limit is not None and self.consumed >= self.limit:
                    self.cut = True
                    break
                self.consumed += len(chunk)
                if skip_first:   # the line that began before the unit: passed over, never held
                    nl = chunk.find(b"\n")
                    if nl < 0:
                        pos += len(chunk)
                        continue
                    pos, chunk, skip_first = pos + nl + 1, chunk[nl + 1:], False
                    self._first = pos
                    if stop is not None and pos >= stop:
                        return
                if b"\n" not in chunk:   # a long line: its chunks are joined once, when it ends (not re-copied)
                    held.append(chunk)
                    continue
                if held:
                    nl = chunk.index(b"\n")
                    lines = [b"".join([buf, *held, chunk[:nl]]), *chunk[nl + 1:].split(b"\n")]
                    held = []
                else:
                    lines = (buf + chunk).split(b"\n")
                if pos == 0 and lines[0].startswith(b"\xef\xbb\xbf"):
                    pos, lines[0] = 3, lines[0][3:]
                buf = lines.pop()
                lines.reverse()
                while lines:   # popped as yielded: a long line is not kept while its documents are processed
                    if stop is not None and pos >= stop:
                        return
                    n = len(lines[-1])
                    yield pos, idx, lines.pop()
                    pos += n + 1
                    idx += 1
                if stop is not None and pos >= stop:
                    return
            buf = b"".join([buf, *held])
            if self.cut and (skip_first or (stop is not None and pos >= stop)):
                return
            if pos == 0 and buf.startswith(b"\xef\xbb\xbf"):   # a file of one line, no newline
                pos, buf = 3, buf[3:]
            broken = getattr(chunks, "broken", None)
            if self.cut:
                if buf:
                    yield pos, idx, buf
            elif broken is not None:   # the partial line before the break belongs to the break
                offset, detail = broken
                self.rejects.add("truncated_archive", f"{unit.relpath} line {idx + 1} (decompressed byte {offset})",
                                 f"{detail}; every complete line before the break was kept", buf or None,
                                 file=unit.relpath, line=idx + 1, byte=offset)
            elif buf and not skip_first and (stop is None or pos < stop):
                yield pos, idx, buf

    def line_number(self, local_line: int) -> int:
        """1-based line number in the file; lines before the unit are counted only when a message needs it."""
        if self._base is None:
            n, left = 0, self._first
            with open(self.unit.path, "rb") as f:
                while left > 0:
                    chunk = f.read(min(READ_CHUNK, left))
                    if not chunk:
                        break
                    n += chunk.count(b"\n")
                    left -= len(chunk)
            self._base = n
        return self._base + local_line + 1


class _Decompressed:
    """The decompressed chunks of a gzip or zstd file (several members / frames). A truncated or corrupt
    archive yields what came before the break and sets ``broken`` to (decompressed offset, why)."""

    def __init__(self, f, magic: bytes):
        self.f, self.gz = f, sniff(magic) == "gzip"
        self.broken: tuple[int, str] | None = None

    def __iter__(self) -> Iterator[bytes]:
        import zstandard

        gz, f = self.gz, self.f
        zctx = None if gz else zstandard.ZstdDecompressor()
        new = (lambda: zlib.decompressobj(wbits=47)) if gz else zctx.decompressobj
        errors = (zlib.error,) if gz else (zstandard.ZstdError,)
        kind = "gzip" if gz else "zstd"
        d, out, fed = new(), 0, False
        for comp in iter(lambda: f.read(READ_CHUNK), b""):
            # fed in slices so that a corrupt block loses at most one slice of what came before it
            for a in range(0, len(comp), FEED_SLICE):
                parts = []   # what the slice gave before a break too (a whole member before trailing garbage)
                try:
                    if d.eof:                        # a member / frame ended exactly at a slice boundary
                        d = new()
                    parts.append(d.decompress(comp[a:a + FEED_SLICE]))
                    fed = True
                    while d.eof and d.unused_data:   # the next gzip member / zstd frame
                        rest = d.unused_data
                        d = new()
                        parts.append(d.decompress(rest))
                except errors as e:
                    self.broken = (out + sum(map(len, parts)), f"corrupt {kind} data ({e})")
                    yield b"".join(parts)
                    return
                data = b"".join(parts)
                out += len(data)
                yield data
        if fed and not d.eof:
            self.broken = (out, f"{kind} archive ends in the middle of a {'member' if gz else 'frame'} (truncated)")


@dataclass(frozen=True)
class Problem:
    reason: str
    detail: str


def check_record(rec, text_field: str, id_field: str | None, surrogates: bool = True):
    """(key or None, text) of a parsed JSON record, or the Problem that makes it unusable. ``surrogates=False``:
    its line was valid UTF-8 without a ``\\ud...`` escape, so its text holds no lone surrogate."""
    if not isinstance(rec, dict):
        return Problem("not_an_object", f"expected a JSON object, got {type(rec).__name__}")
    if text_field not in rec:
        return Problem("missing_field", f"no field {text_field!r} (text_field); the record has: "
                                        f"{', '.join(list(rec)[:8]) or 'no fields'}")
    text = rec[text_field]
    if not isinstance(text, str):
        return Problem("non_string_text", f"field {text_field!r} holds {type(text).__name__}, expected a string")
    if not text or text.isspace():
        return Problem("empty_text", f"field {text_field!r} is {_blank(text)}")
    if surrogates and not _valid_unicode(text):
        return Problem("invalid_utf8", f"field {text_field!r} holds a lone surrogate escape (not valid UTF-8)")
    if id_field is None:
        return None, text
    if rec.get(id_field) is None:
        return Problem("missing_field", f"no field {id_field!r} (id_field)")
    key = doc_id(rec[id_field], id_field)
    return key if isinstance(key, Problem) else (key, text)


def doc_id(value, id_field: str):
    """A document id as text, or the Problem with it. Ids are compared as text (``5`` and ``"5"`` are one id, and
    a duplicate is counted); an object, array or boolean is no id."""
    kind = {dict: "an object", list: "an array", bool: "a boolean"}.get(type(value))
    if kind is None:
        return value if isinstance(value, str) else str(value)
    return Problem("invalid_id", f"field {id_field!r} (id_field) holds {kind}; an id is a string or a number")


def _blank(text: str) -> str:
    """How an unusable text is empty: a whitespace-only document would be just SP, delimiter and EOS."""
    return "empty" if not text else "only whitespace"


def _valid_unicode(text: str) -> bool:
    """Whether ``text`` holds no lone surrogate; a long text is encoded a slice at a time, never whole."""
    if text.isascii():
        return True
    try:
        for i in range(0, len(text), BATCH_BYTES):
            text[i:i + BATCH_BYTES].encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ------------------------------------------------------------------------------- Parquet and HF (Arrow)

def _open_table(unit, columns: list[str], optional: str | None = None):
    """(schema, index of the unit's first row in its file, record batches of ``columns``, then of ``optional``
    where the file has that column, each column once: read them by name) of a table unit."""
    import pyarrow as pa

    def chosen(schema) -> list[str]:   # one column may serve two roles (text_field and id_field)
        wanted = columns + [optional] if optional is not None and optional in schema.names else columns
        return list(dict.fromkeys(wanted))

    if unit.format == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(unit.path)
        except Exception as e:
            raise SptokError(f"{unit.relpath}: not a readable Parquet file ({e})") from None
        groups = list(range(unit.start, unit.stop if unit.stop >= 0 else pf.metadata.num_row_groups))
        row0 = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
        return pf.schema_arrow, row0, (pf.iter_batches(row_groups=groups, columns=chosen(pf.schema_arrow),
                                                       batch_size=4096) if groups else iter(()))
    try:
        reader = pa.ipc.open_stream(pa.memory_map(unit.path))
    except Exception as e:
        raise SptokError(f"{unit.relpath}: not a readable Arrow stream file ({e})") from None
    return reader.schema, 0, (b.select(chosen(reader.schema)) for b in reader)


def _read_table(unit, text_field, id_field, rejects, batch_bytes, limit=None, meta_field=None):   # batches read whole
    import pyarrow as pa

    columns = [text_field] + ([id_field] if id_field else [])
    schema, row0, batches = _open_table(unit, columns, meta_field)
    problem = schema_problem(schema, text_field, id_field)
    if problem:
        raise SptokError(f"{unit.relpath}: {problem}")
    has_meta = meta_field is not None and meta_field in schema.names
    keys, texts, size, row = [], [], 0, row0
    meta = [] if meta_field else None
    try:
        for rb in batches:
            col_text = _strings(rb.column(text_field))
            col_id = rb.column(id_field).to_pylist() if id_field else None
            col_meta = rb.column(meta_field).to_pylist() if has_meta else None
            for i, text in enumerate(col_text):
                r = row + i
                where = f"{unit.relpath} row {r}"
                if isinstance(text, _BadUTF8):
                    rejects.add("invalid_utf8", where, f"field {text_field!r}: invalid UTF-8 at byte {text.start}",
                                text.raw, file=unit.relpath, row=r)
                    continue
                if text is _NULL:
                    rejects.add("missing_field", where, f"field {text_field!r} is null", None,
                                file=unit.relpath, row=r)
                    continue
                if not text or text.isspace():
                    rejects.add("empty_text", where, f"field {text_field!r} is {_blank(text)}",
                                text.encode(), file=unit.relpath, row=r)
                    continue
                if meta_field:
                    value = meta_value({meta_field: col_meta[i]}, meta_field) if col_meta is not None else None
                    if isinstance(value, Problem):
                        rejects.add(value.reason, where, value.detail, None, file=unit.relpath, row=r)
                        continue
                if id_field:
                    if col_id[i] is None:
                        rejects.add("missing_field", where, f"field {id_field!r} (id_field) is null", None,
                                    file=unit.relpath, row=r)
                        continue
                    key = doc_id(col_id[i], id_field)
                    if isinstance(key, Problem):
                        rejects.add(key.reason, where, key.detail, None, file=unit.relpath, row=r)
                        continue
                    keys.append(key)
                else:
                    keys.append(f"{unit.relpath}:{r}")
                if meta_field:
                    meta.append(value)
                texts.append(text)
                size += len(text)
                if size >= batch_bytes:
                    yield Batch(keys, texts, 0, meta)
                    keys, texts, size = [], [], 0
                    meta = [] if meta_field else None
            row += rb.num_rows
    except (OSError, pa.ArrowException) as e:
        raise SptokError(f"{unit.relpath} near row {row}: cannot read ({e})") from None
    if keys:
        yield Batch(keys, texts, unit.size, meta)


_NULL = object()


@dataclass(frozen=True)
class _BadUTF8:
    raw: bytes
    start: int


def schema_problem(schema, text_field: str, id_field: str | None) -> str | None:
    """Why a table's columns cannot give documents (a missing field, a text column that is not text), or
    None. Checked for every file before a build writes anything, and again by the reader."""
    import pyarrow as pa

    for c, what in ((text_field, "text_field"), (id_field, "id_field")):
        if c is not None and c not in schema.names:
            return f"no column {c!r} ({what}); columns are: {', '.join(schema.names)}"
    t = schema.field(text_field).type
    if pa.types.is_dictionary(t):   # a pandas categorical column: its values are the strings
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)):
        return f"column {text_field!r} (text_field) has type {schema.field(text_field).type}, expected a string column"
    return None


def table_schema(path: str, fmt: str, relpath: str):
    """The Arrow schema of a Parquet file or a `datasets` Arrow stream file (a format in ``TABLES``), read from
    its header only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.read_schema(path)
        with pa.memory_map(path) as f:
            return pa.ipc.open_stream(f).schema
    except Exception as e:  # pyarrow raises several types for a bad file
        kind = "Parquet file" if fmt == "parquet" else "Arrow stream file"
        raise SptokError(f"{relpath}: not a readable {kind} ({e})") from None


def _strings(arr) -> list:
    """Python strings of an Arrow column; nulls become _NULL, invalid UTF-8 a _BadUTF8 (the caller rejects
    both in row order)."""
    import pyarrow as pa

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            return [_NULL if v is None else v for v in arr.to_pylist()]
        except UnicodeDecodeError:
            arr = arr.cast(pa.large_binary())
    out = []
    for v in arr.to_pylist():
        if v is None:
            out.append(_NULL)
            continue
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError as e:
            out.append(_BadUTF8(v, e.start))
    return out


# ------------------------------------------------------------------------------------------ plain text

def _read_text(unit, text_field, id_field, rejects, batch_bytes, limit=None, meta_field=None):
    """One document per file. A truncated archive keeps the text before the break (and records the
    break), like a truncated JSONL archive keeps its complete lines. With ``limit``, a file is read up to
    the bytes left of it, and the start of its text is its document."""
    keys, texts, size, done, taken = [], [], 0, 0, 0
    for path, rel in unit.files:
        if limit is not None and taken >= limit:
            yield Batch(keys, texts, done, cut=True)
            return
        with open(path, "rb") as f:
            done += os.fstat(f.fileno()).st_size
            magic = f.read(4)
            f.seek(0)
            data, chunks, cut = _read_file(f, magic, None if limit is None else limit - taken)
        taken += len(data)
        broken = getattr(chunks, "broken", None)
        if broken is not None:
            rejects.add("truncated_archive", f"{rel} (decompressed byte {broken[0]})",
                        f"{broken[1]}; the text before the break was kept", None, file=rel, byte=broken[0])
        try:   # after a break or a cut, a character cut in half at the end is dropped, not an error
            text = codecs.getincrementaldecoder("utf-8-sig")().decode(data, final=broken is None and not cut)
        except UnicodeDecodeError as e:
            at = e.start + (3 if data.startswith(codecs.BOM_UTF8) else 0)
            rejects.add("invalid_utf8", f"{rel} byte {at}", f"invalid UTF-8 at byte {at}; file skipped", None,
                        file=rel, byte=at)
            continue
        if cut:   # more of the file follows: its document, if what was read shows it is one
            if text and not text.isspace():
                keys.append(rel)
                texts.append(text)
            yield Batch(keys, texts, done, cut=True)
            return
        if not text or text.isspace():
            what = "no text" if not text else "only whitespace"
            rejects.add("empty_text", rel, f"{what} before the break" if broken else f"{what} in the file", None,
                        file=rel)
            continue
        keys.append(rel)
        texts.append(text)
        size += len(data)
        if size >= batch_bytes:
            data = chunks = text = None   # a long file is not held here while its batch is processed
            yield Batch(keys, texts, done)
            keys, texts, size = [], [], 0
    if keys:
        yield Batch(keys, texts, unit.size)


def _read_file(f, magic: bytes, limit: int | None):
    """(bytes, their source, whether more follows) of a text file, decompressed; ``limit`` bytes of it at most."""
    if not sniff(magic):
        data = f.read() if limit is None else f.read(limit + 1)
        return (data, None, False) if limit is None or len(data) <= limit else (data[:limit], None, True)
    chunks = _Decompressed(f, magic)
    if limit is None:
        return b"".join(chunks), chunks, False
    parts, n = [], 0
    for part in chunks:
        if n >= limit:
            return b"".join(parts), None, True
        parts.append(part)
        n += len(part)
    return b"".join(parts), chunks, False


def iter_texts(unit: Unit, text_field: str, rejects: Rejects) -> Iterator[str]:
    """Just the texts of a unit, skipping bad records (counted in ``rejects``)."""
    for batch in read_unit(unit, text_field, None, rejects):
        yield from batch.texts


# Each input format's reader: (unit, text_field, id_field, rejects, batch_bytes, limit, meta_field) -> batches. A
# new format needs one here, its entry in manifest.FORMATS and its name in the manifest schema.
READERS = {"jsonl": _read_jsonl, "parquet": _read_table, "hf": _read_table, "text": _read_text}
TABLES = ("parquet", "hf")   # formats with columns: their schema is checked for the fields before a build starts

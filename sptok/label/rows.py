"""Rows in and out of `sptok label`: JSONL (plain, .gz, .zst), Parquet and CSV, read in chunks, written with
every input field kept as it was and the new fields after them. The output is written to ``OUT.partial`` and
renamed when complete, so a failed run never leaves a file that looks finished."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator

from ..build.compression import open_decompressed, strip_extension
from ..errors import SptokError

FORMATS = ("jsonl", "parquet", "csv")
_EXT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
        ".csv": "csv"}


def format_of(path: str) -> str | None:
    return _EXT.get(os.path.splitext(strip_extension(path.lower()))[1])


@dataclass
class Chunk:
    rows: list[dict]                      # the input rows as read (Parquet: as Python values)
    where: list[str]                      # "FILE line N" / "FILE row N", for messages
    start: int                            # index of the first row in the input (from 0)
    batch: object = None                  # Parquet input: the Arrow record batch, written back unchanged
    fields: list[str] = field(default_factory=list)   # CSV / Parquet: the columns


def read_chunks(path: str, fmt: str, chunk_rows: int) -> Iterator[Chunk]:
    if not os.path.exists(path):
        raise SptokError(f"--input {path}: no such file")
    if os.path.isdir(path):
        raise SptokError(f"--input {path}: a directory; give one JSONL, Parquet or CSV file")
    try:
        if fmt == "jsonl":
            yield from _jsonl(path, chunk_rows)
        elif fmt == "csv":
            yield from _csv(path, chunk_rows)
        else:
            yield from _parquet(path, chunk_rows)
    except PermissionError as e:
        raise SptokError(f"--input {path}: cannot read it ({e.strerror})") from None


def _jsonl(path: str, chunk_rows: int) -> Iterator[Chunk]:
    import zstandard

    rows, where, start, n = [], [], 0, 0
    with open_decompressed(path) as f:
        lineno = 0
        try:
            for raw in f:
                lineno += 1
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except UnicodeDecodeError:
                    raise SptokError(f"{path} line {lineno}: not UTF-8 text") from None
                except ValueError as e:
                    raise SptokError(f"{path} line {lineno}: malformed JSON ({e})") from None
                if not isinstance(rec, dict):
                    raise SptokError(f"{path} line {lineno}: expected a JSON object, got {type(rec).__name__}")
                rows.append(rec)
                where.append(f"{path} line {lineno}")
                n += 1
                if len(rows) >= chunk_rows:
                    yield Chunk(rows, where, start)
                    rows, where, start = [], [], n
        except (EOFError, OSError, zstandard.ZstdError) as e:   # a truncated or corrupt .gz / .zst, a read error
            if isinstance(e, PermissionError):
                raise
            raise SptokError(f"{path} after line {lineno}: cannot read further ({e})") from None
    if rows:
        yield Chunk(rows, where, start)


def _csv(path: str, chunk_rows: int) -> Iterator[Chunk]:
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    with open_decompressed(path) as b:
        f = io.TextIOWrapper(b, encoding="utf-8-sig", newline="")
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            if len(set(header)) != len(header):
                dup = next(h for h in header if header.count(h) > 1)
                raise SptokError(f"{path} line 1: the header names column {dup!r} twice")
            rows, where, start, n, line = [], [], 0, 0, reader.line_num
            for cells in reader:
                first, line = line + 1, reader.line_num
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise SptokError(f"{path} line {first}: {len(cells)} cells, the header has {len(header)}")
                rows.append(dict(zip(header, cells)))
                where.append(f"{path} line {first}")
                n += 1
                if len(rows) >= chunk_rows:
                    yield Chunk(rows, where, start, fields=header)
                    rows, where, start = [], [], n
        except UnicodeDecodeError:
            raise SptokError(f"{path} line {reader.line_num + 1}: not UTF-8 text") from None
        except csv.Error as e:
            raise SptokError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    if rows:
        yield Chunk(rows, where, start, fields=header)


def _parquet(path: str, chunk_rows: int) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise SptokError(f"--input {path}: not a readable Parquet file ({e})") from None
    start = 0
    fields = pf.schema_arrow.names
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows):
            if not batch.num_rows:
                continue
            yield Chunk(batch.to_pylist(), [f"{path} row {start + i}" for i in range(batch.num_rows)], start, batch,
                        fields)
            start += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise SptokError(f"{path} after row {start}: cannot read further ({e})") from None


def parquet_rows(path: str) -> int | None:
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None


# ------------------------------------------------------------------------------------------------ writing

def _json_default(v):
    if isinstance(v, (bytes, bytearray)):
        import base64

        return base64.b64encode(v).decode()
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def _arrow_types():
    import pyarrow as pa

    topk = pa.list_(pa.struct([("source", pa.string()), ("prob", pa.float64())]))
    return {"sp_pred": pa.string(), "sp_prob": pa.float64(), "sp_topk": topk, "sp_input": pa.string(),
            "sp_input_pair": pa.string(), "sp_used": pa.string(), "sp_input_ids": pa.list_(pa.int32()),
            "sp_input_pair_ids": pa.list_(pa.int32())}


class Writer:
    """write(chunk, new) with ``new`` the added fields, name -> one value per row; close() renames."""

    def __init__(self, path: str, fmt: str):
        self.path, self.fmt = path, fmt
        self.tmp = path + ".partial"
        d = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise SptokError(f"--out {path}: a directory; give a file name (.jsonl, .parquet or .csv)")
        try:
            os.makedirs(d, exist_ok=True)
            self.f = open(self.tmp, "w", encoding="utf-8", newline="") if fmt != "parquet" else None
        except OSError as e:
            raise SptokError(f"--out {path}: cannot write there ({e.strerror or e})") from None
        self.csv = None
        self.pq = None
        self.pending: list[dict] = []
        self.rows = 0

    def write(self, chunk: Chunk, new: dict[str, list]) -> None:
        names = list(new)
        if self.fmt == "jsonl":
            for i, row in enumerate(chunk.rows):
                rec = dict(row)
                for k in names:
                    rec[k] = new[k][i]
                self.f.write(json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n")
        elif self.fmt == "csv":
            if self.csv is None:
                cols = list(chunk.fields or chunk.rows[0].keys())
                self.csv = csv.DictWriter(self.f, fieldnames=cols + [k for k in names if k not in cols],
                                          extrasaction="raise")
                self.csv.writeheader()
            for i, row in enumerate(chunk.rows):
                rec = {k: _cell(v) for k, v in row.items()}
                for k in names:
                    rec[k] = _cell(new[k][i])
                try:
                    self.csv.writerow(rec)
                except ValueError:
                    extra = sorted(set(rec) - set(self.csv.fieldnames))
                    raise SptokError(f"{chunk.where[i]}: field {extra[0]!r} is not in the first row's fields, which "
                                     f"a CSV header fixes; write JSONL instead") from None
        else:
            self._parquet(chunk, new)
        self.rows += len(chunk.rows)

    def _parquet(self, chunk: Chunk, new: dict[str, list]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = _arrow_types()
        if chunk.batch is None:   # rows of JSONL / CSV: one table at the end, so every row's fields are kept
            for i, row in enumerate(chunk.rows):
                self.pending.append({**row, **{k: new[k][i] for k in new}})
            return
        table = pa.Table.from_batches([chunk.batch])
        for k, values in new.items():
            if k in table.column_names:
                table = table.drop_columns([k])
            table = table.append_column(k, pa.array(values, type=types[k]))
        if self.pq is None:
            self.pq = pq.ParquetWriter(self.tmp, table.schema)
        self.pq.write_table(table)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            if self.pq is not None:
                self.pq.close()
            else:
                names = list(dict.fromkeys(k for r in self.pending for k in r))   # every row's fields, in order
                try:
                    types = _arrow_types()
                    table = pa.table({k: pa.array([r.get(k) for r in self.pending], type=types.get(k))
                                      for k in names})
                except (pa.ArrowException, TypeError, ValueError) as e:
                    raise SptokError(f"--out {self.path}: the rows do not make one Parquet table (a field with "
                                     f"values of different types? {e}); write JSONL instead") from None
                pq.write_table(table, self.tmp)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if self.f is not None:
                self.f.close()
            if self.pq is not None:
                self.pq.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, dict, tuple)):
        return json.dumps(v, ensure_ascii=False, default=_json_default)
    return str(v)

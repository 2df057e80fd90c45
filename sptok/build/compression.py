"""gzip and zstd inputs: told apart by their first bytes (never by the name alone), and the names they go by.

Used by planning (a compressed JSONL file is one unit), the readers (which decompress it) and ``sptok label``
(whose input may be compressed, its output never)."""

from __future__ import annotations

import io

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SKIPPABLE_MAGIC = b"\x2a\x4d\x18"   # bytes 1-3 of a zstd skippable frame (little-endian 0x184D2A5?)
EXTENSIONS = (".gz", ".zst", ".zstd")


def sniff(magic: bytes) -> str | None:
    """"gzip", "zstd" or None (not compressed), from a file's first 4 bytes. A zstd file may open with a
    skippable frame (magic 0x184D2A50 to 0x184D2A5F): ``pzstd`` writes one before every frame."""
    if magic[:2] == GZIP_MAGIC:
        return "gzip"
    if magic[:4] == ZSTD_MAGIC or (len(magic) >= 4 and magic[1:4] == SKIPPABLE_MAGIC and magic[0] & 0xF0 == 0x50):
        return "zstd"
    return None


def sniff_file(path: str) -> str | None:
    with open(path, "rb") as f:
        return sniff(f.read(4))


def is_compressed_name(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def strip_extension(name: str) -> str:
    """The name without a compression extension (``a.jsonl.zst`` -> ``a.jsonl``)."""
    low = name.lower()
    for ext in EXTENSIONS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def open_decompressed(path: str):
    """The file's bytes, gzip / zstd decompressed when its first bytes say so; closing it closes the file."""
    kind = sniff_file(path)
    if kind == "gzip":
        import gzip

        return gzip.open(path, "rb")
    if kind == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True,
                                                                             closefd=True))
    return open(path, "rb")

"""Shared fixtures: the bundled demo corpus (real text), its tokenizer, manifests and builds in tmp dirs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import zstandard

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pipelines" / "demo"
TOKENIZER = DEMO / "tokenizer"
SOURCES = ("pydocs", "code", "fortunes", "chinese")

sys.path.insert(0, str(Path(__file__).parent))
# distributed tests talk over loopback only: gloo otherwise binds the address the host name resolves to
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def demo_records(name: str, limit: int | None = None) -> list[dict]:
    """The records of one demo source, as stored."""
    data = zstandard.ZstdDecompressor().stream_reader(open(DEMO / f"{name}.jsonl.zst", "rb")).read()
    recs = [json.loads(line) for line in data.splitlines() if line.strip()]
    return recs[:limit] if limit else recs


def write_jsonl(path: Path, records, compress: str | None = None) -> Path:
    data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    if compress == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    elif compress == "gz":
        import gzip

        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture
def manifest(tmp_path):
    """manifest(sources, **build) -> path of a YAML manifest in tmp_path."""
    def make(sources: list[dict], name: str = "manifest.yaml", **build) -> Path:
        doc = {"sources": sources}
        if build:
            doc["build"] = build
        p = tmp_path / name
        p.write_text(yaml.safe_dump(doc, sort_keys=False))
        return p
    return make


@pytest.fixture
def small_corpus(tmp_path):
    """A few real documents of each demo source, as JSONL files in tmp_path; returns {name: records}."""
    out = {}
    for name, n in zip(SOURCES, (12, 4, 120, 10)):
        recs = demo_records(name, n)
        write_jsonl(tmp_path / f"{name}.jsonl", recs)
        out[name] = recs
    return out


def demo_corpus(d: Path, counts=(40, 12, 400, 40), weights=None) -> Path:
    """The first ``counts`` documents of each demo source as JSONL files in ``d``, and their manifest
    (``d/m.yaml``, with ``weights`` when given); returns the manifest's path."""
    for name, n in zip(SOURCES, counts):
        write_jsonl(d / f"{name}.jsonl", demo_records(name, n))
    weight = (lambda i: f", weight: {weights[i]}") if weights else (lambda i: "")
    (d / "m.yaml").write_text("sources:\n" + "".join(f"  - {{name: {n}, paths: {n}.jsonl, id_field: id{weight(i)}}}\n"
                                                      for i, n in enumerate(SOURCES)))
    return d / "m.yaml"


def demo_build(d: Path, **flags) -> Path:
    """``demo_corpus(d)`` built into ``d/b`` with the test tokenizer, seq 64, one worker, and ``flags``."""
    from sptok.build import run_build

    flags = dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=64, **flags)
    run_build(str(demo_corpus(d)), str(d / "b"), flags, log=lambda m: None)
    return d / "b"


def small_sources(tmp_path) -> list[dict]:
    return [{"name": n, "paths": f"{n}.jsonl", "id_field": "id"} for n in SOURCES]


@pytest.fixture
def build(tmp_path):
    """build(manifest, out=None, **flags) -> (out dir, sptok.json), quiet, via the real pipeline."""
    from sptok.build import run_build

    def run(manifest_path, out=None, overwrite=False, partition=None, **flags):
        out = str(out or tmp_path / "out")
        flags.setdefault("tokenizer", str(TOKENIZER))
        flags.setdefault("quiet", True)
        flags.setdefault("workers", 1)
        res = run_build(str(manifest_path), out, flags, overwrite=overwrite, partition=partition, log=lambda m: None)
        return out, res.info
    return run


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A real filesystem of ``size`` (tmpfs) mounted at ``where``, to fill or remount: the test is skipped where
    mounting is not allowed (CI runs as root)."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)])


def tree_bytes(root: str) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), for byte-identity checks."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def build_bytes(root: str) -> dict[str, bytes]:
    """tree_bytes of a build, less sptok.json's ``encoder`` record: which encoders ran is the one thing allowed
    to differ between builds of the same bytes (a resume or a partition may have used another encoder)."""
    out = tree_bytes(root)
    info = json.loads(out["sptok.json"])
    assert info.pop("encoder"), "sptok.json records no encoder"
    out["sptok.json"] = json.dumps(info, sort_keys=True).encode()
    return out


def without_modules(tmp_path: Path, *names: str) -> dict:
    """Environment for a child process in which ``names`` cannot be imported (as on an install without them)."""
    fake = tmp_path / "without"
    for name in names:
        (fake / name).mkdir(parents=True, exist_ok=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('No module named {name}')\n")
    return {"PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

"""The GPU benchmark runs end to end on CPU with tiny shapes (a smoke test: nothing is timed or asserted about
speed; the real measurement needs a GPU, see benchmarks/RESULTS.md)."""

import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_pretrain_mfu_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pretrain_mfu.py"), "--smoke", "--work", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = r.stdout.splitlines()
    for model in ("llama-tiny", "bert", "t5"):   # sptok's step and plain Hugging Face, side by side
        mine = [x for x in rows if x.startswith(model + " ")]
        assert any("(a) sptok" in x for x in mine) and any("plain HF" in x for x in mine), r.stdout
        assert any("a/b =" in x for x in mine), r.stdout
    for text in ("sdpa + bool mask (sptok default)", "flex + BlockMask", "varlen", "sptok Loader on the CPU"):
        assert text in r.stdout, r.stdout

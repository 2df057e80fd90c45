"""The GPU benchmark runs end to end on CPU with a tiny shape (a smoke test: nothing is timed or asserted
about speed; the real measurement needs a GPU, see benchmarks/RESULTS.md)."""

import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_pretrain_mfu_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pretrain_mfu.py"), "--smoke", "--work", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for variant in ("(a) sptok", "(b) plain HF", "(c) plain HF", "a/b =", "sptok Loader on the CPU"):
        assert variant in r.stdout, r.stdout

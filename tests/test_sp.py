"""SP naming policies and per-document decisions: pure, seeded, order-independent."""

from __future__ import annotations

import numpy as np
import pytest

from sptok.errors import SptokError
from sptok.sp import abbreviation, alphabet, decide, derangement, doc_hashes, sp_strings, uniforms


def test_abbreviation_and_alphabet():
    assert abbreviation("pydocs") == "<PYDOCS>"
    assert abbreviation("web-en.v2") == "<WEB_EN_V2>"
    assert [alphabet(i) for i in (0, 1, 25, 26, 27, 701, 702)] == ["<A>", "<B>", "<Z>", "<AA>", "<AB>", "<ZZ>", "<AAA>"]


@pytest.mark.parametrize("n", [2, 3, 4, 7, 20])
def test_misplaced_is_a_seeded_derangement(n):
    for seed in range(20):
        p = derangement(n, seed)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
        assert p == derangement(n, seed)
    distinct = len({tuple(derangement(n, s)) for s in range(20)})
    assert distinct == 1 if n == 2 else distinct > 1   # two sources have exactly one derangement


def test_custom_and_clash():
    assert sp_strings(["a", "b"], "custom", 0, ["<X>", "<Y>"]) == ["<X>", "<Y>"]
    with pytest.raises(SptokError, match="has no `sp:`"):
        sp_strings(["a", "b"], "custom", 0, ["<X>", None])
    with pytest.raises(SptokError, match="SP token clash"):
        sp_strings(["a", "b"], "custom", 0, ["<X>", "<X>"])


def test_decisions_do_not_depend_on_order_or_batch():
    keys = [f"doc-{i}" for i in range(1000)]
    h = doc_hashes("src", keys)
    d = decide(h, seed=5, insert_prob=0.5, msp_prob=0.3)
    perm = np.random.default_rng(0).permutation(1000)
    dp = decide(h[perm], seed=5, insert_prob=0.5, msp_prob=0.3)
    assert np.array_equal(d.inserted[perm], dp.inserted)
    assert np.array_equal(d.masked_prefix[perm], dp.masked_prefix)
    single = [decide(h[i:i + 1], 5, 0.5, 0.3).inserted[0] for i in range(50)]
    assert single == d.inserted[:50].tolist()
    # the source and the seed are part of the key
    assert not np.array_equal(doc_hashes("other", keys), h)
    assert not np.array_equal(decide(h, 6, 0.5, 0.3).inserted, d.inserted)


def test_uniforms_are_uniform_and_slots_independent():
    h = doc_hashes("s", [str(i) for i in range(20000)])
    u0, u1 = uniforms(h, 0, 0), uniforms(h, 0, 1)
    assert 0 <= u0.min() and u0.max() < 1
    counts = np.histogram(u0, bins=10, range=(0, 1))[0]
    expected = len(h) / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30          # chi-square, 9 dof: p < 0.001 beyond ~27.9
    assert abs(np.corrcoef(u0, u1)[0, 1]) < 0.05


def test_masks_only_on_inserted():
    h = doc_hashes("s", [str(i) for i in range(5000)])
    d = decide(h, 0, 0.5, 1.0)
    assert np.array_equal(d.masked_prefix, d.inserted) and np.array_equal(d.masked_post, d.inserted)
    d = decide(h, 0, 0.0, 1.0)
    assert not d.inserted.any() and not d.masked_prefix.any()

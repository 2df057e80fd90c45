"""sptok mix: the regression recovers known loss surfaces; the search runs end to end on a tiny config,
resumes after an interruption, and writes what it says."""

from __future__ import annotations

import numpy as np
import pytest

from sptok.mix import search


def _surface(kind: str, rng):
    """A per-source loss surface of a known shape: a data mixing law (exponential in the shares) or a
    power law in each source's share."""
    s = 4
    if kind == "mixing-law":
        c, k = rng.uniform(1.5, 3, s), rng.uniform(0.5, 2, s)
        t = rng.uniform(-0.3, 0.3, (s, s))
        np.fill_diagonal(t, -rng.uniform(3, 6, s))
        return lambda m: c + k * np.exp(m @ t.T)
    a, b = rng.uniform(2, 4, s), rng.uniform(0.1, 0.4, s)
    cross = rng.uniform(-0.03, 0.03, (s, s))
    np.fill_diagonal(cross, 0)
    return lambda m: a - b * np.log(m) + np.log(m) @ cross.T


@pytest.mark.parametrize("kind", ["mixing-law", "power-law"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_regression_recovers_a_known_surface(kind, seed):
    rng = np.random.default_rng(seed)
    true = _surface(kind, rng)
    prior = rng.dirichlet(np.ones(4) * 2)
    mixtures = search.sample_mixtures(prior, 24, 5.0, seed)
    losses = true(mixtures) + rng.normal(0, 0.01, mixtures.shape)           # noisy proxies
    w = np.ones(4)
    check = search.left_out(mixtures, losses, w, 0.25, seed)
    assert check["spearman"] >= 0.7, check
    fit = search.fit(mixtures, losses)
    fresh = search.sample_mixtures(prior, 200, 5.0, seed + 100)               # mixtures no proxy ran
    assert np.corrcoef(fit.predict(fresh).ravel(), true(fresh).ravel())[0, 1] > 0.95
    best = search.propose(fit, prior, 5.0, w, seed + 1, known=mixtures)
    assert best.sum() == pytest.approx(1.0) and (best >= search.FLOOR - 1e-12).all()
    baseline = min(search.objective(true(search.normalize(prior)[None]), w)[0], true(np.full((1, 4), 0.25)).mean())
    assert search.objective(true(best[None]), w)[0] <= baseline + 0.01      # as good as natural / uniform


def test_objective_weights_steer_the_proposal():
    rng = np.random.default_rng(3)
    true = _surface("power-law", rng)
    prior = np.full(4, 0.25)
    mixtures = search.sample_mixtures(prior, 32, 3.0, 3)
    fit = search.fit(mixtures, true(mixtures))
    only_first = search.propose(fit, prior, 3.0, np.array([1.0, 0, 0, 0]), 4, known=mixtures)
    only_last = search.propose(fit, prior, 3.0, np.array([0, 0, 0, 1.0]), 4, known=mixtures)
    assert only_first[0] > 0.5 and only_last[3] > 0.5

"""The search behind ``sptok mix`` (pure numpy / scikit-learn): sample mixtures, fit mixture -> per-source
validation loss, propose the mixture the fit predicts best.

As RegMix (Liu et al. 2024): proxies trained on random mixtures, a regression from mixture to validation
loss, then the best predicted mixture among many candidates drawn from the same prior (plus the natural and
uniform mixtures and the proxies' own), averaging the best few so that one lucky prediction does not decide.
Unlike RegMix, with its hundreds of proxies, a candidate's score counts how much refits on resampled proxies
disagree about it (``propose``): with tens of proxies the fit is unsure away from them.
The regression is scikit-learn's ``RidgeCV``, one output per source, on the shares r, r^2 and log r:
- those features cover both shapes measured for loss against data share: a power law in the share (linear in
  log r) and the exponential data mixing laws of Ye et al. 2024 (curved in r). On synthetic surfaces of
  either kind (24 noisy proxies, 4 sources) they ranked left-out proxies with a Spearman of 0.89 and 0.99
  and found a mixture at least as good as the better of natural and uniform in 23 of 24 cases, where log r
  alone, or r and r^2 alone, each failed on one kind of surface;
- ridge, with a leave-one-out choice of the penalty for each source, because a search has tens of proxies,
  not the thousands a tree ensemble (RegMix's LightGBM) needs; scikit-learn is the well-kept implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOOR = 1e-3          # the smallest share a proxy or a proposal gives a source (log(0) is no feature)
ALPHAS = np.logspace(-4, 3, 15)
BOOTSTRAP, DOUBT = 16, 2.0   # refits on resampled proxies, and how many of their standard deviations count
CHECK_MIN = 3         # proxies left out, and left to fit on, for a rank correlation to mean anything


def sample_mixtures(prior: np.ndarray, k: int, concentration: float, seed: int) -> np.ndarray:
    """``k`` mixtures (rows summing to 1) from a Dirichlet with mean ``prior``; the larger
    ``concentration``, the closer they stay to it."""
    rng = np.random.default_rng(seed)
    alpha = np.maximum(concentration * np.asarray(prior, np.float64) / np.sum(prior), 1e-3)
    return normalize(rng.dirichlet(alpha, size=k))


def normalize(m: np.ndarray) -> np.ndarray:
    """Shares of at least FLOOR, summing to 1."""
    m = np.maximum(np.asarray(m, np.float64), FLOOR)
    return m / m.sum(axis=-1, keepdims=True)


def features(m: np.ndarray) -> np.ndarray:
    r = normalize(m)
    return np.hstack([r, r * r, np.log(r)])


@dataclass
class Fit:
    """A fitted regression: ``predict(mixtures) -> (n, sources)`` validation losses."""
    model: object

    def predict(self, mixtures: np.ndarray) -> np.ndarray:
        return self.model.predict(features(np.atleast_2d(mixtures)))


def fit(mixtures: np.ndarray, losses: np.ndarray) -> Fit:
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=ALPHAS, alpha_per_target=True).fit(features(mixtures), np.asarray(losses, np.float64))
    return Fit(model)


def objective(losses: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """What the search minimises: the weighted mean of the per-source losses (equal weights by default)."""
    w = np.asarray(weights, np.float64)
    return np.asarray(losses) @ (w / w.sum())


def propose(f: Fit, prior: np.ndarray, concentration: float, weights: np.ndarray, seed: int,
            known: np.ndarray, losses: np.ndarray, candidates: int = 100_000, top: int = 100) -> np.ndarray:
    """The mean of the ``top`` candidates the fit predicts best, counting its doubt against each: drawn from
    the proxies' own prior, plus the prior itself, the uniform mixture and the ``known`` ones (the proxies',
    whose ``losses`` the fit was made from).

    The score is the predicted objective plus DOUBT x its spread over BOOTSTRAP refits on resampled proxies.
    A regression fitted on tens of proxies is right where they are and can be far off between them, and the
    best predicted mixture is where the fit errs low. On the four shared sources (32 proxies) the prediction
    alone proposed code at 0.2% of the data, predicted 0.8 nats better than natural; trained, it was 0.36
    nats worse (benchmarks/RESULTS.md). Where the proxies agree on a surface (the synthetic ones of the tests)
    the spread is small and the proposal is the same."""
    k = len(prior)
    known = normalize(known)
    cands = np.vstack([sample_mixtures(prior, candidates, concentration, seed), normalize(prior)[None],
                       np.full((1, k), 1.0 / k), known])
    rng = np.random.default_rng(seed)
    refits = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(known), len(known))
        refits.append(objective(fit(known[pick], np.asarray(losses)[pick]).predict(cands), weights))
    score = objective(f.predict(cands), weights) + DOUBT * np.std(refits, axis=0)
    best = np.argsort(score)[:top]
    return normalize(cands[best].mean(axis=0))


def left_out(mixtures: np.ndarray, losses: np.ndarray, weights: np.ndarray, share: float, seed: int) -> dict:
    """Fit on all proxies but a seeded ``share`` of them (at least CHECK_MIN), predict those: the rank
    correlation of predicted and actual objective says whether the fit can be trusted to rank mixtures it has
    not seen. ``spearman`` is None, with the reason in ``skipped``, where it would mean nothing: fewer than
    CHECK_MIN proxies left to fit on (the fit on one proxy is undefined), or a constant objective."""
    from scipy.stats import spearmanr

    k = len(mixtures)
    n = max(CHECK_MIN, round(share * k))
    if k - n < CHECK_MIN:
        return {"proxies": [], "predicted": [], "actual": [], "predicted_by_source": [], "spearman": None,
                "skipped": f"too few proxies for the left-out check ({k}; it needs at least {2 * CHECK_MIN})"}
    out = np.sort(np.random.default_rng(seed).permutation(k)[:n])
    keep = np.setdiff1d(np.arange(k), out)
    predicted = fit(mixtures[keep], losses[keep]).predict(mixtures[out])
    p, a = objective(predicted, weights), objective(losses[out], weights)
    check = {"proxies": out.tolist(), "predicted": p.tolist(), "actual": a.tolist(),
             "predicted_by_source": predicted.tolist(), "spearman": None}
    if np.ptp(p) == 0 or np.ptp(a) == 0:
        return check | {"skipped": "the left-out check is undefined: the proxies left out have the same actual or "
                                   "predicted objective"}
    return check | {"spearman": float(spearmanr(p, a).statistic)}

"""sptok mix: the regression recovers known loss surfaces; the search runs end to end on a tiny config,
resumes after an interruption, and writes what it says."""

from __future__ import annotations

import json
from pathlib import Path

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
    best = search.propose(fit, prior, 5.0, w, seed + 1, known=mixtures, losses=losses)
    assert best.sum() == pytest.approx(1.0) and (best >= search.FLOOR - 1e-12).all()
    baseline = min(search.objective(true(search.normalize(prior)[None]), w)[0], true(np.full((1, 4), 0.25)).mean())
    assert search.objective(true(best[None]), w)[0] <= baseline + 0.01      # as good as natural / uniform


def test_objective_weights_steer_the_proposal():
    rng = np.random.default_rng(3)
    true = _surface("power-law", rng)
    prior = np.full(4, 0.25)
    mixtures = search.sample_mixtures(prior, 32, 3.0, 3)
    losses = true(mixtures)
    fit = search.fit(mixtures, losses)
    only_first = search.propose(fit, prior, 3.0, np.array([1.0, 0, 0, 0]), 4, known=mixtures, losses=losses)
    only_last = search.propose(fit, prior, 3.0, np.array([0, 0, 0, 1.0]), 4, known=mixtures, losses=losses)
    assert only_first[0] > 0.5 and only_last[3] > 0.5


def test_the_proposal_stays_where_the_proxies_agree():
    """Real proxies (tests/data/mix_proxies.json): ranked by the fit alone, the best candidates gave code 0.2%
    of the data and were predicted 0.8 nats better than natural, and trained, that mixture was 0.36 nats worse.
    Counting the refits' disagreement keeps every source at a share the proxies have seen often."""
    doc = json.loads((Path(__file__).parent / "data" / "mix_proxies.json").read_text())
    mixtures, losses = np.array(doc["mixtures"]), np.array(doc["losses"])
    prior, w = np.array(doc["prior_shares"]), np.ones(len(doc["sources"]))
    fit = search.fit(mixtures, losses)
    best = search.propose(fit, prior, doc["concentration"], w, 1, known=mixtures, losses=losses)
    assert best.min() >= 0.05, dict(zip(doc["sources"], best.round(3)))
    # and the fit alone (no doubt counted) is what went to the corner
    cands = np.vstack([search.sample_mixtures(prior, 100_000, doc["concentration"], 1), mixtures])
    alone = search.normalize(cands[np.argsort(search.objective(fit.predict(cands), w))[:100]].mean(axis=0))
    assert alone.min() < 0.01


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def build(tmp_path_factory):
    from conftest import demo_build

    d = tmp_path_factory.mktemp("mix")
    demo_build(d, msp_prob=0.3, holdout_docs=4)
    cfg = d / "proxy.yaml"
    cfg.write_text("model: {family: bert, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}\n"
                   "data: {build: b}\noptim: {lr: 3.0e-3, warmup_steps: 1}\n"
                   "train: {steps: 3, global_batch_size: 4, micro_batch_size: 4}\n"
                   "eval: {samples: 2}\nlog: {every: 3, tensorboard: false}\n")
    return d


@pytest.mark.slow
def test_mix_end_to_end_resumes_after_an_interruption(build, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from click.testing import CliRunner

    from sptok.cli import main
    from sptok.train.config import load_config

    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "sptok", "mix", str(build / "proxy.yaml"), "--out", str(out), "--proxies", "6"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    first = out / "proxies" / "001" / "result.json"
    deadline = time.time() + 300
    while not first.exists() and p.poll() is None and time.time() < deadline:   # kill on progress, not a sleep
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = {k: os.stat(out / "proxies" / f"{k:03d}" / "result.json").st_mtime_ns for k in range(6)
            if (out / "proxies" / f"{k:03d}" / "result.json").exists()}
    assert 2 <= len(done) < 6 and not (out / "mixture.json").exists()
    res = CliRunner().invoke(main, [str(a) for a in cmd[3:]], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert all(os.stat(out / "proxies" / f"{k:03d}" / "result.json").st_mtime_ns == t for k, t in done.items())
    mix = json.loads((out / "mixture.json").read_text())
    assert sum(mix["weights"].values()) == pytest.approx(1.0, abs=1e-5) and len(mix["proxies"]) == 6
    assert set(mix["predicted"]) == {"proposed", "natural", "uniform"} and -1 <= mix["left_out"]["spearman"] <= 1
    assert (out / "predicted_vs_actual.png").read_bytes()[:4] == b"\x89PNG"
    override = (out / "proportion.txt").read_text().strip()
    cfg = load_config(str(build / "proxy.yaml"), [override])
    assert cfg.data.proportion == pytest.approx(mix["weights"], abs=1e-6)
    res = CliRunner().invoke(main, ["report", str(build / "b"), "-o", str(tmp_path / "r.html"), "--mixture", str(out),
                                    "--samples", "0"], catch_exceptions=False)
    assert res.exit_code == 0 and 'id=mixture' in (tmp_path / "r.html").read_text()
    res = CliRunner().invoke(main, [str(a) for a in cmd[3:5]] + ["--out", str(out), "--proxies", "7"])
    assert res.exit_code == 2 and "holds another search" in res.output


def _finish_proxies(out: Path, seed: int = 3) -> dict:
    """Give every proxy of the plan in ``out`` the result a known loss surface gives its mixture, as a
    finished ``run_proxy`` writes it (the proxies' training is what the end-to-end test covers)."""
    plan = json.loads((out / "plan.json").read_text())
    true = _surface("power-law", np.random.default_rng(seed))
    for k, mix in enumerate(plan["mixtures"]):
        losses = true(np.array([mix]))[0].tolist()
        d = out / "proxies" / f"{k:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "result.json").write_text(json.dumps({"proxy": k, "mixture": mix, "step": 3, "losses": losses,
                                                   "loss": float(np.mean(losses))}))
    return plan


def _strict_json(path: Path) -> dict:
    """Parsed as a strict JSON parser does: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{path.name} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("steps", [["--plan", "--collect"], ["--proxy", "1", "--collect"], ["--plan", "--proxy", "0"]])
def test_one_step_of_a_search_at_a_time(tmp_path, steps):
    """--plan, --proxy K and --collect are each one step of a search: given two, one ran and the other was
    silently ignored."""
    from click.testing import CliRunner

    from sptok.cli import main

    res = CliRunner().invoke(main, ["mix", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "s"), *steps])
    assert res.exit_code == 2 and res.output.startswith("error: give one of --plan, --proxy K and --collect, not ")
    assert not (tmp_path / "s").exists()


def test_a_negative_seed_is_refused_in_one_line(build, tmp_path):
    from click.testing import CliRunner

    from sptok.cli import main

    res = CliRunner().invoke(main, ["mix", str(build / "proxy.yaml"), "--out", str(tmp_path / "s"), "--plan",
                                    "--proxies", "4", "--seed", "-1"])   # was numpy's ValueError
    assert (res.exit_code, res.output) == (2, "error: --seed: must be 0 or more, got -1\n")


def test_a_cut_or_edited_plan_is_named_at_every_step(build, tmp_path):
    """A plan.json that is JSON but not a plan (cut by hand, another tool's) ended --plan, --proxy and --collect
    in a KeyError."""
    from click.testing import CliRunner

    from sptok.cli import main

    out = tmp_path / "s"
    (out / "proxies").mkdir(parents=True)
    cmd = ["mix", str(build / "proxy.yaml"), "--out", str(out)]
    for text in ("{}", "[]", '{"sources": [], "config": {}}'):
        (out / "plan.json").write_text(text)
        for step in (["--plan", "--proxies", "4"], ["--proxy", "0"], ["--collect"]):
            res = CliRunner().invoke(main, cmd + step)
            assert res.exit_code == 2 and res.output.startswith(f"error: {out}/plan.json: not the plan of a search"), \
                (text, step, res.output)
    (out / "plan.json").unlink()
    assert CliRunner().invoke(main, cmd + ["--plan", "--proxies", "4"]).exit_code == 0
    for k in range(4):   # one result cut short
        (out / "proxies" / f"{k:03d}" / "result.json").write_text('{"losses": [1.0]' if k == 2 else
                                                                  '{"losses": [1.0], "mixture": [1.0]}')
    res = CliRunner().invoke(main, cmd + ["--collect"])
    assert res.exit_code == 2 and res.output.startswith(f"error: {out}/proxies/002/result.json: not the result of "
                                                        f"proxy 2"), res.output


def test_a_directory_of_other_files_is_not_a_search(build, tmp_path):
    """--out holding other files (the build itself, a run's log) got plan.json and proxies/ mixed into them."""
    from click.testing import CliRunner

    from sptok.cli import main

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    for out in (build / "b", tmp_path / "notes"):
        before = sorted(p.name for p in out.iterdir())
        res = CliRunner().invoke(main, ["mix", str(build / "proxy.yaml"), "--out", str(out), "--proxies", "4", "--plan"])
        assert res.exit_code == 2 and res.output.startswith(f"error: --out {out}: holds other files than a search")
        assert sorted(p.name for p in out.iterdir()) == before


def test_the_objective_belongs_to_the_fit_so_collect_refits_under_a_new_one(build, tmp_path):
    from click.testing import CliRunner

    from sptok.cli import main

    out = tmp_path / "search"
    cmd = ["mix", str(build / "proxy.yaml"), "--out", str(out), "--proxies", "8", "--plan"]
    assert CliRunner().invoke(main, cmd).exit_code == 0
    res = CliRunner().invoke(main, cmd + ["--objective", "code=1"])      # the same proxies: not another search
    assert res.exit_code == 0 and "--collect --objective code=1" in res.output, res.output
    plan = _finish_proxies(out)
    names = plan["sources"]
    collect = cmd[:-1] + ["--collect"]
    assert CliRunner().invoke(main, collect).exit_code == 0
    equal = _strict_json(out / "mixture.json")
    assert equal["objective_weights"] == {n: 1.0 for n in names}
    for name in ("code", "chinese"):
        res = CliRunner().invoke(main, collect + ["--objective", f"{name}=1"])
        assert res.exit_code == 0, res.output
        doc = _strict_json(out / "mixture.json")
        assert doc["objective_weights"] == {n: float(n == name) for n in names}
        assert doc["weights"][name] > max(0.5, equal["weights"][name]), (name, doc["weights"], equal["weights"])
        assert doc["proxies"][0]["objective"] == pytest.approx(doc["proxies"][0]["loss_by_source"][name])
    res = CliRunner().invoke(main, collect + ["--objective", "kode=1"])
    assert res.exit_code == 2 and "--objective: no source 'kode'" in res.output
    res = CliRunner().invoke(main, cmd + ["--seed", "1"])                # a changed search is named for what changed
    assert res.exit_code == 2 and "holds another search (its plan.json differs in --seed)" in res.output, res.output


@pytest.mark.parametrize("proxies", [4, 5])
def test_too_few_proxies_skip_the_left_out_check_with_one_warning_and_strict_json(build, tmp_path, proxies):
    import warnings

    from click.testing import CliRunner

    from sptok.cli import main

    out = tmp_path / "search"
    cmd = ["mix", str(build / "proxy.yaml"), "--out", str(out), "--proxies", str(proxies)]
    assert CliRunner().invoke(main, cmd + ["--plan"]).exit_code == 0
    _finish_proxies(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(main, cmd + ["--collect"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    warned = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert warned == [f"warning: too few proxies for the left-out check ({proxies}; it needs at least 6)"]
    doc = _strict_json(out / "mixture.json")
    assert doc["left_out"]["spearman"] is None and doc["left_out"]["proxies"] == []
    assert sum(doc["weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert not (out / "predicted_vs_actual.png").exists()
    res = CliRunner().invoke(main, ["report", str(build / "b"), "-o", str(tmp_path / "r.html"), "--mixture", str(out),
                                    "--samples", "0"], catch_exceptions=False)
    assert res.exit_code == 0 and "too few proxies for the left-out check" in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize("k", [6, 7, 12, 20])
def test_the_left_out_check_takes_a_quarter_and_at_least_three(k):
    mixtures = search.sample_mixtures(np.full(4, 0.25), k, 5.0, 0)
    losses = _surface("power-law", np.random.default_rng(0))(mixtures)
    check = search.left_out(mixtures, losses, np.ones(4), 0.25, 0)
    assert len(check["proxies"]) == max(3, round(k / 4)) and -1 <= check["spearman"] <= 1


def test_a_diverged_proxy_is_named_not_written_as_nan(build, tmp_path):
    from click.testing import CliRunner

    from sptok.cli import main

    out = tmp_path / "search"
    cmd = ["mix", str(build / "proxy.yaml"), "--out", str(out), "--proxies", "6"]
    assert CliRunner().invoke(main, cmd + ["--plan"]).exit_code == 0
    _finish_proxies(out)
    result = out / "proxies" / "002" / "result.json"
    doc = json.loads(result.read_text())
    result.write_text(json.dumps(dict(doc, losses=[float("nan")] + doc["losses"][1:])))   # as json writes a NaN
    res = CliRunner().invoke(main, cmd + ["--collect"])
    assert res.exit_code == 2 and "proxy 2: its validation loss is not finite" in res.output, res.output
    assert not (out / "mixture.json").exists()

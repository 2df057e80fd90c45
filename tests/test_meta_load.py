"""Metadata conditioning at load time (issue 25): metadata spans are never targets in any collator, the meta=
and SP misplaced policies, a meta=strip cooldown, and eval conditions scored on the same text tokens.

Samples with metadata are made here from a real build's samples, laid out as a build with ``--metadata`` lays
them out (META before each document's text, after SP + delimiter; ``meta_spans`` as little-endian uint32 pairs,
MDS's bytes column); ``test_a_real_metadata_build_end_to_end`` does the same on a real build once ``sptok build
--metadata`` exists."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import TOKENIZER

from sptok.build import run_build
from sptok.data import IGNORE, BuildInfo, CausalLMCollator, MLMCollator, SpanCorruptionCollator, SPPolicy, \
    apply_policy, as_arrays, open_dataset
from sptok.data.policy import sample_key
from sptok.errors import SptokError

SEQ = 96
HOSTS = ["docs.python.org", "github.com", "fortunes.org", "zh.wikipedia.org", "peps.python.org", "bugs.python.org"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real build (prefix SPs, some not inserted, MSP flags) and its samples."""
    from conftest import demo_corpus

    d = tmp_path_factory.mktemp("meta-load")
    out = d / "b"
    run_build(str(demo_corpus(d, counts=(20, 6, 120, 20))), str(out),
              dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=SEQ, msp_prob=0.4, insert_prob=0.8),
              log=lambda m: None)
    ds = open_dataset(str(out), weights=False)
    samples = [ds[i] for i in range(len(ds))]
    ds.close()
    return ds.build, samples


def _encode(info: BuildInfo, text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{info.tokenizer_dir}/tokenizer.json")
    return np.array(tok.encode(text, add_special_tokens=False).ids, np.int64)


def with_metadata(raw: dict, info: BuildInfo, value) -> dict:
    """``raw`` (a built sample) as a build with metadata would hold it: each document's META ("{value}\\n\\n",
    tokenized on its own) right before its text; ``value(document index) -> str``. MDS columns (bytes)."""
    a = as_arrays(raw)
    ids, pos = a["input_ids"], a["sp_positions"]
    d = len(info.delimiter_ids)
    parts, spans, offsets, new_pos, at = [], [], [], [], 0
    bounds = list(a["doc_offsets"]) + [len(ids)]
    for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        text = min(e, s + (1 + d if s in set(pos.tolist()) else 0))   # prefix layout: SP delim META text
        meta = _encode(info, f"{value(k)}\n\n")
        offsets.append(at)
        new_pos += [p - s + at for p in pos.tolist() if s <= p < text]
        parts += [ids[s:text], meta, ids[text:e]]
        spans.append((at + text - s, at + text - s + len(meta)))
        new_pos += [p - s + at + len(meta) for p in pos.tolist() if text <= p < e]
        at += e - s + len(meta)
    out = {"input_ids": np.concatenate(parts), "source_id": a["source_id"],
           "doc_offsets": np.array(offsets, np.int64), "sp_positions": np.array(new_pos, "<u4").tobytes(),
           "msp_mask": a["msp_mask"].astype(np.uint8).tobytes(),
           "meta_spans": np.array(spans, "<u4").ravel().tobytes()}
    if "doc_keys" in a:
        out["doc_keys"] = a["doc_keys"]
    return out


def _meta_samples(built, n=24, start=0):
    info, samples = built
    return [with_metadata(s, info, lambda k, i=i: HOSTS[(i + k) % len(HOSTS)])
            for i, s in enumerate(samples[start:start + n])]


def _meta_mask(a: dict) -> np.ndarray:
    m = np.zeros(len(a["input_ids"]), bool)
    for s, e in a["meta_spans"].tolist():
        m[s:e] = True
    return m


def test_as_arrays_gives_meta_spans_from_every_format(built):
    info, samples = built
    mds = _meta_samples(built, 1)[0]
    spans = as_arrays(mds)["meta_spans"]
    assert spans.dtype == np.int64 and spans.shape[1] == 2 and len(spans) >= 1
    arrow = {**mds, "meta_spans": spans.ravel().tolist()}   # Parquet / Arrow: list<uint32>
    assert np.array_equal(as_arrays(arrow)["meta_spans"], spans)
    for without in (samples[0], {**samples[0], "meta_spans": b""}, {**samples[0], "meta_spans": []}):
        got = as_arrays(without)["meta_spans"]
        assert got.shape == (0, 2) and got.dtype == np.int64
    ids = as_arrays(mds)["input_ids"]
    s, e = spans[0]
    assert ids[s:e].tolist() == _encode(info, f"{HOSTS[0]}\n\n").tolist()


def test_policy_grammar_round_trips_and_errors_in_one_line():
    for text, want in [("keep", SPPolicy()), ("meta=keep", SPPolicy()), ("strip", SPPolicy(insert=0.0)),
                       ("meta=strip", SPPolicy(meta="strip")), ("meta=0.3", SPPolicy(meta=0.3)),
                       ("meta=misplaced", SPPolicy(meta="misplaced")), ("misplaced", SPPolicy(misplaced=True)),
                       ("sp=misplaced", SPPolicy(misplaced=True)),
                       ("insert=1,meta=strip", SPPolicy(insert=1.0, meta="strip")),
                       ("strip,meta=misplaced", SPPolicy(insert=0.0, meta="misplaced")),
                       ("misplaced, msp=0.2 ,meta=0.5", SPPolicy(msp=0.2, misplaced=True, meta=0.5))]:
        p = SPPolicy.parse(text)
        assert p == want, text
        assert SPPolicy.parse(str(p)) == p, text
    assert str(SPPolicy.parse("insert=0.9,msp=0.3")) == "insert=0.9,msp=0.3"   # unchanged for SP-only policies
    assert str(SPPolicy.parse("meta=strip")) == "meta=strip" and str(SPPolicy.parse("misplaced")) == "misplaced"
    for bad, match in [("meta=often", "'often' is not a number"), ("meta=1.5", "probability in"),
                       ("meta=strip,meta=keep", "meta is given twice"), ("strip,insert=0.5", "insert is given twice"),
                       ("sp=strip", "expected sp=misplaced"), ("misplaced,strip", "no SP to misplace"),
                       ("meta", "is not a part"), ("shuffle", "is not a part"), ("keep,meta=strip", "is not a part")]:
        with pytest.raises(SptokError, match=match) as e:
            SPPolicy.parse(bad)
        assert "\n" not in str(e.value)


def _collators(info):
    return [MLMCollator(info, seed=3), CausalLMCollator(info, seed=3), SpanCorruptionCollator(info, seed=3)]


def _t5_noise(b: dict, i: int, sentinels: set) -> tuple[list[int], list[bool]]:
    """Sample i of a span-corruption batch put back together, and which of its tokens were in a noise span."""
    inp = b["input_ids"][i][b["doc_ids"][i] >= 0].numpy()[:-1]
    lab = b["labels"][i][b["labels"][i] != IGNORE].numpy()[:-1]
    spans, cur = {}, None
    for t in lab.tolist():
        if t in sentinels:
            cur = spans.setdefault(t, [])
        else:
            cur.append(t)
    toks, noise = [], []
    for t in inp.tolist():
        part = spans[t] if t in sentinels else [t]
        toks += part
        noise += [t in sentinels] * len(part)
    return toks, noise


@pytest.mark.parametrize("policy", ["keep", "insert=0.5,msp=0.5", "strip", "misplaced", "meta=0.5",
                                    "meta=misplaced", "meta=strip"])
def test_no_metadata_token_is_ever_a_target(built, policy):
    """MLM: a metadata token is neither a target nor replaced; causal: its label is IGNORE, and the first text
    token after it is predicted; T5: no noise span covers one. Under every policy, at the positions the policy
    left metadata at."""
    info = built[0]
    samples = _meta_samples(built)
    mlm, causal, t5 = (c.__class__(info, sp_policy=policy, seed=3) for c in _collators(info))
    _, _, rows, _ = mlm._prepare(samples)
    metas = [_meta_mask(r)[: r["length"]] for r in rows]
    assert policy == "meta=strip" or sum(m.sum() for m in metas) > 0
    b = mlm(samples)
    for i, (r, m) in enumerate(zip(rows, metas)):
        n = r["length"]
        assert (b["labels"][i][:n][m] == IGNORE).all()
        assert torch.equal(b["input_ids"][i][:n][m], torch.from_numpy(r["input_ids"][:n][m]))
    assert (b["labels"] != IGNORE).sum() > 0
    b = causal(samples)
    ends = 0
    for i, (r, m) in enumerate(zip(rows, metas)):
        n = r["length"]
        assert (b["labels"][i][:n][m] == IGNORE).all()
        for s, e in r["meta_spans"].tolist():
            if e < n:
                assert int(b["labels"][i][e]) == int(r["input_ids"][e])   # the text is predicted from the metadata
                ends += 1
        assert torch.equal(b["labels"][i][:n][~m & (b["labels"][i][:n] != IGNORE).numpy()],
                           torch.from_numpy(r["input_ids"][:n][~m & (b["labels"][i][:n] != IGNORE).numpy()]))
    assert policy == "meta=strip" or ends > 0
    b = t5(samples)
    sentinels = set(t5.sentinels.tolist())
    for i, (r, m) in enumerate(zip(rows, metas)):
        toks, noise = _t5_noise(b, i, sentinels)
        assert toks == r["input_ids"][: r["length"]].tolist()
        assert not np.asarray(noise)[m].any()


def test_samples_without_metadata_collate_as_before(built):
    """A sample whose build has no metadata column and one with an empty column give the same batches."""
    info, samples = built
    empty = [{**s, "meta_spans": b""} for s in samples[:16]]
    for c in _collators(info):
        a, b = c(samples[:16]), c(empty)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_meta_strip_cuts_exactly_the_metadata(built):
    """meta=strip gives the sample as built without metadata (padded back); with strip, the sample stripped
    of its SPs too: the same tokens, documents and SPs as the sample before metadata was added."""
    info, samples = built
    meta = _meta_samples(built)
    for policy in ("meta=strip", "strip,meta=strip", "insert=0.5,meta=strip"):
        sp_only = SPPolicy.parse(policy.replace(",meta=strip", "").replace("meta=strip", "keep"))
        for raw, plain in zip(meta, samples):
            a, p = as_arrays(raw), as_arrays(plain)
            got = apply_policy(a, SPPolicy.parse(policy), info, sample_key(a["input_ids"], a["source_id"], 0))
            want = apply_policy(p, sp_only, info, sample_key(a["input_ids"], a["source_id"], 0))
            n = want.get("length", len(p["input_ids"]))
            assert got["length"] == n and len(got["input_ids"]) == len(a["input_ids"])
            assert got["input_ids"][:n].tolist() == want["input_ids"][:n].tolist()
            assert (got["input_ids"][n:] == info.pad_id).all() and got["meta_spans"].shape == (0, 2)
            for k in ("doc_offsets", "sp_positions", "msp_mask", "doc_keys"):
                assert np.array_equal(got[k], want[k]), (policy, k)
            assert np.array_equal(got["input_ids"][:n], a["input_ids"][got["origin"]])


@pytest.mark.parametrize("policy", ["meta=strip", "meta=0.5", "meta=misplaced", "msp=0.3,meta=0.5",
                                    "misplaced,meta=misplaced", "msp=0.5"])
def test_the_batch_wide_meta_policy_equals_the_per_sample_one(built, policy):
    """The collators edit metadata over the whole batch at once; each row is exactly what ``apply_policy`` gives
    the sample alone (with the batch's donors for misplaced): tokens, length, documents, SPs, spans, origins."""
    from sptok.data.policy import SLOT_MSP, apply_meta_policy, draws, meta_pool, misplaced_sp_map

    info, samples = built
    raw = _meta_samples(built, 30, start=5) + samples[:3]   # and samples with no metadata column
    arrays = [as_arrays(s) for s in raw]
    keys = np.array([sample_key(a["input_ids"], a["source_id"], 9) for a in arrays], np.uint64)
    p = SPPolicy.parse(policy)
    um = draws(keys, max(len(a["sp_positions"]) for a in arrays), SLOT_MSP) if p.msp is not None else None
    sp_map = misplaced_sp_map(info, 9)
    got = apply_meta_policy(arrays, p, info, keys, um, sp_map, 9)
    pool = meta_pool(arrays)
    cut = pushed = 0
    for b, (a, key) in enumerate(zip(arrays, keys)):
        want = apply_policy(a, p, info, key, len(a["input_ids"]), None, None if um is None else um[b], pool, sp_map)
        assert got[b].keys() == want.keys(), (policy, b)
        for k in want:
            assert np.array_equal(got[b][k], want[k]), (policy, b, k)
        cut += want.get("length", len(a["input_ids"])) < len(a["input_ids"])
        pushed += "origin" in want and (want["origin"] >= 0).sum() < (~_meta_mask(a)).sum()
    assert policy != "meta=strip" or cut > 20
    assert "meta=misplaced" not in policy or pushed > 0      # a longer value pushed text out of some samples


def test_meta_q_keeps_each_span_at_its_rate(built):
    info = built[0]
    meta = [as_arrays(s) for s in _meta_samples(built, len(built[1]))]
    kept = total = 0
    for a in meta:
        key = sample_key(a["input_ids"], a["source_id"], 7)
        got = apply_policy(a, SPPolicy.parse("meta=0.5"), info, key)
        assert got is not a and np.array_equal(apply_policy(a, SPPolicy.parse("meta=0.5"), info, key)["input_ids"],
                                               got["input_ids"])   # keyed: the same draws every time
        want = [a["input_ids"][s:e].tolist() for s, e in a["meta_spans"].tolist()]
        have = [got["input_ids"][s:e].tolist() for s, e in got["meta_spans"].tolist()]
        assert all(h in want for h in have)
        n = got.get("length", len(a["input_ids"]))
        assert (~_meta_mask(got)[:n]).sum() == (~_meta_mask(a)).sum()                # only metadata went
        kept, total = kept + len(have), total + len(want)
        assert apply_policy(a, SPPolicy.parse("meta=1"), info, key)["input_ids"].tolist() == a["input_ids"].tolist()
    assert total > 150 and 0.4 < kept / total < 0.6


def test_meta_misplaced_gives_another_value_of_the_batch(built):
    """Each span gets a value of another document of the batch (other tokens), the text is untouched, the
    sample keeps its length (cut where a longer value pushed text out), and the batch is the same in any order."""
    info = built[0]
    raw = _meta_samples(built)
    coll = CausalLMCollator(info, sp_policy="meta=misplaced", seed=1, eval_targets=True)   # rows keep origins
    _, _, rows, _ = coll._prepare(raw)
    arrays = [as_arrays(s) for s in raw]
    values = {a["input_ids"][s:e].tobytes() for a in arrays for s, e in a["meta_spans"].tolist()}
    moved = 0
    for a, r in zip(arrays, rows):
        own = [a["input_ids"][s:e].tobytes() for s, e in a["meta_spans"].tolist()]
        got = [r["input_ids"][s:e].tobytes() for s, e in r["meta_spans"].tolist()]
        assert len(r["input_ids"]) == len(a["input_ids"]) and r["length"] <= len(a["input_ids"])
        for k, g in enumerate(got):
            full = r["meta_spans"][k][1] < r["length"]
            assert (g in values) if full else any(v.startswith(g) for v in values)
            assert g != own[k]
            moved += 1
        text = r["origin"] >= 0
        assert np.array_equal(r["input_ids"][: r["length"]][text], a["input_ids"][r["origin"][text]])
        assert ((r["origin"] < 0) == _meta_mask(r)[: r["length"]]).all()      # only metadata was moved in
        assert (r["input_ids"][r["sp_positions"]] == info.sp_ids[a["source_id"]]).all()
        bounds = r["doc_offsets"]
        assert bounds[0] == 0 and (np.diff(bounds) > 0).all() and bounds[-1] < r["length"]
    assert moved >= len(raw)
    order = np.random.default_rng(0).permutation(len(raw))
    a, b = coll(raw), coll([raw[i] for i in order])
    assert all(torch.equal(a[k][order], b[k]) for k in ("input_ids", "labels", "position_ids"))


def test_meta_misplaced_without_another_value_removes_the_metadata(built):
    """When every document of the batch has the same value, none can get a wrong one: its metadata goes (as
    meta=strip), and a batch of one sample is no different."""
    info, samples = built
    same = [with_metadata(s, info, lambda k: "docs.python.org") for s in samples[:8]]
    for batch in (same, same[:1]):
        for c in _collators(info):
            c.set_sp_policy("meta=misplaced")
            got = c(batch)
            c.set_sp_policy("meta=strip")
            want = c(batch)
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_sp_misplaced_swaps_every_sp_for_another_sources(built):
    import dataclasses

    from sptok.sp import derangement

    info, samples = built
    perm = derangement(len(info.sources), 4)
    coll = CausalLMCollator(info, sp_policy="misplaced", seed=4)
    plain = CausalLMCollator(info, seed=4)(samples[:16])
    got = coll(samples[:16])
    sp = np.isin(plain["input_ids"].numpy(), info.sp_ids)
    assert sp.sum() > 0
    want = plain["input_ids"].numpy().copy()
    want[sp] = info.sp_ids[[perm[int(np.flatnonzero(info.sp_ids == t)[0])] for t in want[sp]]]
    assert np.array_equal(got["input_ids"].numpy(), want)
    assert (got["input_ids"].numpy()[sp] != plain["input_ids"].numpy()[sp]).all()
    assert torch.equal(got["sp_target"], plain["sp_target"])
    one = dataclasses.replace(info, sources=info.sources[:1], sp_ids=info.sp_ids[:1])
    with pytest.raises(SptokError, match="has one source; misplacing its SP needs at least two"):
        CausalLMCollator(one, sp_policy="misplaced")


def test_policies_are_keyed_by_sample_content(built):
    """The same sample gets the same row under every keyed policy, in any batch and order (meta=Q, strip, SP
    misplaced); MLM and T5 draws too."""
    info = built[0]
    raw = _meta_samples(built, 16)
    for policy in ("meta=0.5", "insert=0.5,meta=0.3,msp=0.5", "misplaced,meta=strip"):
        for c in _collators(info):
            c.set_sp_policy(policy)
            whole = c(raw)
            halves = [c(raw[8:]), c(raw[:8])]
            for k in ("input_ids", "labels"):
                if whole[k].shape[1] == halves[0][k].shape[1] == halves[1][k].shape[1]:
                    assert torch.equal(whole[k], torch.cat([halves[1][k], halves[0][k]])), (policy, k)


def test_a_meta_strip_cooldown_schedule(built, tmp_path):
    """data.sp_schedule [[0.9, "meta=strip"]]: metadata until 90% of the steps, none after (a real run)."""
    from sptok.train.config import load_config
    from sptok.train.loop import make_collator, pretrain, sp_policy_at

    info = built[0]
    doc = {"model": {"family": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
           "data": {"build": info.path, "sp_schedule": [[0.9, "meta=strip"]]},
           "optim": {"lr": 1e-3, "warmup_steps": 1},
           "train": {"steps": 10, "global_batch_size": 4, "micro_batch_size": 4},
           "log": {"dir": str(tmp_path / "log"), "every": 1, "tensorboard": False}}
    cfg = load_config(None, [], base=doc)
    assert [sp_policy_at(cfg, s) for s in (0, 8, 9)] == ["keep", "keep", "meta=strip"]
    recs = pretrain(cfg, log=lambda m: None)
    assert [r["sp_policy"] for r in recs if "sp_policy" in r] == ["keep"] * 9 + ["meta=strip"]
    coll = make_collator(cfg, info)
    raw = _meta_samples(built, 8)
    coll.set_sp_policy(sp_policy_at(cfg, 9))
    _, _, rows, _ = coll._prepare(raw)
    assert all(len(r["meta_spans"]) == 0 for r in rows)


CONDITIONS = ["keep", "meta=strip", "meta=misplaced", "strip", "misplaced", "insert=0.5,meta=0.5"]


def test_eval_conditions_score_the_same_text_tokens(built):
    """Every condition scores the same samples on the same tokens: the same count per sample, and the same
    token ids at the labels (text and EOS only: no SP, delimiter or metadata)."""
    from sptok.train.evaluate import condition_batches

    info = built[0]
    raw = _meta_samples(built, 20)
    coll = CausalLMCollator(info, seed=2)
    out = condition_batches(coll, raw, CONDITIONS, 6)
    assert [c for c, _ in out] == ["keep", "meta=strip", "meta=misplaced", "strip", "misplaced",
                                   "insert=0.5,meta=0.5"]
    assert coll.policy.is_keep and not coll.eval_targets                 # the training collator is left as it was
    texts = []
    for _, batches in out:
        labels = [b["labels"] for b in batches]
        texts.append([sorted(row[row != IGNORE].tolist()) for lab in labels for row in lab])
        for b in batches:
            lab = b["labels"]
            assert not np.isin(lab.numpy(), info.sp_ids).any() and "eval_origin" not in b
            assert not b["sp_target"].any()
    assert sum(map(len, texts[0])) > 500
    assert sum(row.count(info.eos_id) for row in texts[0]) > 0          # EOS is a target
    assert all(t == texts[0] for t in texts[1:])


def test_eval_conditions_config_and_records(built, tmp_path):
    """eval.conditions is checked in one line each; a run logs one validation record per condition, each with
    its condition, val_loss and val_loss_by_source over equal target counts; without it, records are as before."""
    from sptok.train.config import load_config
    from sptok.train.loop import pretrain

    held = tmp_path / "held"   # the build's own documents, with a validation split to evaluate on
    run_build(os.path.join(os.path.dirname(built[0].path), "m.yaml"), str(held),
              dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=SEQ, msp_prob=0.4, insert_prob=0.8,
                   holdout_docs=3), log=lambda m: None)
    base = {"model": {"family": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                      "intermediate_size": 64},
            "data": {"build": str(held)}, "optim": {"lr": 1e-3, "warmup_steps": 1},
            "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 4},
            "eval": {"every": 2, "samples": 3},
            "log": {"dir": str(tmp_path / "log"), "every": 2, "tensorboard": False}}
    for conditions, match in [(["keep", "meta=often"], r"eval.conditions\[1\]: SP policy 'meta=often'"),
                              (["keep", "meta=keep"], r"eval.conditions\[1\]: 'meta=keep' is the same policy as "
                                                      r"eval.conditions\[0\]"),
                              ("keep", "expected a list"), ([1], "not a policy string")]:
        with pytest.raises(SptokError, match=match) as e:
            load_config(None, [], base={**base, "eval": {**base["eval"], "conditions": conditions}})
        assert "\n" not in str(e.value)
    for data, match in [({"sp_schedule": [[0.9, "meta=sometimes"]]}, r"data.sp_schedule\[0\]: SP policy 'meta=some"),
                        ({"sp_policy": "meta=2"}, r"data.sp_policy: SP policy 'meta=2': meta must be a probability")]:
        with pytest.raises(SptokError, match=match):   # at load time, not when the schedule reaches it
            load_config(None, [], base={**base, "data": {**base["data"], **data}})
    with pytest.raises(SptokError, match="eval.conditions and eval.sp_policy: give one"):
        load_config(None, [], base={**base, "eval": {**base["eval"], "conditions": ["keep"], "sp_policy": "strip"}})
    with pytest.raises(SptokError, match="needs a decoder"):
        load_config(None, [], base={**base, "model": {"family": "bert"}, "eval": {**base["eval"],
                                                                                  "conditions": ["keep"]}})
    cfg = load_config(None, [], base={**base, "eval": {**base["eval"], "conditions": CONDITIONS[:5]}})
    recs = [r for r in pretrain(cfg, log=lambda m: None) if r.get("split") == "validation"]
    assert [r["condition"] for r in recs] == CONDITIONS[:5] and all(r["step"] == 2 for r in recs)
    assert all(r["val_targets_by_source"] == recs[0]["val_targets_by_source"] for r in recs)
    assert all(len(r["val_loss_by_source"]) == len(built[0].sources) and r["val_loss"] > 0 for r in recs)
    assert recs[3]["val_loss"] != recs[0]["val_loss"]                     # strip is another condition
    plain = load_config(None, [], base={**base, "log": {**base["log"], "dir": str(tmp_path / "plain")}})
    old = [r for r in pretrain(plain, log=lambda m: None) if r.get("split") == "validation"]
    assert len(old) == 1 and "condition" not in old[0]
    assert old[0]["val_targets_by_source"] != recs[0]["val_targets_by_source"]   # SPs are targets without them


def test_a_real_metadata_build_end_to_end(tmp_path):
    """On a real build with --metadata (once the build side exists): the spans decode to the template, and no
    metadata token is a target in any collator."""
    from dataclasses import fields

    from sptok.build.options import BuildOptions

    if "metadata" not in {f.name for f in fields(BuildOptions)}:
        pytest.skip("sptok build has no --metadata option yet (issue 25's build side)")
    from conftest import demo_corpus

    out = tmp_path / "b"
    run_build(str(demo_corpus(tmp_path, counts=(10, 4, 40, 10))), str(out),
              dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=SEQ, metadata="url:host"),
              log=lambda m: None)
    ds = open_dataset(str(out), weights=False)
    info, samples = ds.build, [ds[i] for i in range(len(ds))]
    ds.close()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{info.tokenizer_dir}/tokenizer.json")
    spans = [as_arrays(s)["meta_spans"] for s in samples]
    assert sum(map(len, spans)) > 0
    inside = [(a, b, e) for a, sp in zip(map(as_arrays, samples), spans) for b, e in sp.tolist() if 0 < b and
              e < len(a["input_ids"])]
    assert inside and all(tok.decode(a["input_ids"][b:e].tolist()).endswith("\n\n") for a, b, e in inside)
    for c in _collators(info):
        b = c(samples[:16])
        for i, s in enumerate(samples[:16]):
            m = _meta_mask(as_arrays(s))
            if isinstance(c, SpanCorruptionCollator):
                assert not np.asarray(_t5_noise(b, i, set(c.sentinels.tolist()))[1])[m].any()
            else:
                assert (b["labels"][i][: len(m)][m] == IGNORE).all()


def test_mix_proxies_are_scored_without_eval_conditions(built, tmp_path):
    """sptok mix reads one validation record per evaluation: a base config's eval.conditions stays out of the
    proxies' configs."""
    from sptok.mix import plan_search
    from sptok.train.config import load_config

    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("model: {family: llama, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}\n"
                   f"data: {{build: {built[0].path}}}\noptim: {{lr: 1.0e-3, warmup_steps: 1}}\n"
                   "train: {steps: 2, global_batch_size: 4, micro_batch_size: 4}\n"
                   f"eval: {{samples: 2, build: {built[0].path}, conditions: [keep, strip]}}\n")
    plan_search(str(cfg), [], str(tmp_path / "search"), 4, 1.0, "natural", 0, log=lambda m: None)
    proxy = load_config(str(tmp_path / "search" / "proxies" / "000" / "config.yaml"))
    assert proxy.eval.conditions is None and load_config(str(cfg)).eval.conditions == ["keep", "strip"]

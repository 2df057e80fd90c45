"""Assembly and packing: SPs, delimiters and EOS where the layout says; cuts keep the metadata aligned."""

from __future__ import annotations

import numpy as np
import pytest

from sptok.build.pack import Packer, Stream, assemble, concat, cut, take_docs
from sptok.sp import Decisions
from sptok.sp_layout import SPLayout


def _layout(position, delim=(90, 91)):
    return SPLayout(position=position, delimiter_ids=delim, delimiter_special=False, eos_id=99)


def _docs():
    texts = [[1, 2, 3], [4], [5, 6]]
    flat = np.array([t for x in texts for t in x], np.uint32)
    lens = np.array([len(x) for x in texts])
    dec = Decisions(np.array([True, False, True]), np.array([True, False, False]), np.array([False, False, True]))
    return flat, lens, dec


@pytest.mark.parametrize("position,ids,sp_pos,masked", [
    ("prefix", [101, 90, 91, 1, 2, 3, 99, 4, 99, 101, 90, 91, 5, 6, 99], [0, 9], [1, 0]),
    ("post", [1, 2, 3, 90, 91, 101, 99, 4, 99, 5, 6, 90, 91, 101, 99], [5, 13], [0, 1]),
    ("both", [101, 90, 91, 1, 2, 3, 90, 91, 101, 99, 4, 99, 101, 90, 91, 5, 6, 90, 91, 101, 99],
     [0, 8, 12, 19], [1, 0, 0, 1]),
])
def test_assemble_layout(position, ids, sp_pos, masked):
    flat, lens, dec = _docs()
    s, counts = assemble(flat, lens, 101, np.array([7, 8, 9], np.uint64), dec, _layout(position))
    assert s.ids.tolist() == ids
    assert s.sp_pos.tolist() == sp_pos and s.sp_masked.tolist() == masked
    assert s.seg_keys.tolist() == [7, 8, 9]
    sites = 2 if position == "both" else 1
    assert counts == {"text_tokens": 6, "sp_inserted": 2 * sites, "sp_masked": sum(masked),
                      "delimiter_tokens": 2 * 2 * sites, "eos_tokens": 3}


def test_packer_cuts_keep_everything():
    rng = np.random.default_rng(1)
    pieces, emitted = [], []
    for _ in range(30):
        n = int(rng.integers(1, 20))
        lens = rng.integers(1, 40, size=n)
        flat = rng.integers(0, 80, size=int(lens.sum())).astype(np.uint32)
        ins = rng.random(n) < 0.7
        dec = Decisions(ins, ins & (rng.random(n) < 0.5), np.zeros(n, bool))
        s, _ = assemble(flat, lens, 100, rng.integers(0, 2**62, size=n).astype(np.uint64), dec, _layout("prefix"))
        pieces.append(s)
    p = Packer(64, emitted.append)
    for s in pieces:
        p.add(s)
    tail = p.take_tail()
    whole = pieces[0]
    for s in pieces[1:]:
        whole = concat(whole, s)
    assert all(len(e) == 64 for e in emitted) and len(tail) < 64
    assert np.array_equal(np.concatenate([e.ids for e in emitted] + [tail.ids]), whole.ids)
    # SP positions and masks survive the cuts exactly
    glob_sp = np.concatenate([e.sp_pos + 64 * k for k, e in enumerate(emitted)] + [tail.sp_pos + 64 * len(emitted)])
    assert np.array_equal(glob_sp, whole.sp_pos)
    assert np.array_equal(np.concatenate([e.sp_masked for e in emitted] + [tail.sp_masked]), whole.sp_masked)
    for e in emitted:
        assert e.seg_starts[0] == 0 and len(e.seg_starts) == len(e.seg_keys)
        assert np.all(e.ids[e.sp_pos] == 100)


def test_cut_continues_segment_at_zero():
    s = Stream(np.arange(10, dtype=np.uint32), np.array([0, 4, 7]), np.array([1, 2, 3], np.uint64),
               np.array([4]), np.array([1], np.uint8))
    c = cut(s, 5, 10)
    assert c.seg_starts.tolist() == [0, 2] and c.seg_keys.tolist() == [2, 3]
    assert c.sp_pos.tolist() == [] and c.ids.tolist() == [5, 6, 7, 8, 9]
    c = cut(s, 4, 8)
    assert c.seg_starts.tolist() == [0, 3] and c.sp_pos.tolist() == [0]


@pytest.mark.parametrize("position", ["prefix", "post", "both"])
@pytest.mark.parametrize("keep", [[True, False, True], [False, True, False], [False, False, False], [True] * 3])
def test_take_docs_is_assembling_only_those_documents(position, keep):
    flat, lens, dec = _docs()
    keys = np.array([7, 8, 9], np.uint64)
    whole, _ = assemble(flat, lens, 101, keys, dec, _layout(position))
    k = np.array(keep)
    sub = Decisions(dec.inserted[k], dec.masked_prefix[k], dec.masked_post[k])
    want, _ = assemble(flat[np.repeat(k, lens)], lens[k], 101, keys[k], sub, _layout(position))
    got = take_docs(whole, k)
    for field in ("ids", "seg_starts", "seg_keys", "sp_pos", "sp_masked"):
        assert getattr(got, field).tolist() == getattr(want, field).tolist(), field


@pytest.mark.parametrize("position,ids,spans", [
    ("prefix", [101, 90, 91, 70, 71, 1, 2, 3, 99, 4, 99, 101, 90, 91, 72, 5, 6, 99], [[3, 5], [14, 15]]),
    ("post", [70, 71, 1, 2, 3, 90, 91, 101, 99, 4, 99, 72, 5, 6, 90, 91, 101, 99], [[0, 2], [11, 12]]),
    ("both", [101, 90, 91, 70, 71, 1, 2, 3, 90, 91, 101, 99, 4, 99, 101, 90, 91, 72, 5, 6, 90, 91, 101, 99],
     [[3, 5], [17, 18]]),
])
def test_assemble_puts_metadata_right_before_the_text(position, ids, spans):
    """[SP delim] META text [delim SP] EOS; a document without metadata (the second) as before."""
    flat, lens, dec = _docs()
    meta = (np.array([70, 71, 72], np.uint32), np.array([2, 0, 1]))
    s, counts = assemble(flat, lens, 101, np.array([7, 8, 9], np.uint64), dec, _layout(position), meta)
    assert s.ids.tolist() == ids and s.meta_spans.tolist() == spans
    assert np.all(s.ids[s.sp_pos] == 101)
    assert counts["text_tokens"] == 6 and (counts["meta_docs"], counts["meta_tokens"]) == (2, 3)


def test_cuts_concat_take_and_pad_carry_the_spans():
    """A span cut by a sample edge keeps its inside part in each sample; rejoined, the spans are the stream's;
    take_docs keeps the spans of the kept documents; pad keeps them."""
    from sptok.build.pack import pad

    rng = np.random.default_rng(2)
    pieces, emitted = [], []
    for _ in range(20):
        n = int(rng.integers(1, 10))
        lens = rng.integers(1, 30, size=n)
        mlens = rng.integers(0, 6, size=n) * (rng.random(n) < 0.7)
        ins = rng.random(n) < 0.7
        dec = Decisions(ins, ins & (rng.random(n) < 0.5), np.zeros(n, bool))
        s, _ = assemble(rng.integers(0, 70, size=int(lens.sum())).astype(np.uint32), lens, 100,
                        rng.integers(0, 2**62, size=n).astype(np.uint64), dec, _layout("both"),
                        (np.full(int(mlens.sum()), 77, np.uint32), mlens))
        pieces.append(s)
    whole = pieces[0]
    for s in pieces[1:]:
        whole = concat(whole, s)
    assert np.all(whole.ids[np.concatenate([np.arange(a, b) for a, b in whole.meta_spans])] == 77)
    assert (whole.ids == 77).sum() == np.diff(whole.meta_spans, axis=1).sum()
    p = Packer(16, emitted.append)
    for s in pieces:
        p.add(s)
    samples = emitted + [p.take_tail()]
    rejoined = []
    for k, e in enumerate(samples):
        assert np.all((e.meta_spans >= 0) & (e.meta_spans <= len(e))) and np.all(np.diff(e.meta_spans, axis=1) > 0)
        for a, b in e.meta_spans + 16 * k:
            if rejoined and rejoined[-1][1] == a and a % 16 == 0:   # the rest of a span cut by the edge
                rejoined[-1][1] = b
            else:
                rejoined.append([a, b])
    assert rejoined == whole.meta_spans.tolist()
    keep = rng.random(len(whole.seg_keys)) < 0.5
    sub = take_docs(whole, keep)
    assert (sub.ids == 77).sum() == np.diff(sub.meta_spans, axis=1).sum()
    assert np.all(sub.ids[np.concatenate([np.arange(a, b) for a, b in sub.meta_spans] or [[]]).astype(int)] == 77)
    assert pad(samples[-1], 16, 0).meta_spans.tolist() == samples[-1].meta_spans.tolist()
    back = Stream.from_npz(whole.to_npz())
    assert back.meta_spans.tolist() == whole.meta_spans.tolist() and whole.copy().meta_spans.shape[1] == 2


@pytest.mark.parametrize("position", ["prefix", "post", "both"])
@pytest.mark.parametrize("mean_len", [3, 500])
@pytest.mark.parametrize("with_meta", [False, True])
def test_assemble_lays_out_short_and_long_documents_alike(position, mean_len, with_meta):
    """Long documents are copied one slice each, short ones through a mask: the same layout either way, as
    written out document by document, metadata right before the text."""
    rng = np.random.default_rng(mean_len)
    lens = rng.integers(1, 2 * mean_len, 40)
    flat = rng.integers(0, 1000, int(lens.sum())).astype(np.uint32)
    dec = Decisions(rng.random(40) < 0.7, rng.random(40) < 0.5, rng.random(40) < 0.5)
    mlens = rng.integers(0, 5, 40) if with_meta else np.zeros(40, np.int64)
    mflat = rng.integers(2000, 3000, int(mlens.sum())).astype(np.uint32)
    lay = _layout(position)
    s, _ = assemble(flat, lens, 101, np.arange(40, dtype=np.uint64), dec, lay, (mflat, mlens) if with_meta else None)
    want, at, mat = [], 0, 0
    for i, n in enumerate(lens):
        text, sp = flat[at:at + n].tolist(), [101] if dec.inserted[i] else []
        meta = mflat[mat:mat + mlens[i]].tolist()
        at, mat = at + n, mat + mlens[i]
        pre = sp + [90, 91] if sp and lay.prefix else []
        post = [90, 91] + sp if sp and lay.post else []
        want += pre + meta + text + post + [99]
    assert s.ids.tolist() == want


@pytest.mark.parametrize("position", ["prefix", "post", "both"])
@pytest.mark.parametrize("with_meta", [False, True])
def test_runs_inside_a_long_document_are_the_samples_cut_one_by_one(position, with_meta):
    """The packer hands the middle of a long document on as runs (one row per sample); expanded, they are the
    samples it cuts one at a time, in the same order, with the same segments, SPs and metadata spans (a sample
    holding metadata, here a 70-token span, is no part of a run)."""
    rng = np.random.default_rng(3)
    lens = np.array([5, 64 * 40 + 17, 30, 64 * 9, 3])
    flat = rng.integers(0, 1000, int(lens.sum())).astype(np.uint32)
    dec = Decisions(np.array([True, True, False, True, True]), np.ones(5, bool), np.zeros(5, bool))
    mlens = np.array([2, 70, 0, 3, 1])
    meta = (np.full(int(mlens.sum()), 2000, np.uint32), mlens) if with_meta else None
    s, _ = assemble(flat, lens, 101, np.arange(5, dtype=np.uint64) + 7, dec, _layout(position), meta)
    one, runs = [], []
    p = Packer(64, one.append)
    q = Packer(64, lambda x: runs.append([x]), emit_run=lambda ids, key: runs.append(
        [Stream(r, np.zeros(1, np.int64), np.array([key], np.uint64), np.empty(0, np.int64), np.empty(0, np.uint8))
         for r in ids]))
    for part in (cut(s, 0, 30), cut(s, 30, 1000), cut(s, 1000, len(s))):   # the first holds no sample
        p.add(part.copy())
        q.add(part.copy())
    assert sum(len(r) > 1 for r in runs) >= 2       # the two long documents went as runs
    both = [x for r in runs for x in r]
    assert len(both) == len(one) == p.samples == q.samples
    for a, b in zip(one, both):
        for k, v in a.to_npz().items():
            assert np.array_equal(v, getattr(b, k)) and v.dtype == getattr(b, k).dtype, k
    assert all(np.array_equal(v, w) for v, w in zip(p.take_tail().to_npz().values(), q.take_tail().to_npz().values()))

"""One SP layout, every user: for each position and kind of delimiter, the build, the load-time policy, `sptok
show`, and `sptok label` (the placed fine-tuning inputs and the scored SP slots) lay the SP, its delimiter and EOS
out where the table below says."""

from __future__ import annotations

import itertools
import os
import shutil

import numpy as np
import pytest
from conftest import TOKENIZER, demo_records, write_jsonl

from sptok import layout as build_dir
from sptok.build.options import POSITIONS
from sptok.build_info import BuildInfo
from sptok.shards import ShardReader, as_arrays
from sptok.sp_layout import SPLayout

# A document that carries its SP, piece by piece: SP, D (the delimiter's tokens), T (the text), EOS.
TABLE = {"prefix": ["SP", "D", "T", "EOS"], "post": ["T", "D", "SP", "EOS"], "both": ["SP", "D", "T", "D", "SP", "EOS"]}
DELIMITERS = {"none": "", "special": "<SPSEP>", "text": " :: "}
CASES = list(itertools.product(POSITIONS, DELIMITERS))


def test_the_table_covers_every_position():
    assert set(TABLE) == set(POSITIONS)


def _expand(position: str, sp, delim: list, text: list, eos, keep=(True, True)) -> tuple[list, list[str]]:
    """The document as the table lays it out: its tokens and each token's kind. ``keep``: whether each of its
    SPs stays; a dropped SP takes its delimiter along (the D after a prefix SP, the D before a post SP)."""
    pieces = TABLE[position]
    gone = set()
    for rank, j in enumerate(j for j, p in enumerate(pieces) if p == "SP"):
        if not keep[rank]:
            gone |= {j, j + 1 if j < pieces.index("T") else j - 1}
    ids, kinds = [], []
    for j, piece in enumerate(pieces):
        part = [] if j in gone else {"SP": [sp], "D": delim, "T": text, "EOS": [eos]}[piece]
        ids += part
        kinds += [piece] * len(part)
    return ids, kinds


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp-layout")
    recs = [r for r in demo_records("fortunes", 40) if len(r["text"]) < 200][:3]
    write_jsonl(d / "f.jsonl", recs)
    (d / "m.yaml").write_text("sources:\n  - {name: fortunes, paths: f.jsonl, id_field: id}\n")
    return d, [r["text"] for r in recs]


@pytest.fixture(scope="module")
def builds(docs, tmp_path_factory):
    """(position, delimiter kind) -> the build's directory: one source, three short documents, one sample."""
    from sptok.build import run_build

    d, _ = docs
    out = {}
    for position, kind in CASES:
        o = tmp_path_factory.mktemp(f"{position}-{kind}") / "out"
        run_build(str(d / "m.yaml"), str(o), dict(tokenizer=str(TOKENIZER), position=position,
                                                  delimiter=DELIMITERS[kind], seq_len=1024, msp_prob=0.5,
                                                  quiet=True, workers=1), log=lambda m: None)
        out[position, kind] = str(o)
    return out


def _case(builds, docs, position, kind):
    """The build's sample, its BuildInfo, the text ids of its documents, and the sample the table predicts."""
    from tokenizers import Tokenizer

    from sptok.build.tokenizer import text_encoder

    out = builds[position, kind]
    info = BuildInfo.load(out)
    s = as_arrays(ShardReader(f"{out}/fortunes", info.format)[0])
    enc = text_encoder(Tokenizer.from_file(build_dir.tokenizer_json(out)))
    texts = [e.ids for e in enc.encode_batch(docs[1], add_special_tokens=False)]
    lay, sp = info.layout, int(info.sp_ids[0])
    want = [_expand(position, sp, list(lay.delimiter_ids), t, lay.eos_id) for t in texts]
    return info, s, texts, want


@pytest.mark.parametrize("position,kind", CASES)
def test_every_user_lays_the_sp_out_as_the_table_says(builds, docs, position, kind, tmp_path):
    from sptok.data.policy import SLOT_INSERT, SPPolicy, apply_policy, draws
    from sptok.inspect.show import KINDS, mark_tokens
    from sptok.label.modes import place, place_ids
    from sptok.label.scoring import slot_input
    from sptok.label.table import load_table

    info, s, texts, want = _case(builds, docs, position, kind)
    lay = info.layout
    assert lay == SPLayout(position, lay.delimiter_ids, kind == "special", lay.eos_id, DELIMITERS[kind])
    n = len(lay.delimiter_ids)
    assert n == 0 if kind == "none" else n == 1 if kind == "special" else n >= 2   # text: several tokens
    exported = tmp_path / "export"              # what label reads of an exported model: its build's sptok.json
    exported.mkdir()
    shutil.copy(os.path.join(builds[position, kind], "sptok.json"), exported)
    assert load_table(str(exported)).layout == lay                       # label reads the same layout
    ids = [i for doc, _ in want for i in doc]
    kinds = [k for _, ks in want for k in ks]
    # the build (worker context, pack.assemble, finalize): the sample is the table's documents back to back
    assert s["input_ids"].tolist() == ids
    assert s["sp_positions"].tolist() == [i for i, k in enumerate(kinds) if k == "SP"]
    assert info.is_post(s).tolist() == [kinds[i + 1] == "EOS" for i in s["sp_positions"]]
    # sptok show marks each token with its kind
    masked = dict(zip(s["sp_positions"].tolist(), s["msp_mask"].tolist()))
    marks = [("msp" if masked[i] else "sp") if k == "SP" else {"D": "delim", "T": "text", "EOS": "eos"}[k]
             for i, k in enumerate(kinds)]
    assert [KINDS[k] for k in mark_tokens(s, lay, len(ids))] == marks
    # the load-time policy: strip leaves text and EOS; insert=q drops SPs, each with its delimiter
    stripped = apply_policy(s, SPPolicy.parse("strip"), info, np.uint64(7))
    plain = [i for i, k in zip(ids, kinds) if k in ("T", "EOS")]
    assert stripped["input_ids"][: stripped["length"]].tolist() == plain and stripped["length"] == len(plain)
    n_sp = len(s["sp_positions"])
    key = next(np.uint64(k) for k in range(100) if 0 < (draws(np.uint64(k), n_sp, SLOT_INSERT) < 0.5).sum() < n_sp)
    keep = iter((draws(key, n_sp, SLOT_INSERT) < 0.5).tolist())    # which SPs the policy keeps, in sample order
    sites = TABLE[position].count("SP")
    kept = [i for t in texts for i in _expand(position, int(info.sp_ids[0]), list(lay.delimiter_ids), t,
                                              lay.eos_id, [next(keep) for _ in range(sites)])[0]]
    half = apply_policy(s, SPPolicy.parse("insert=0.5"), info, key)
    assert half["input_ids"][: half["length"]].tolist() == kept and len(kept) < len(ids)
    # sptok label: the fine-tuning inputs, as ids and as strings
    for t, (doc, _) in zip(texts, want):
        assert place_ids(lay, int(info.sp_ids[0]), t, None) == (doc, None)
    sp_text, delim_text = info.raw["sp_table"][0]["sp"], DELIMITERS[kind]
    wrapped = _expand(position, sp_text, [delim_text] if delim_text else [], ["TEXT"], "")[0]
    assert place(lay, sp_text, "TEXT", None) == ("".join(wrapped), None)
    # sptok label's scored input: the document with a slot where each SP is
    slot = 10_000
    for t, (doc, ks) in zip(texts, want):
        sps = [i for i, k in enumerate(ks) if k == "SP"]
        masked = [slot if k == "SP" else i for i, k in zip(doc, ks)]
        assert slot_input("encoder", lay, t, 1000, slot) == (masked, sps)
        t5 = [slot + sps.index(j) if j in sps else i for j, i in enumerate(doc)]
        assert slot_input("seq2seq", lay, t, 1000, slot) == (t5, sps[:1])
        if position == "post":
            assert slot_input("decoder", lay, t, 1000, None) == (doc[: sps[0]], [sps[0] - 1])


@pytest.mark.parametrize("position,ids,sp_pos,delims", [
    ("prefix", [100, 90, 91, 5, 99], [0], [1, 2]),        # the whole delimiter after a prefix SP
    ("prefix", [100, 90, 5, 6, 99], [0], []),             # a token that merely matches half of it is text
    ("post", [5, 6, 91, 100, 99], [3], []),               # the same before a post SP
    ("post", [91, 100, 99], [1], [0]),                    # cut by the sample's start: the part inside is it
    ("prefix", [7, 100, 90], [1], [2]),                   # cut by the sample's end
])
def test_a_delimiter_is_taken_whole_or_not_at_all(position, ids, sp_pos, delims):
    """The one rule, for show and for the load-time policy alike (they used to differ on a partial match)."""
    from types import SimpleNamespace

    from sptok.data.policy import SPPolicy, apply_policy
    from sptok.inspect.show import DELIM, mark_tokens

    lay = SPLayout(position, (90, 91), False, 99, " :: ")
    s = {"input_ids": np.array(ids), "sp_positions": np.array(sp_pos), "msp_mask": np.zeros(1, bool),
         "doc_offsets": np.array([0]), "source_id": 0}
    assert lay.delimiter_positions(s["input_ids"], s["sp_positions"], lay.is_post(s)).tolist() == delims
    assert np.flatnonzero(mark_tokens(s, lay, len(ids)) == DELIM).tolist() == delims
    info = SimpleNamespace(layout=lay, delimiter_special=False, pad_id=0, eos_id=99)
    out = apply_policy(s, SPPolicy.parse("strip"), info, np.uint64(0))
    assert out["input_ids"][: out["length"]].tolist() == [t for i, t in enumerate(ids) if i not in sp_pos + delims]

"""Document-confined attention built on the device (sptok.data.attention), for BERT (MLM + MSP) and T5 (span
corruption): changing every other document of a packed sample leaves the logits at a masked SP unchanged, through
sptok's LossModel and through a Hugging Face model given `apply_document_attention`; without the document masks
the same change does move them (the test can fail)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SOURCES, TOKENIZER, demo_records, write_jsonl

from sptok.build import run_build
from sptok.data import IGNORE, BuildInfo, MLMCollator, SpanCorruptionCollator, apply_document_attention
from sptok.train.config import ModelConfig
from sptok.train.losses import LossModel
from sptok.train.model import build_model

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
OFFSETS, SEQ = [0, 30, 64], 96          # three documents; the middle one's SP is masked for MSP


@pytest.fixture(scope="module")
def info(tmp_path_factory) -> BuildInfo:
    d = tmp_path_factory.mktemp("attention")
    for name in SOURCES:
        write_jsonl(d / f"{name}.jsonl", demo_records(name, 8))
    (d / "m.yaml").write_text("sources:\n" + "".join(f"  - {{name: {n}, paths: {n}.jsonl}}\n" for n in SOURCES))
    run_build(str(d / "m.yaml"), str(d / "out"), dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=SEQ),
              log=lambda m: None)
    return BuildInfo.load(str(d / "out"))


def _sample(info: BuildInfo, seed: int) -> dict:
    """A packed sample of three documents laid out as a prefix build lays them: SP, delimiter, text, EOS."""
    ids = np.random.default_rng(seed).choice(info.ordinary_ids, SEQ)
    for start, end in zip(OFFSETS, OFFSETS[1:] + [SEQ]):
        ids[start], ids[start + 1], ids[end - 1] = info.sp_ids[0], info.delimiter_ids[0], info.eos_id
    return {"input_ids": ids, "source_id": 0, "doc_offsets": np.array(OFFSETS),
            "sp_positions": np.array(OFFSETS, "<u4").tobytes(), "msp_mask": np.array([0, 1, 0], np.uint8).tobytes()}


def _other_documents_changed(info: BuildInfo, batch: dict, seed: int) -> dict:
    """The batch with every token of documents 0 and 2 replaced (their SPs by another source's SP): in the
    encoder input and, for T5, in the targets the decoder reads."""
    rng = np.random.default_rng(seed)
    out = dict(batch)
    for ids_key, doc_key in (("input_ids", "doc_ids"), ("labels", "decoder_doc_ids")):
        if doc_key not in batch:
            continue
        ids = batch[ids_key].numpy().copy()
        other = (batch[doc_key].numpy() >= 0) & (batch[doc_key].numpy() != 1) & (ids != IGNORE)
        ids[other] = np.where(np.isin(ids[other], info.sp_ids), info.sp_ids[1], rng.choice(info.ordinary_ids,
                                                                                           int(other.sum())))
        out[ids_key] = torch.from_numpy(ids)
    return out


def _one_document(batch: dict) -> dict:
    """The same batch without document masking: each sample one document."""
    out = dict(batch)
    for key in ("doc_ids", "decoder_doc_ids"):
        if key in batch:
            out[key] = torch.where(batch[key] >= 0, 0, -1).to(batch[key].dtype)
    return out


def _model(info, family):
    """A random model whose outputs depend strongly on every visible token (BERT's usual 0.02 init barely
    mixes tokens, which would make a leak hard to see)."""
    torch.manual_seed(0)
    extra = {"initializer_range": 0.5} if family == "bert" else {}
    return build_model(ModelConfig(family=family, extra=extra, **TINY), info).eval()


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_a_masked_sp_cannot_be_read_from_another_document(info, family):
    coll = (MLMCollator if family == "bert" else SpanCorruptionCollator)(info, seed=1)
    batch = coll([_sample(info, 0)])
    changed = _other_documents_changed(info, batch, 1)
    assert not torch.equal(changed["input_ids"], batch["input_ids"])
    lm = LossModel(_model(info, family), family, info.sp_ids.tolist())
    with torch.no_grad():
        runs = [lm(b) for b in (batch, changed, _one_document(batch), _one_document(changed))]
    sp = runs[0]["sp"]
    assert int(sp.sum()) == 1                     # the middle document's SP, the only MSP target
    torch.testing.assert_close(runs[1]["loss"][sp], runs[0]["loss"][sp], rtol=0, atol=1e-5)
    assert (runs[3]["loss"][sp] - runs[2]["loss"][sp]).abs().item() > 1e-3   # unconfined, it leaks


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_apply_document_attention_gives_hugging_face_models_the_same_confinement(info, family):
    coll = (MLMCollator if family == "bert" else SpanCorruptionCollator)(info, seed=1, extras=False)
    batch = coll([_sample(info, 0)])
    changed = _other_documents_changed(info, batch, 1)
    model = apply_document_attention(_model(info, family))
    sp_slot = batch["labels"] == info.sp_ids[0]          # the masked SP: the only SP among the labels
    assert int(sp_slot.sum()) == 1
    with torch.no_grad():
        a, b = model(**batch).logits[sp_slot], model(**changed).logits[sp_slot]
        c, d = model(**_one_document(batch)).logits[sp_slot], model(**_one_document(changed)).logits[sp_slot]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (c - d).abs().max().item() > 1e-3
    # the wrapped model is still the Hugging Face model: same class, and a plain batch still works
    assert type(model).__name__ in ("BertForMaskedLM", "T5ForConditionalGeneration")
    plain = (MLMCollator if family == "bert" else SpanCorruptionCollator)(info, seed=1, extras=False,
                                                                         doc_attention=False)
    assert torch.isfinite(model(**plain([_sample(info, 0)])).loss)


def test_t5_documents_in_the_batch(info):
    """Sentinels belong to their span's document, no span crosses a document, the decoder restarts per document."""
    from sptok.data.attention import _shift_right_per_document

    s = _sample(info, 3)
    b = SpanCorruptionCollator(info, seed=2, noise_density=0.5)([s])
    doc_in, doc_out = b["doc_ids"][0].numpy(), b["decoder_doc_ids"][0].numpy()
    assert (np.diff(doc_in) >= 0).all() and set(doc_in) == {0, 1, 2}
    assert (np.diff(doc_out) >= 0).all() and set(doc_out) == {0, 1, 2}
    sentinel = b["labels"][0].numpy() >= info.vocab_size
    for d in (0, 1, 2):     # each document's targets start with a sentinel, and its input holds as many
        first = np.flatnonzero(doc_out == d)[0]
        assert sentinel[first]
        assert (b["input_ids"][0].numpy()[doc_in == d] >= info.vocab_size).sum() == sentinel[doc_out == d].sum()
    dec_in = _shift_right_per_document(b["labels"], b["decoder_doc_ids"], 0, 0)[0].numpy()
    starts = np.flatnonzero(np.diff(np.concatenate([[-1], doc_out])) != 0)
    assert (dec_in[starts] == 0).all()

"""In-loop evaluation (eval: in sptok pretrain): the numbers are the hand-computed ones, the same samples
every time, the same on one process and on two (DDP and FSDP), and logged where the issue says."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SOURCES, TOKENIZER, demo_build
from shards import streaming_dataset

from sptok.data import IGNORE, open_dataset
from sptok.errors import SptokError
from sptok.train.config import load_config
from sptok.train.evaluate import Evaluator
from sptok.train.loop import make_collator, pretrain

TINY = {"family": "bert", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return demo_build(tmp_path_factory.mktemp("eval"), msp_prob=0.5, holdout_docs=6)


def _doc(build, tmp_path, **train):
    return {"model": TINY, "data": {"build": str(build)}, "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {"steps": 6, "global_batch_size": 8, "micro_batch_size": 4, **train},
            "eval": {"every": 3, "samples": 3}, "log": {"dir": str(tmp_path / "log"), "every": 3, "tensorboard": False}}


def test_eval_numbers_are_the_hand_computed_ones(build, tmp_path):
    from sptok.data.attention import apply_document_attention
    from sptok.train.losses import LossModel
    from sptok.train.model import build_model

    cfg = load_config(None, [], base=_doc(build, tmp_path))
    info = open_dataset(str(build)).build
    torch.manual_seed(0)
    model = build_model(cfg.model, info)
    collator = make_collator(cfg, info)
    got = Evaluator(cfg, info, collator, 0, 1, torch.device("cpu"))(LossModel(model, "bert", info.sp_ids.tolist()))
    again = Evaluator(cfg, info, collator, 0, 1, torch.device("cpu"))(LossModel(model, "bert", info.sp_ids.tolist()))
    assert got == again                                              # the same samples, the same draws

    # by hand: the first 3 samples of each source of the validation split, the plain transformers model with
    # its attention confined to each document, cross-entropy at every label

    hf = apply_document_attention(model).eval()
    sp_ids = torch.as_tensor(info.sp_ids)
    sums, counts, sp_right, sp_all = [], [], 0, 0
    for name in SOURCES:
        with streaming_dataset(local=str(build / "validation" / name), batch_size=1) as ds:
            batch = collator([ds[i] for i in range(min(3, len(ds)))])
        with torch.no_grad():
            logits = hf(input_ids=batch["input_ids"], doc_ids=batch["doc_ids"]).logits
        target = batch["labels"] != IGNORE
        ce = F.cross_entropy(logits[target].float(), batch["labels"][target], reduction="none")
        sums.append(float(ce.sum()))
        counts.append(int(target.sum()))
        msp = batch["msp_target"][target]
        pred = sp_ids[logits[target][:, sp_ids].argmax(-1)]
        sp_right += int((pred == batch["labels"][target])[msp].sum())
        sp_all += int(msp.sum())
    assert got["val_targets_by_source"] == counts
    assert got["val_loss_by_source"] == pytest.approx([s / c for s, c in zip(sums, counts)], rel=1e-5)
    assert got["val_loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert sp_all > 0 and got["val_sp_targets"] == sp_all and got["val_sp_acc"] == pytest.approx(sp_right / sp_all)


def test_eval_is_logged_and_needs_a_validation_split(build, tmp_path):
    recs = pretrain(load_config(None, [], base=_doc(build, tmp_path)), log=lambda m: None)
    evals = [r for r in recs if r.get("split") == "validation"]
    assert [r["step"] for r in evals] == [3, 6] and all(len(r["val_loss_by_source"]) == 4 for r in evals)
    logged = [json.loads(x) for x in open(tmp_path / "log" / "metrics.jsonl")]
    assert [r for r in logged if r.get("split") == "validation"] == evals
    assert evals[1]["val_loss"] < evals[0]["val_loss"]                # the same samples: the model learned
    doc = _doc(build.parent / "nothing-held-out", tmp_path)
    from sptok.build import run_build

    run_build(str(build.parent / "m.yaml"), str(build.parent / "nothing-held-out"),
              dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=64), log=lambda m: None)
    with pytest.raises(SptokError, match="eval: no validation build: set eval.build, or build .* with --holdout"):
        pretrain(load_config(None, [], base=doc), log=lambda m: None)


def test_training_documents_are_never_scored_as_validation_nor_held_out_ones_trained_on(build, tmp_path):
    """Validation data read as training data, or training data as validation data, was taken silently: the
    split as data.build trained on the held-out documents, and eval.build set to the training build itself or to
    another build of its inputs logged a training loss as val_loss. Both are refused before any step; the
    build's own split, given by name, is taken."""
    from sptok.build import run_build

    other = build.parent / "same-inputs"   # another build of the same files: the held-out documents inside
    if not (other / "sptok.json").exists():
        run_build(str(build.parent / "m.yaml"), str(other), dict(tokenizer=str(TOKENIZER), quiet=True, workers=1,
                                                                  seq_len=64), log=lambda m: None)
    split = build / "validation"
    doc = _doc(split, tmp_path, steps=1, global_batch_size=4)
    with pytest.raises(SptokError, match=rf"^data.build: {split} is the validation split of a build"):
        pretrain(load_config(None, [], base=doc), log=lambda m: None)
    for given, message in ((build, f"^eval.build: {build} is the training build itself"),
                           (other, f"^eval.build: {other} reads input files {build} trains on")):
        doc = _doc(build, tmp_path, steps=1)
        doc["eval"]["build"] = str(given)
        with pytest.raises(SptokError, match=message):
            pretrain(load_config(None, [], base=doc), log=lambda m: None)
    assert not (tmp_path / "log").exists()
    doc = _doc(build, tmp_path, steps=1)
    doc["eval"].update(build=str(split), every=1)
    assert [r["split"] for r in pretrain(load_config(None, [], base=doc), log=lambda m: None)
            if "split" in r] == ["validation"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_eval_is_the_same_on_one_process_and_two(build, tmp_path, parallel):
    from test_train import _torchrun

    one = pretrain(load_config(None, [], base=_doc(build, tmp_path / "one")), log=lambda m: None)
    doc = _doc(build, tmp_path / "two", parallel=parallel)
    (tmp_path / "two.json").write_text(json.dumps(doc))
    _torchrun("-m", "sptok", "pretrain", tmp_path / "two.json")
    two = [json.loads(x) for x in open(tmp_path / "two" / "log" / "metrics.jsonl")]
    a = [r for r in one if r.get("split") == "validation"]
    b = [r for r in two if r.get("split") == "validation"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    for x, y in zip(a, b):
        assert x["val_targets_by_source"] == y["val_targets_by_source"]
        assert y["val_loss_by_source"] == pytest.approx(x["val_loss_by_source"], rel=1e-4)

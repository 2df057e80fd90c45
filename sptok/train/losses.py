"""The trained module: a `transformers` model plus its loss, per target token.

Wrapping both in one module lets DDP / FSDP see a single forward, and lets the LM head run only where
there is a target: for MLM about 15% of the tokens, which halves a small BERT's step on CPU (DESIGN.md).
Attention is confined to each document from the batch's ``doc_ids`` (encoders, T5) or restarting
``position_ids`` (decoders), the mask being built on the device (``sptok.data.attention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions (in B x L) of the labels that are targets. Computed on the host batch, so the device
    never has to be read to learn how many targets there are (boolean indexing on a GPU waits for it)."""
    return (labels != IGNORE).flatten().nonzero().squeeze(1)


def _at(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Rows of a (B, L, ...) tensor at flat B x L positions."""
    return x.flatten(0, 1).index_select(0, flat)


class LossModel(nn.Module):
    """forward(batch) -> per-target-token tensors: ``loss`` (fp32), ``source`` (source id), ``sp`` (the target
    is an SP: MSP for encoders, post SP for decoders) and ``sp_correct`` (the argmax over the SP tokens is right).
    ``batch["target_index"]`` (``label_positions`` of the labels, from the host) is used when present."""

    def __init__(self, model, family: str, sp_ids: list[int]):
        super().__init__()
        self.model = model
        self.family = family
        self.register_buffer("sp_ids", torch.tensor(sp_ids, dtype=torch.long), persistent=False)

    def forward(self, batch: dict) -> dict:
        from ..data.attention import encoder_mask, t5_decoder_states, t5_logits

        at = batch["target_index"] if "target_index" in batch else label_positions(batch["labels"])
        m = self.model
        if self.family == "bert":
            mask = encoder_mask(m, batch["doc_ids"]) if "doc_ids" in batch else batch["attention_mask"]
            hidden = m.bert(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
            logits = m.cls(_at(hidden, at))
            sp = _at(batch["msp_target"], at)
        elif self.family == "llama":   # position t predicts the label at t + 1
            hidden = m.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
            logits = m.lm_head(_at(hidden, at - 1))
            sp = _at(batch["sp_target"], at)
        else:  # t5; without doc_ids each sample is one document
            enc_doc = batch["doc_ids"] if "doc_ids" in batch else batch["attention_mask"].long() - 1
            dec_doc = batch["decoder_doc_ids"] if "doc_ids" in batch else (batch["labels"] != IGNORE).long() - 1
            states = t5_decoder_states(m, batch["input_ids"], enc_doc, batch["labels"], dec_doc)
            logits = t5_logits(m, _at(states, at))
            sp = _at(batch["msp_target"], at)
        labels, source = _at(batch["labels"], at), _at(batch["token_source"], at)
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        with torch.no_grad():
            sp_correct = self.sp_ids[logits[:, self.sp_ids].argmax(-1)] == labels
        return {"loss": loss, "source": source, "sp": sp, "sp_correct": sp_correct}

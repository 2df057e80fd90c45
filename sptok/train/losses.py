"""The trained module: a `transformers` model plus its loss, per target token.

Wrapping both in one module lets DDP / FSDP see a single forward, and lets the LM head run only where
there is a target: for MLM about 15% of the tokens, which halves a small BERT's step on CPU (DESIGN.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE


class LossModel(nn.Module):
    """forward(batch) -> per-target-token tensors: ``loss`` (fp32), ``source`` (source id), ``sp`` (the target
    is an SP: MSP for encoders, post SP for decoders) and ``sp_correct`` (the argmax over the SP tokens is right)."""

    def __init__(self, model, family: str, sp_ids: list[int]):
        super().__init__()
        self.model = model
        self.family = family
        self.register_buffer("sp_ids", torch.tensor(sp_ids, dtype=torch.long), persistent=False)

    def forward(self, batch: dict) -> dict:
        if self.family == "bert":
            hidden = self.model.bert(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state
            target = batch["labels"] != IGNORE
            logits = self.model.cls(hidden[target])
            labels, source, sp = batch["labels"][target], batch["token_source"][target], batch["msp_target"][target]
        elif self.family == "llama":
            kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
            if batch["attention_mask"].dim() == 4:          # a dense block-diagonal causal mask
                kwargs["attention_mask"] = batch["attention_mask"]
            hidden = self.model.model(**kwargs).last_hidden_state
            target = batch["labels"][:, 1:] != IGNORE       # position t predicts token t + 1
            logits = self.model.lm_head(hidden[:, :-1][target])
            labels = batch["labels"][:, 1:][target]
            source, sp = batch["token_source"][:, 1:][target], batch["sp_target"][:, 1:][target]
        else:  # t5
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"])
            target = batch["labels"] != IGNORE
            logits = out.logits[target]
            labels, source, sp = batch["labels"][target], batch["token_source"][target], batch["msp_target"][target]
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        with torch.no_grad():
            sp_correct = self.sp_ids[logits[:, self.sp_ids].argmax(-1)] == labels
        return {"loss": loss, "source": source, "sp": sp, "sp_correct": sp_correct}

"""Score the K source prompts of an exported model for texts it has never seen.

A text is encoded as a build encodes it (special-token strings in it are ordinary text) and laid out as the
build lays out a document, with the SP left for the model to fill:

  encoder (bert)   prefix: [MASK] delim text EOS      post: text delim [MASK] EOS     both: both slots masked
  seq2seq (t5)     the same with a sentinel in each SP slot; the decoder, fed <start> <sentinel 0>, names the
                   SP next (the MSP span of span corruption)
  decoder (llama)  post only: text delim -> the logits at the delimiter's last token give P(SP_k | text, delim)
                   for all K sources in one forward pass

The probabilities are a softmax over the K SP tokens' logits at the slot (for ``both``, the two slots'
log-probabilities are added, then normalised): P(source | the slot holds one of the K SPs). EOS ends the text
only when it fits whole (a truncated document continues in the build, with no EOS). Texts longer than
``max_tokens`` text tokens keep their first ``max_tokens``.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import SptokError
from .table import SPTable


class Scorer:
    def __init__(self, table: SPTable, device: str = "auto", precision: str = "fp32", max_tokens: int | None = None,
                 load_model: bool = True):
        from tokenizers import Tokenizer

        from ..tokenizer import text_encoder

        self.table = table
        d = table.model_dir
        try:
            tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception
            raise SptokError(f"--model {d}: cannot load tokenizer.json ({e})") from None
        for sp, i in zip(table.sps + ([table.delimiter] if len(table.delimiter_ids) == 1 else []),
                         table.sp_ids + table.delimiter_ids[:1]):
            if tok.token_to_id(sp) != i:
                raise SptokError(f"--model {d}: tokenizer.json gives {sp} the id {tok.token_to_id(sp)}, sptok.json "
                                 f"says {i}: the tokenizer is not the build's")
        self.enc = text_encoder(tok)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.sp_ids = np.array(table.sp_ids, np.int64)
        self.delim = list(table.delimiter_ids)
        self.model = None
        if not load_model:
            self.max_tokens = max_tokens
            return
        self.kind = table.kind
        pos = table.position
        if self.kind == "decoder" and pos != "post":
            why = ("the SP opens each document, and a decoder never predicts a document's first token" if
                   pos == "prefix" else "it saw the SP before the text too, so it learned to copy it, not to name "
                   "the source")
            raise SptokError(f"--model {d}: a decoder trained on a build with position {pos} cannot name a source "
                             f"({why}); label with one trained on a position: post build")
        if self.kind != "decoder":
            if self.kind == "encoder":
                if table.mask_token is None or tok.token_to_id(table.mask_token) is None:
                    raise SptokError(f"--model {d}: the tokenizer has no mask token, which the SP slot needs")
                self.slot_id = tok.token_to_id(table.mask_token)
            else:   # SpanCorruptionCollator's sentinels: ids from the tokenizer's vocabulary size upward
                self.slot_id = self.vocab_size
        self.slots = 1 + (pos == "both") if self.kind == "encoder" else 1
        d_len = len(self.delim)
        # positions beside the text: SP slot(s), delimiter(s), EOS; a decoder feeds only text + delimiter
        if self.kind == "decoder":
            self.overhead = d_len
        else:
            self.overhead = (2 if pos == "both" else 1) * (1 + d_len) + 1
        self._load(device, precision)
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) if self.kind != "seq2seq" else None
        room = min(table.seq_len, limit) if limit else table.seq_len
        if max_tokens is None:
            max_tokens = room - self.overhead
        elif limit and max_tokens + self.overhead > limit:
            raise SptokError(f"--max-tokens {max_tokens}: the model takes at most {limit} positions, and "
                             f"{self.overhead} of them hold the SP slot, delimiter and EOS; give at most "
                             f"{limit - self.overhead}")
        if max_tokens < 1:
            raise SptokError(f"--max-tokens: the model's {room} positions leave no room for text")
        self.max_tokens = max_tokens

    # ------------------------------------------------------------------------------------------- model

    def _load(self, device: str, precision: str) -> None:
        import torch
        import transformers as tf

        if device == "cuda" and not torch.cuda.is_available():
            raise SptokError("--device cuda: no GPU is visible")
        self.device = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        cls = {"encoder": tf.AutoModelForMaskedLM, "decoder": tf.AutoModelForCausalLM,
               "seq2seq": tf.AutoModelForSeq2SeqLM}[self.kind]
        d = self.table.model_dir
        try:
            model = cls.from_pretrained(d, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as e:
            raise SptokError(f"--model {d}: cannot load the model weights ({str(e).splitlines()[0]})") from None
        vocab = model.get_output_embeddings().weight.shape[0]
        if int(self.sp_ids.max()) >= vocab or (self.kind == "seq2seq" and self.slot_id >= vocab):
            raise SptokError(f"--model {d}: the model's vocabulary ({vocab}) does not hold the SP ids of sptok.json")
        self.model = model.eval().to(self.device)

    # ------------------------------------------------------------------------------------------- layout

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Text ids, whole, special-token strings in the text kept ordinary text (as a build encodes)."""
        return [e.ids for e in self.enc.encode_batch(texts, add_special_tokens=False)]

    def layout(self, text_ids: list[int]) -> tuple[list[int], list[int]]:
        """(model input ids, the positions to score) for one text."""
        t = list(text_ids[: self.max_tokens])
        whole = len(text_ids) <= self.max_tokens
        d, pos = self.delim, self.table.position
        if self.kind == "decoder":
            ids = t + d
            if not ids:
                raise SptokError("an empty text with no delimiter leaves the decoder nothing to predict the SP from")
            return ids, [len(ids) - 1]
        m, eos = self.slot_id, self.table.eos_id
        if pos == "prefix":
            return [m] + d + t + ([eos] if whole else []), [0]
        if pos == "post":
            return t + d + [m, eos], [len(t) + len(d)]
        if self.kind == "encoder":
            ids = [m] + d + t + d + [m, eos]
            return ids, [0, len(ids) - 2]
        return [m] + d + t + d + [m + 1, eos], [0]    # T5: sentinels 0 and 1; the decoder names the first SP

    # ------------------------------------------------------------------------------------------- scoring

    def probs(self, text_ids: list[list[int]], batch_size: int = 32) -> np.ndarray:
        """P(source) for each text, shape (n, K), longest texts batched together."""
        import torch

        n, K = len(text_ids), len(self.sp_ids)
        out = np.zeros((n, K), np.float64)
        rows = [self.layout(t) for t in text_ids]
        order = sorted(range(n), key=lambda i: -len(rows[i][0]))
        sp = torch.as_tensor(self.sp_ids, device=self.device)
        pad = self.table.pad_id if self.table.pad_id is not None else self.table.eos_id
        with torch.inference_mode():
            for lo in range(0, n, batch_size):
                idx = order[lo: lo + batch_size]
                L = len(rows[idx[0]][0])
                ids = torch.full((len(idx), L), pad, dtype=torch.long)
                att = torch.zeros((len(idx), L), dtype=torch.long)
                for b, i in enumerate(idx):
                    x = rows[i][0]
                    ids[b, : len(x)] = torch.as_tensor(x)
                    att[b, : len(x)] = 1
                ids, att = ids.to(self.device), att.to(self.device)
                slots = torch.as_tensor([rows[i][1] for i in idx], device=self.device)   # (B, S)
                logp = self._sp_logprobs(ids, att, slots, sp)                              # (B, S, K)
                p = torch.softmax(logp.sum(1), -1)
                out[idx] = p.double().cpu().numpy()
        return out

    def _sp_logprobs(self, ids, att, slots, sp):
        import torch

        m = self.model
        rows = torch.arange(len(ids), device=ids.device)[:, None]
        if self.kind == "encoder":
            hidden = m.bert(input_ids=ids, attention_mask=att).last_hidden_state
            logits = m.cls(hidden[rows, slots])
        elif self.kind == "decoder":
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            hidden = m.model(input_ids=ids, attention_mask=att, position_ids=pos).last_hidden_state
            logits = m.lm_head(hidden[rows, slots])
        else:
            start = m.config.decoder_start_token_id
            dec = torch.tensor([[start, self.slot_id]], device=ids.device).expand(len(ids), 2)
            logits = m(input_ids=ids, attention_mask=att, decoder_input_ids=dec).logits[:, 1:2]
        return torch.log_softmax(logits[..., sp].double(), -1)   # fp64: the K probabilities sum to 1


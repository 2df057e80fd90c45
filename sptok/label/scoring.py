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
from ..layout import TOKENIZER_JSON
from ..sp_layout import SPLayout
from .table import SPTable

DEVICES = ("auto", "cpu", "cuda")   # auto: the GPU when there is one
PRECISIONS = ("fp32", "bf16")


class Scorer:
    def __init__(self, table: SPTable, device: str = "auto", precision: str = "fp32", max_tokens: int | None = None,
                 load_model: bool = True):
        from ..build.tokenizer import text_encoder

        self.table = table
        tok = _build_tokenizer(table)
        self.enc = text_encoder(tok)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.sp_ids = np.array(table.sp_ids, np.int64)
        self.delim = list(table.delimiter_ids)
        self.model = None
        if not load_model:
            self.max_tokens = max_tokens
            return
        self.kind = table.kind
        _check_position(table, self.kind)
        if self.kind == "encoder":
            if table.mask_token is None or tok.token_to_id(table.mask_token) is None:
                raise SptokError(f"--model {table.model_dir}: the tokenizer has no mask token, which the SP slot needs")
            self.slot_id = tok.token_to_id(table.mask_token)
        elif self.kind == "seq2seq":   # SpanCorruptionCollator's sentinels: ids from the vocabulary size upward
            self.slot_id = self.vocab_size
        else:                          # a decoder's SP slot is the position after the input
            self.slot_id = None
        # positions beside the text: SP slot(s), delimiter(s), EOS; a decoder feeds only text + delimiter
        lay = table.layout
        self.overhead = len(self.delim) if self.kind == "decoder" else lay.sites * (1 + len(self.delim)) + 1
        self._load(device, precision)
        self.max_tokens = self._text_room(max_tokens)

    def _text_room(self, max_tokens: int | None) -> int:
        """How many text tokens a scored input holds: --max-tokens, else what seq_len (or the model) leaves."""
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) if self.kind != "seq2seq" else None
        room = min(self.table.seq_len, limit) if limit else self.table.seq_len
        if max_tokens is None:
            max_tokens = room - self.overhead
        elif limit and max_tokens + self.overhead > limit:
            raise SptokError(f"--max-tokens {max_tokens}: the model takes at most {limit} positions, and "
                             f"{self.overhead} of them hold the SP slot, delimiter and EOS; give at most "
                             f"{limit - self.overhead}")
        if max_tokens < 1:
            raise SptokError(f"--max-tokens: the model's {room} positions leave no room for text")
        return max_tokens

    # ------------------------------------------------------------------------------------------- model

    def _load(self, device: str, precision: str) -> None:
        import torch
        import transformers as tf
        from safetensors import SafetensorError

        if device == "cuda" and not torch.cuda.is_available():
            raise SptokError("--device cuda: no GPU is visible")
        self.device = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        cls = {"encoder": tf.AutoModelForMaskedLM, "decoder": tf.AutoModelForCausalLM,
               "seq2seq": tf.AutoModelForSeq2SeqLM}[self.kind]
        d = self.table.model_dir
        try:
            model = cls.from_pretrained(d, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:   # RuntimeError: weights of another shape
            raise SptokError(f"--model {d}: cannot load the model weights ({' '.join(str(e).split())[:300]})") from None
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
        return slot_input(self.kind, self.table.layout, text_ids, self.max_tokens, self.slot_id)

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


def slot_input(kind: str, lay: SPLayout, text_ids: list[int], max_tokens: int,
               slot_id: int | None) -> tuple[list[int], list[int]]:
    """(model input ids, the positions to score) for one text: the build's document (``SPLayout.blocks``) with
    the SP slot(s) in place of the SP(s), its text cut to ``max_tokens``."""
    t = list(text_ids[:max_tokens])
    d = list(lay.delimiter_ids)
    if kind == "decoder":   # the document up to its post SP: the logits at its last token name the SP
        ids = t + lay.blocks([slot_id], d)[1][:-1]
        if not ids:
            raise SptokError("an empty text with no delimiter leaves the decoder nothing to predict the SP from")
        return ids, [len(ids) - 1]
    # T5: sentinel 0 in the first SP slot and 1 in a second; the decoder names the first SP
    second = slot_id + 1 if kind == "seq2seq" and lay.prefix else slot_id
    whole = len(text_ids) <= max_tokens   # EOS ends the text only when it fits whole, or a post SP ends it
    ids = lay.blocks([slot_id], d)[0] + t + lay.blocks([second], d)[1] + ([lay.eos_id] if whole or lay.post else [])
    slots = lay.sp_offsets(len(t))
    return ids, slots if kind == "encoder" else slots[:1]


def _build_tokenizer(table: SPTable):
    """The model directory's tokenizer.json, checked to give the SPs (and a special delimiter) the ids of
    sptok.json."""
    from tokenizers import Tokenizer

    d = table.model_dir
    try:
        tok = Tokenizer.from_file(os.path.join(d, TOKENIZER_JSON))
    except Exception as e:  # tokenizers raises a bare Exception
        raise SptokError(f"--model {d}: cannot load tokenizer.json ({e})") from None
    for sp, i in zip(table.sps + ([table.delimiter] if len(table.delimiter_ids) == 1 else []),
                     table.sp_ids + table.delimiter_ids[:1]):
        if tok.token_to_id(sp) != i:
            raise SptokError(f"--model {d}: tokenizer.json gives {sp} the id {tok.token_to_id(sp)}, sptok.json "
                             f"says {i}: the tokenizer is not the build's")
    return tok


def _check_position(table: SPTable, kind: str) -> None:
    """A decoder names the source only from a post SP."""
    pos = table.position
    if kind == "decoder" and pos != "post":
        why = ("the SP opens each document, and a decoder never predicts a document's first token" if
               pos == "prefix" else "it saw the SP before the text too, so it learned to copy it, not to name "
               "the source")
        raise SptokError(f"--model {table.model_dir}: a decoder trained on a build with position {pos} cannot name "
                         f"a source ({why}); label with one trained on a position: post build")

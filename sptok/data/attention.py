"""Attention confined to each document of a packed sample, built where attention runs.

The collators send each token's document (``doc_ids``, B x L, -1 on padding); the mask is made from it on
the model's device at every forward, in the form the attention kernel takes: a boolean B x 1 x L x L mask for
sdpa (the default: the best candidate measured on CPU, ``benchmarks/RESULTS.md``), a flex_attention
``BlockMask``, or an additive float mask for eager attention. Nothing of size L x L ever exists on the host or
crosses to the device.

    model = apply_document_attention(BertForMaskedLM(config))   # Trainer / plain loop: the one line
    loss = model(**MLMCollator(info, extras=False)(samples)).loss

Transformers 4.x and 5.x take masks differently (4.x: BERT a 3-D mask, T5's encoder only a 2-D padding mask;
5.x: prepared 4-D masks as they are); the differences are handled here and nowhere else.
"""

from __future__ import annotations

import functools
import types

import torch

from .collate import IGNORE

_TF4: bool | None = None


def _transformers4() -> bool:
    global _TF4
    if _TF4 is None:
        import transformers

        _TF4 = int(transformers.__version__.split(".")[0]) < 5
    return _TF4


def same_document(q_doc: torch.Tensor, k_doc: torch.Tensor) -> torch.Tensor:
    """(B, Lq), (B, Lk) document ids -> (B, Lq, Lk) bool: the query may attend to the key. Padding (-1) attends
    to padding only, so no row is empty (an empty row would make softmax NaN)."""
    return q_doc[:, :, None] == k_doc[:, None, :]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as eager attention adds it to the scores: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                      torch.finfo(dtype).min)


def _block_mask(doc_ids: torch.Tensor):
    """flex_attention's BlockMask: blocks wholly outside every document are skipped, not computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same(b, h, q, k):
        return doc_ids[b, q] == doc_ids[b, k]

    B, L = doc_ids.shape
    return create_block_mask(same, B, None, L, L, device=doc_ids.device)


def encoder_mask(model, doc_ids: torch.Tensor):
    """The ``attention_mask`` for a BERT-like encoder that keeps each token inside its document."""
    impl = model.config._attn_implementation
    if impl == "flex_attention":
        return _block_mask(doc_ids)
    allowed = same_document(doc_ids, doc_ids)
    if _transformers4():      # 4.x refuses 4-D masks; from a 3-D one it makes the additive mask itself
        return allowed
    return allowed[:, None] if impl == "sdpa" else _additive(allowed[:, None], model.dtype)


# ------------------------------------------------------------------------------------------------ T5

def _shift_right_per_document(labels: torch.Tensor, doc: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """T5's decoder input (the labels shifted right), restarting at each document: a document's first decoder
    input is the start token, not the last target of the document before it."""
    first = torch.ones_like(doc, dtype=torch.bool)
    first[:, 1:] = doc[:, 1:] != doc[:, :-1]
    shifted = torch.where(first, start, labels.roll(1, dims=1))
    return shifted.masked_fill(shifted == IGNORE, pad)


def _t5_stack(stack, input_ids, allowed, encoder_states=None, cross_allowed=None) -> torch.Tensor:
    """``T5Stack.forward`` with document masks. The blocks are called here because transformers 4.x's T5
    encoder takes only a 2-D padding mask (5.x would take ours); block calls are the same in 4.x and 5.x."""
    h = stack.dropout(stack.embed_tokens(input_ids))
    as_mask = (lambda a: a[:, None]) if not _transformers4() and stack.config._attn_implementation == "sdpa" \
        else (lambda a: _additive(a[:, None], h.dtype))
    mask = as_mask(allowed)
    cross = as_mask(cross_allowed) if cross_allowed is not None else None
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)   # 4.x: the relative positions
    bias = cross_bias = None
    for block in stack.block:
        out = block(h, mask, bias, encoder_states, cross, cross_bias, cache_position=positions)
        h, bias = out[0], out[1]
        if encoder_states is not None:
            cross_bias = out[2]
    return stack.dropout(stack.final_layer_norm(h))


def t5_decoder_states(model, input_ids, doc_ids, labels, decoder_doc_ids) -> torch.Tensor:
    """The decoder's last hidden states for a span-corruption batch (``SpanCorruptionCollator``), with the
    encoder, the decoder and the cross-attention each confined to the document a token belongs to."""
    cfg = model.config
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
    decoder_ids = _shift_right_per_document(labels, decoder_doc_ids, start, cfg.pad_token_id)
    Lo = labels.shape[1]
    causal = torch.ones(Lo, Lo, dtype=torch.bool, device=labels.device).tril()
    encoded = _t5_stack(model.encoder, input_ids, same_document(doc_ids, doc_ids))
    return _t5_stack(model.decoder, decoder_ids, same_document(decoder_doc_ids, decoder_doc_ids) & causal,
                     encoded, same_document(decoder_doc_ids, doc_ids))


def t5_logits(model, states: torch.Tensor) -> torch.Tensor:
    """The LM head, with T5's rescaling of tied embeddings (``scale_decoder_outputs`` in 5.x)."""
    cfg = model.config
    if getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings):
        states = states * cfg.d_model ** -0.5
    return model.lm_head(states)


# ------------------------------------------------------------------------------------------------ HF models

def apply_document_attention(model):
    """Make ``model(**batch)`` confine attention to each document when the batch carries ``doc_ids``
    (``MLMCollator`` / ``SpanCorruptionCollator`` with ``doc_attention``): the one line for the Hugging Face
    Trainer or a plain loop. The model is changed in place and returned; ``save_pretrained`` is unaffected.
    Decoders need nothing: ``CausalLMCollator``'s restarting position ids already confine them."""
    original = model.forward
    if model.config.model_type == "t5":
        def forward(self, input_ids=None, labels=None, doc_ids=None, decoder_doc_ids=None, num_items_in_batch=None,
                    **kwargs):
            if doc_ids is None:
                if num_items_in_batch is not None:
                    kwargs["num_items_in_batch"] = num_items_in_batch
                return original(input_ids=input_ids, labels=labels, **kwargs)
            from transformers.modeling_outputs import Seq2SeqLMOutput

            logits = t5_logits(self, t5_decoder_states(self, input_ids, doc_ids, labels, decoder_doc_ids))
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=IGNORE, reduction="sum")
            n = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE).sum()
            return Seq2SeqLMOutput(loss=loss / n, logits=logits)
    else:
        def forward(self, *args, doc_ids=None, **kwargs):
            if doc_ids is not None:
                kwargs["attention_mask"] = encoder_mask(self, doc_ids)
            return original(*args, **kwargs)
    # the original's signature (the Trainer reads it to decide what to pass), as a bound method (accelerate
    # re-wraps forward.__func__)
    model.forward = types.MethodType(functools.wraps(original.__func__)(forward), model)
    return model

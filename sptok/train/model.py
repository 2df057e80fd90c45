"""Models built from `transformers` configs (never downloaded), sized for the build's vocabulary."""

from __future__ import annotations

from ..data import BuildInfo
from ..errors import SptokError
from .config import ModelConfig

PAD_MULTIPLE = 64
T5_SENTINELS = 256   # SpanCorruptionCollator's default max_sentinels: ids from vocab_size upward


def padded_vocab(info: BuildInfo, family: str) -> int:
    """The build's vocabulary (SP tokens included; T5 sentinels after it), padded to a multiple of 64."""
    n = info.vocab_size + (T5_SENTINELS if family == "t5" else 0)
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def hf_config(cfg: ModelConfig, info: BuildInfo):
    """The transformers config of the model, for a build."""
    import transformers as tf

    vocab = padded_vocab(info, cfg.family)
    max_pos = cfg.max_position_embeddings or info.seq_len
    pad = info.pad_id if info.pad_id is not None else 0
    if cfg.family == "bert":
        cls, named = tf.BertConfig, dict(
            vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=max_pos, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, pad_token_id=pad)
    elif cfg.family == "t5":
        cls, named = tf.T5Config, dict(
            vocab_size=vocab, d_model=cfg.hidden_size, num_layers=cfg.num_layers,
            num_decoder_layers=cfg.num_layers, num_heads=cfg.num_heads, d_kv=cfg.hidden_size // cfg.num_heads,
            d_ff=cfg.intermediate_size, dropout_rate=cfg.dropout, pad_token_id=pad,
            eos_token_id=info.eos_id, decoder_start_token_id=pad, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, use_cache=False)
    else:
        cls, named = tf.LlamaConfig, dict(
            vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
            intermediate_size=cfg.intermediate_size, max_position_embeddings=max_pos,
            pad_token_id=pad, eos_token_id=info.eos_id, bos_token_id=info.eos_id,
            tie_word_embeddings=False, use_cache=False, attention_dropout=cfg.dropout)
    taken = sorted(set(cfg.extra) & set(named))
    if taken:
        raise SptokError(f"model.extra.{taken[0]}: sptok sets {cfg.family}'s {taken[0]} itself, from the model "
                         f"settings or the build; give it there, not in model.extra")
    c = cls(**named, **cfg.extra)
    c.use_cache = False   # with the cache on, torch.compile recompiles per layer and falls back to eager
    c._attn_implementation = _attention(cfg, int(tf.__version__.split(".")[0]))
    return c


def _attention(cfg: ModelConfig, tf_major: int) -> str:
    """The attention implementation, checked against what the document masks and transformers support."""
    impl = cfg.attn_implementation
    if cfg.family == "t5" and impl == "flex_attention":
        raise SptokError("model.attn_implementation: T5's document masks take sdpa or eager, not flex_attention")
    if cfg.family == "t5" and tf_major < 5:
        return "eager"    # transformers 4.x has only eager attention for T5
    if cfg.family == "bert" and impl == "flex_attention" and tf_major < 5:
        raise SptokError("model.attn_implementation: flex_attention for bert needs transformers >= 5; use sdpa")
    return impl


def build_model(cfg: ModelConfig, info: BuildInfo):
    import transformers as tf

    c = hf_config(cfg, info)
    cls = {"bert": tf.BertForMaskedLM, "t5": tf.T5ForConditionalGeneration, "llama": tf.LlamaForCausalLM}[cfg.family]
    model = cls(c)
    model.tie_weights()
    if cfg.family == "t5":
        _init_t5_head(model)
    return model


def _init_t5_head(model) -> None:
    """T5's untied output head gets std d_model**-0.5, so the first loss is near ln(vocab) as BERT's and Llama's.

    transformers draws it with std 1.0 and scales the decoder output by d_model**-0.5 only when the head is
    tied: untied, logits have std ~sqrt(d_model) and the first loss was 30-100 nats (ln(vocab) ~ 9)."""
    import torch

    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, model.config.d_model ** -0.5)


def blocks(model):
    """The transformer blocks: the unit of activation checkpointing, compilation and FSDP sharding."""
    family = model.config.model_type
    if family == "bert":
        return list(model.bert.encoder.layer)
    if family == "t5":
        return list(model.encoder.block) + list(model.decoder.block)
    return list(model.model.layers)


def non_embedding_params(model) -> int:
    emb = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or "lm_head" in n or "shared" in n)
    return sum(p.numel() for p in model.parameters()) - emb

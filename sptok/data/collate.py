"""Collators: samples of a build -> batches of tensors for MLM + MSP, causal LM, and T5 span corruption.

Each is a callable for ``DataLoader(collate_fn=...)``. The work is numpy over the whole batch; torch is
touched only to wrap the result. Every random draw is keyed by (seed, sample content, position) — see
``policy.py`` — so a batch is the same whichever worker builds it and after a resume. Every collator
returns ``token_source`` (the source id of each token, -1 on padding) for per-source loss; pass
``extras=False`` for a batch holding only what the model's forward() takes.

Document structure travels compactly — ``doc_ids`` (B x L: each token's document in its sample, -1 on
padding) or restarting ``position_ids`` — and never as an L x L mask: the mask is built where attention
runs, on the device (``attention.py``). A host mask costs L times the batch (67 MB for 32 x 512 in int64).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..build_info import BuildInfo
from ..errors import SptokError
from ..shards import as_arrays
from .policy import SLOT_INSERT, SLOT_MLM, SLOT_MSP, SLOT_T5, SPPolicy, apply_meta_policy, apply_policy, draws, \
    meta_pool, misplaced_sp_map, sample_key

IGNORE = -100


class _Base:
    def __init__(self, info: BuildInfo, sp_policy: str | SPPolicy = "keep", seed: int = 0, extras: bool = True):
        self.info = info
        self.seed = seed
        self.extras = extras
        self._sp_map = None
        self.set_sp_policy(sp_policy)

    def set_sp_policy(self, policy: str | SPPolicy) -> None:
        """Change the load-time SP policy (e.g. `strip`, or `meta=strip`, for a cooldown at the end of training)."""
        self.policy = SPPolicy.parse(policy)
        if self.policy.misplaced and self._sp_map is None:
            self._sp_map = misplaced_sp_map(self.info, self.seed)

    def _prepare(self, samples: list[dict]):
        """Apply the SP policy and stack: (ids B x L, lengths, per-sample dicts, keys)."""
        arrays = [as_arrays(raw) for raw in samples]
        L = max(len(a["input_ids"]) for a in arrays)
        keys = np.array([sample_key(a["input_ids"], a["source_id"], self.seed) for a in arrays], np.uint64)
        rows = arrays
        if not self.policy.is_keep:
            m = max(len(a["sp_positions"]) for a in arrays)
            ui = draws(keys, m, SLOT_INSERT) if self.policy.insert is not None else [None] * len(arrays)
            um = draws(keys, m, SLOT_MSP) if self.policy.msp is not None else [None] * len(arrays)
            if self.policy.insert is None:   # no SP moves: metadata edits over the whole batch at once
                rows = apply_meta_policy(arrays, self.policy, self.info, keys, um, self._sp_map,
                                         with_origin=getattr(self, "eval_targets", False))
            else:
                pool = meta_pool(arrays) if self.policy.meta == "misplaced" else None
                rows = [apply_policy(a, self.policy, self.info, k, len(a["input_ids"]), ui[b], um[b], pool,
                                     self._sp_map) for b, (a, k) in enumerate(zip(arrays, keys))]
        for a in rows:
            a.setdefault("length", len(a["input_ids"]))
        pad = self.info.pad_id if self.info.pad_id is not None else self.info.eos_id
        ids = np.full((len(rows), L), pad, np.int64)
        for b, s in enumerate(rows):
            ids[b, : s["length"]] = s["input_ids"][: s["length"]]
        lengths = np.array([s["length"] for s in rows])
        return ids, lengths, rows, keys

    @staticmethod
    def _segments(rows: list[dict], lengths: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
        """(segment starts, segment id of every token), B x L; padding is a segment of its own."""
        seg_start = np.zeros((len(rows), L), bool)
        for b, s in enumerate(rows):
            seg_start[b, s["doc_offsets"]] = True
            if lengths[b] < L:
                seg_start[b, lengths[b]] = True
        return seg_start, np.cumsum(seg_start, axis=1) - 1

    @staticmethod
    def _doc_ids(seg_id: np.ndarray, real: np.ndarray) -> np.ndarray:
        """Each token's document within its sample (int32), -1 on padding: what attention is confined by."""
        return np.where(real, seg_id, -1).astype(np.int32)

    @staticmethod
    def _real(lengths: np.ndarray, L: int) -> np.ndarray:
        return np.arange(L)[None, :] < lengths[:, None]

    @staticmethod
    def _sources(rows: list[dict], real: np.ndarray) -> np.ndarray:
        src = np.array([s["source_id"] for s in rows], np.int64)[:, None]
        return np.where(real, src, -1)

    def _sp_grid(self, rows: list[dict], shape, masked_only: bool) -> np.ndarray:
        grid = np.zeros(shape, bool)
        for b, s in enumerate(rows):
            p = s["sp_positions"][s["msp_mask"]] if masked_only else s["sp_positions"]
            grid[b, p] = True
        return grid

    @staticmethod
    def _meta_grid(rows: list[dict], shape) -> np.ndarray | None:
        """B x L bool: the metadata tokens (never targets); None when the batch has none."""
        spans = [s["meta_spans"] for s in rows]
        k = np.array([len(x) for x in spans])
        if not k.any():
            return None
        spans = np.concatenate(spans)
        row = np.repeat(np.arange(len(rows)), k)
        edge = np.zeros((shape[0], shape[1] + 1), np.int32)
        edge[row, spans[:, 0]] = 1   # spans do not overlap: no two start (or end) at one place
        edge[row, spans[:, 1]] -= 1
        return np.cumsum(edge[:, :-1], axis=1) > 0

    @staticmethod
    def _torch(batch: dict) -> dict:
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class MLMCollator(_Base):
    """Masked language modelling with masked source prediction (encoders).

    Ordinary tokens are MLM targets with probability ``mlm_prob`` (80% [MASK], 10% a random ordinary token — never
    an SP or special —, 10% unchanged); a metadata token never is one, nor replaced. SPs are never MLM targets; an
    SP flagged in ``msp_mask`` becomes [MASK] with the SP as its label. ``msp_target`` marks those positions, so MSP
    loss and accuracy can be reported apart from MLM.

    ``doc_attention`` (default on): the batch carries ``doc_ids`` instead of ``attention_mask``, and each token
    attends only to its own document (``LossModel``, or ``apply_document_attention(model)`` for a Hugging Face
    model). Without it, a masked SP could be copied from another document's visible SP in the same
    (source-pure) sample, and MSP would not learn to name the source from the text.
    """

    def __init__(self, info: BuildInfo, mlm_prob: float = 0.15, doc_attention: bool = True, **kw):
        super().__init__(info, **kw)
        self.doc_attention = doc_attention
        if info.mask_id is None:
            raise SptokError(f"{info.path}: the build's tokenizer has no mask token ([MASK]); MLM needs one")
        if not (is_finite_number(mlm_prob) and 0.0 < mlm_prob < 1.0):
            raise SptokError(f"mlm_prob must be in (0, 1), got {mlm_prob!r}")
        self.mlm_prob = mlm_prob

    def __call__(self, samples: list[dict]) -> dict:
        ids, lengths, rows, keys = self._prepare(samples)
        B, L = ids.shape
        real = self._real(lengths, L)
        ordinary = real & ~self.info.is_special[ids]
        meta = self._meta_grid(rows, (B, L))
        if meta is not None:
            ordinary &= ~meta
        u = draws(keys, L, SLOT_MLM)                 # one uniform per token decides everything
        target = ordinary & (u < self.mlm_prob)
        r = u / self.mlm_prob                                 # uniform in [0, 1) again among targets
        to_mask = target & (r < 0.8)
        to_random = target & (r >= 0.8) & (r < 0.9)
        labels = np.where(target, ids, IGNORE)
        inputs = ids.copy()
        inputs[to_mask] = self.info.mask_id
        if to_random.any():
            pick = ((r[to_random] - 0.8) / 0.1 * len(self.info.ordinary_ids)).astype(np.int64)
            inputs[to_random] = self.info.ordinary_ids[np.minimum(pick, len(self.info.ordinary_ids) - 1)]
        msp = self._sp_grid(rows, (B, L), masked_only=True)
        labels[msp] = ids[msp]
        inputs[msp] = self.info.mask_id
        batch = {"input_ids": inputs, "labels": labels}
        if self.doc_attention:
            batch["doc_ids"] = self._doc_ids(self._segments(rows, lengths, L)[1], real)
        else:
            batch["attention_mask"] = real.astype(np.int64)
        if self.extras:
            batch["msp_target"] = msp
            batch["token_source"] = self._sources(rows, real)
        return self._torch(batch)


class CausalLMCollator(_Base):
    """Next-token prediction (decoders) with attention confined to each document of a packed sample.

    ``position_ids`` restart at every document (padding is a document of its own), and there is no
    ``attention_mask``: from restarting position ids transformers masks each document itself (sdpa, eager,
    flex_attention), and a 2-D padding mask would turn that off. ``cu_seqlens`` / ``max_seqlen`` describe the
    documents for varlen kernels (flash-attention). Labels are the input ids (models shift them) with padding,
    metadata and each document's first token ignored: nothing in the document predicts it. A post SP is an
    ordinary target; ``sp_target`` marks it.

    ``eval_targets`` (evaluation): only text and EOS tokens are labels, and ``eval_origin`` says where each
    came from in the sample as built, so that losses under different policies can be held to the same tokens.
    """

    def __init__(self, info: BuildInfo, eval_targets: bool = False, **kw):
        super().__init__(info, **kw)
        self.eval_targets = eval_targets

    def __call__(self, samples: list[dict]) -> dict:
        ids, lengths, rows, _ = self._prepare(samples)
        B, L = ids.shape
        real = self._real(lengths, L)
        seg_start, seg_id = self._segments(rows, lengths, L)
        first = np.maximum.accumulate(np.where(seg_start, np.arange(L)[None, :], 0), axis=1)
        position_ids = np.arange(L)[None, :] - first
        target = real & ~seg_start
        meta = self._meta_grid(rows, (B, L))
        if meta is not None:
            target &= ~meta                                  # metadata is read, never predicted
        labels = np.where(target, ids, IGNORE)
        batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids}
        if self.eval_targets:
            batch["eval_origin"] = self._eval_origin(samples, rows, labels)
        if self.extras:
            # varlen view: the documents of all samples, one after another
            flat_starts = (np.flatnonzero(seg_start.ravel())).astype(np.int32)
            batch["cu_seqlens"] = np.concatenate([flat_starts, [B * L]]).astype(np.int32)
            batch["max_seqlen"] = np.array(int(np.diff(batch["cu_seqlens"]).max()), np.int32)
            batch["sp_target"] = self._sp_grid(rows, (B, L), masked_only=False) & (labels != IGNORE)
            batch["token_source"] = self._sources(rows, real)
            batch["doc_ids"] = self._doc_ids(seg_id, real)
        return self._torch(batch)

    def _eval_origin(self, samples: list[dict], rows: list[dict], labels: np.ndarray) -> np.ndarray:
        """B x L: for each label that is a text or EOS token, its position in the sample as built; -1 elsewhere,
        and the label of an SP, a delimiter or metadata is set to IGNORE. Every eval condition scores the labels
        whose positions are in all conditions (``sptok.train.evaluate``), so the numbers compare."""
        origin = np.full(labels.shape, -1, np.int64)
        lay = self.info.layout
        for b, (raw, r) in enumerate(zip(samples, rows)):
            a = as_arrays(raw)
            text = np.ones(len(a["input_ids"]), bool)
            text[a["sp_positions"]] = False
            text[lay.delimiter_positions(a["input_ids"], a["sp_positions"], lay.is_post(a))] = False
            text &= ~lay.stray_delimiters(a["input_ids"])
            for start, end in a["meta_spans"].tolist():
                text[start:end] = False
            o = r.get("origin", np.arange(r["length"]))[: r["length"]]
            origin[b, : len(o)] = np.where((o >= 0) & text[np.maximum(o, 0)], o, -1)
        labels[origin < 0] = IGNORE
        return np.where(labels != IGNORE, origin, -1)


class SpanCorruptionCollator(_Base):
    """T5 span corruption: noise spans over ordinary tokens only (never metadata), each replaced by one sentinel in
    the input; the target lists each sentinel followed by its span, then EOS. An SP flagged in ``msp_mask`` is a
    span of its own (MSP as in MLM + MSP); other SPs stay visible in the input. Sentinels are the tokenizer's
    ``<extra_id_N>`` when it has them, else ids from ``vocab_size`` upward (size the model's embeddings with
    ``vocab_size + max_sentinels``). No span crosses a document.

    ``doc_attention`` (default on): the batch carries ``doc_ids`` (the document of each input token: a
    sentinel belongs to its span's document) and ``decoder_doc_ids`` (of each target token) instead of
    ``attention_mask``. With them the encoder, the decoder and the cross-attention
    stay inside each document (``LossModel``, or ``apply_document_attention(model)``), so a masked SP cannot
    be read off another document's visible SP, neither in the encoder nor through the decoder.
    """

    def __init__(self, info: BuildInfo, noise_density: float = 0.15, mean_span: float = 3.0,
                 max_sentinels: int = 256, doc_attention: bool = True, **kw):
        super().__init__(info, **kw)
        for name, value, ok, want in (("noise_density", noise_density, lambda x: 0 < x < 1, "in (0, 1)"),
                                      ("mean_span", mean_span, lambda x: x >= 1, ">= 1"),
                                      ("max_sentinels", max_sentinels,
                                       lambda x: isinstance(x, numbers.Integral) and x >= 1, "(an integer) >= 1")):
            if not (is_finite_number(value) and ok(value)):
                raise SptokError(f"{name} must be a number {want}, got {value!r}")
        self.noise_density, self.mean_span = noise_density, mean_span
        self.doc_attention = doc_attention
        self.sentinels = np.arange(info.vocab_size, info.vocab_size + max_sentinels, dtype=np.int64)

    def _noise(self, ordinary: np.ndarray, u: np.ndarray) -> np.ndarray:
        """T5's random_spans_noise_mask over each row's ordinary tokens (B x L bool), from the rows' uniforms.

        Per row: ``n`` ordinary tokens hold ``num_noise`` noise tokens in ``num_spans`` runs, alternating with
        as many keep runs (keep first). Each kind is cut into runs where its ``num_spans - 1`` smallest
        uniforms fall (noise: ``u[:num_noise - 1]``, keep: the uniforms after those). Vectorized over the
        batch: a per-sample loop was 4x slower than reading (issue 24)."""
        B, L = ordinary.shape
        n = ordinary.sum(axis=1)
        num_noise = np.rint(n * self.noise_density).astype(np.int64)
        num_noise = np.where(n > 1, np.clip(num_noise, 1, np.maximum(n - 1, 1)), 0)
        num_spans = np.where(num_noise > 0, np.maximum(1, np.rint(num_noise / self.mean_span)), 0).astype(np.int64)
        num_keep = n - num_noise
        col = np.arange(L)[None, :]

        def cuts(v: np.ndarray, total: np.ndarray) -> np.ndarray:
            """Where runs start (B x L, column j = a run starts at item j + 1): the num_spans - 1 smallest of
            the first total - 1 uniforms of each row."""
            v = np.where(col < (total - 1)[:, None], v, np.inf)
            k = np.maximum(num_spans - 2, 0)
            kth = np.take_along_axis(np.sort(v, axis=1), k[:, None], axis=1)
            return (v <= kth) & (num_spans > 1)[:, None]

        noise_cut = cuts(u, num_noise)
        keep_cut = cuts(np.take_along_axis(u, np.minimum(col + num_noise[:, None], L - 1), axis=1), num_keep)
        has = num_spans > 0
        # the runs' ends in their own coordinates, one per span in (row, span) order: the cuts, then the total
        ends_at = np.zeros((B, L + 1), bool)

        def run_ends(cut: np.ndarray, total: np.ndarray) -> np.ndarray:
            ends_at[:] = False
            ends_at[:, 1:] = cut
            ends_at[np.flatnonzero(has), total[has]] = True
            return np.nonzero(ends_at)[1]

        keep_end = run_ends(keep_cut, num_keep)            # keep run r ends where noise run r starts
        noise_end = run_ends(noise_cut, num_noise)
        noise_start = np.concatenate([[0], noise_end[:-1]])
        first = np.concatenate([[0], np.cumsum(num_spans)[:-1]])[has]
        noise_start[first] = 0                              # a row's first noise run starts at 0
        rows = np.repeat(np.arange(B), num_spans)
        edge = np.zeros((B, L + 1), np.int64)               # +1 where a noise run starts, -1 where it ends
        np.add.at(edge, (rows, keep_end + noise_start), 1)
        np.add.at(edge, (rows, keep_end + noise_end), -1)
        noise_ord = np.cumsum(edge, axis=1)[:, :L] > 0       # noise, by rank among the row's ordinary tokens
        rank = np.maximum(np.cumsum(ordinary, axis=1) - 1, 0)
        return ordinary & np.take_along_axis(noise_ord, rank, axis=1)

    def __call__(self, samples: list[dict]) -> dict:
        ids, lengths, rows, keys = self._prepare(samples)
        B, L = ids.shape
        u = draws(keys, L, SLOT_T5)                  # all the batch's random numbers at once
        real = self._real(lengths, L)
        ordinary = real & ~self.info.is_special[ids]
        meta = self._meta_grid(rows, (B, L))
        if meta is not None:
            ordinary &= ~meta                               # no span over metadata: never a target
        noise = self._noise(ordinary, u)
        doc_start, doc = self._segments(rows, lengths, L)   # each token's document (padding: one more)
        msp = self._sp_grid(rows, (B, L), masked_only=True)
        prev = np.zeros_like(noise)
        prev[:, 1:] = noise[:, :-1]
        span_start = (noise & (~prev | doc_start)) | msp    # no span crosses documents; a masked SP is its own
        noise |= msp
        n_spans = span_start.sum(axis=1)
        if n_spans.max(initial=0) > len(self.sentinels):
            raise SptokError(f"{n_spans.max()} noise spans in one sample exceed max_sentinels="
                             f"{len(self.sentinels)}; raise it")
        span_id = np.cumsum(span_start, axis=1) - 1
        last_doc = doc[np.arange(B), np.maximum(lengths - 1, 0)]
        pad = self.info.pad_id if self.info.pad_id is not None else self.info.eos_id
        rows_ = np.arange(B)
        # the input: kept tokens, each span's first token replaced by its sentinel, then EOS
        kept = real & (~noise | span_start)
        n_in = kept.sum(axis=1)
        src, dst = _flat_moves(np.cumsum(kept, axis=1) - 1, kept, n_in.max() + 1)
        inp = np.full((B, n_in.max() + 1), pad, np.int64)
        inp_doc = np.full(inp.shape, -1, np.int32)
        inp.ravel()[dst] = np.where(span_start, self.sentinels[np.maximum(span_id, 0)], ids).ravel()[src]
        inp_doc.ravel()[dst] = doc.ravel()[src]
        inp[rows_, n_in], inp_doc[rows_, n_in] = self.info.eos_id, last_doc
        # the target: each span's sentinel, then its tokens; EOS at the end
        n_noise = noise.sum(axis=1)
        W = (n_noise + n_spans).max() + 1
        lab = np.full((B, W), IGNORE, np.int64)
        msp_t = np.zeros(lab.shape, bool)
        tgt_doc = np.full(lab.shape, -1, np.int32)
        at = np.cumsum(noise, axis=1) - 1 + span_id          # where each span's sentinel goes; its tokens follow
        src, dst = _flat_moves(at + 1, noise, W)
        lab.ravel()[dst] = ids.ravel()[src]
        msp_t.ravel()[dst] = self.info.is_sp[ids.ravel()[src]]
        tgt_doc.ravel()[dst] = doc.ravel()[src]
        src, dst = _flat_moves(at, span_start, W)
        lab.ravel()[dst] = self.sentinels[span_id.ravel()[src]]
        tgt_doc.ravel()[dst] = doc.ravel()[src]
        end = n_noise + n_spans
        lab[rows_, end], tgt_doc[rows_, end] = self.info.eos_id, last_doc
        batch = {"input_ids": inp, "labels": lab}
        if self.doc_attention:
            batch["doc_ids"], batch["decoder_doc_ids"] = inp_doc, tgt_doc
        else:
            batch["attention_mask"] = (inp_doc >= 0).astype(np.int64)
        if self.extras:
            src = np.array([s["source_id"] for s in rows])[:, None]
            batch["msp_target"] = msp_t
            batch["token_source"] = np.where(lab != IGNORE, src, -1)
            batch["input_source"] = np.where(inp_doc >= 0, src, -1)
        return self._torch(batch)


def is_finite_number(x) -> bool:
    """A real number, finite, and not a bool: what a rate, share or length given through the API must be."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _flat_moves(at: np.ndarray, where: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat (source, destination) indices that move each entry of a B x L array in ``where`` to column ``at``
    of the same row in a B x ``width`` array."""
    src = np.flatnonzero(where)
    return src, src // at.shape[1] * width + at.ravel()[src]

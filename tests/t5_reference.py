"""The per-sample T5 span corruption that ``SpanCorruptionCollator`` replaced with batch-wide numpy (issue 24),
kept as the reference the new one must equal on every output (tests/test_data.py)."""

from __future__ import annotations

import numpy as np

from sptok.data import IGNORE, SpanCorruptionCollator
from sptok.data.policy import SLOT_MLM, draws
from sptok.errors import SptokError


class ReferenceSpanCorruption(SpanCorruptionCollator):
    """The collator as it was at b9a7c32: one sample at a time."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._alternate = np.tile([False, True], len(self.sentinels))

    def _noise(self, n: int, u: np.ndarray) -> np.ndarray:
        """T5's random_spans_noise_mask over n ordinary tokens, from the sample's uniforms ``u``."""
        num_noise = int(round(n * self.noise_density))
        num_noise = min(max(num_noise, 1), n - 1) if n > 1 else 0
        num_spans = max(1, int(round(num_noise / self.mean_span))) if num_noise else 0
        if not num_spans:
            return np.zeros(n, bool)

        def segment(total, parts, v):
            """``total`` items in ``parts`` non-empty runs, cut at random points."""
            cuts = np.sort(np.argpartition(v[: total - 1], parts - 2)[: parts - 1] + 1) if parts > 1 else \
                np.empty(0, np.int64)
            return np.diff(np.concatenate([[0], cuts, [total]]).astype(np.int64))

        noise_len = segment(num_noise, num_spans, u[:num_noise])
        keep_len = segment(n - num_noise, num_spans, u[num_noise: n])
        lens = np.stack([keep_len, noise_len], axis=1).ravel()
        return np.repeat(self._alternate[: 2 * num_spans], lens)

    def _corrupt(self, x: np.ndarray, s: dict, u: np.ndarray):
        """One sample -> (input, target, target is an SP, document of each input token, of each target token)."""
        eos = self.info.eos_id
        noise = np.zeros(len(x), bool)
        ordinary_pos = np.flatnonzero(~self.info.is_special[x])
        noise[ordinary_pos] = self._noise(len(ordinary_pos), u)
        msp_pos = s["sp_positions"][s["msp_mask"]]
        doc_start = np.zeros(len(x), bool)
        doc_start[s["doc_offsets"]] = True
        span_start = noise & (~np.concatenate([[False], noise[:-1]]) | doc_start)   # no span crosses documents
        span_start[msp_pos] = True          # a masked SP starts a span of its own
        noise[msp_pos] = True
        n_spans = int(span_start.sum())
        if n_spans > len(self.sentinels):
            raise SptokError(f"{n_spans} noise spans in one sample exceed max_sentinels={len(self.sentinels)}; "
                             f"raise it")
        span_id = np.cumsum(span_start) - 1
        kept = ~noise | span_start
        inp = np.where(span_start, self.sentinels[np.maximum(span_id, 0)], x)[kept]
        # the target: each span's tokens, its sentinel first
        at = np.flatnonzero(span_start[noise])           # where each span begins among the noise tokens
        at += np.arange(n_spans)                          # ... and where its sentinel goes in the target
        tgt = np.empty(int(noise.sum()) + n_spans + 1, np.int64)
        body = np.ones(len(tgt), bool)
        body[at] = False
        body[-1] = False
        tgt[body], tgt[at], tgt[-1] = x[noise], self.sentinels[:n_spans], eos
        sp_t = np.zeros(len(tgt), bool)
        sp_t[body] = self.info.is_sp[x[noise]]
        doc = np.cumsum(doc_start) - 1                    # each token's document; the final EOS: the last one
        tgt_doc = np.empty(len(tgt), np.int32)
        tgt_doc[body], tgt_doc[at], tgt_doc[-1] = doc[noise], doc[span_start], doc[-1]
        return np.append(inp, eos), tgt, sp_t, np.append(doc[kept], doc[-1]), tgt_doc

    def __call__(self, samples: list[dict]) -> dict:
        ids, lengths, rows, keys = self._prepare(samples)
        u = draws(keys, ids.shape[1], SLOT_MLM + 1)     # all the batch's random numbers at once
        parts = [self._corrupt(ids[b, : lengths[b]], s, u[b]) for b, s in enumerate(rows)]
        Li, Lo = max(len(p[0]) for p in parts), max(len(p[1]) for p in parts)
        pad = self.info.pad_id if self.info.pad_id is not None else self.info.eos_id
        B = len(rows)
        inp = np.full((B, Li), pad, np.int64)
        lab = np.full((B, Lo), IGNORE, np.int64)
        msp = np.zeros((B, Lo), bool)
        inp_doc = np.full((B, Li), -1, np.int32)
        tgt_doc = np.full((B, Lo), -1, np.int32)
        for b, (i, t, m, di, dt) in enumerate(parts):
            inp[b, : len(i)], inp_doc[b, : len(i)] = i, di
            lab[b, : len(t)], msp[b, : len(t)], tgt_doc[b, : len(t)] = t, m, dt
        batch = {"input_ids": inp, "labels": lab}
        if self.doc_attention:
            batch["doc_ids"], batch["decoder_doc_ids"] = inp_doc, tgt_doc
        else:
            batch["attention_mask"] = (inp_doc >= 0).astype(np.int64)
        if self.extras:
            src = np.array([s["source_id"] for s in rows])[:, None]
            batch["msp_target"] = msp
            batch["token_source"] = np.where(lab != IGNORE, src, -1)
            batch["input_source"] = np.where(inp_doc >= 0, src, -1)
        return self._torch(batch)

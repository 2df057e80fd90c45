"""Open a build for training: MDS through mosaicml-streaming (one Stream per source), Arrow/Parquet
through `datasets`. Source proportions come from the manifest weights unless overridden."""

from __future__ import annotations

import glob
import os

from ..build_info import BuildInfo
from ..errors import SptokError


def _streaming_dataset_class():
    from streaming import StreamingDataset

    class SptokStreamingDataset(StreamingDataset):
        """A StreamingDataset that knows its build (``.build``: SP table, special ids, fingerprint)."""

        build: BuildInfo

    return SptokStreamingDataset


def source_weights(info: BuildInfo, proportion: dict | None, repeat: dict | None, weights: bool) -> dict:
    """Per-source Stream keyword arguments (proportion=... or repeat=...) from the manifest and overrides."""
    names = set(info.sources)
    for what, given in (("proportion", proportion), ("repeat", repeat)):
        unknown = sorted(set(given or {}) - names)
        if unknown:
            raise SptokError(f"{what}: no source {unknown[0]!r} in {info.path} (sources: {', '.join(info.sources)})")
    if proportion and repeat:
        raise SptokError("give proportion or repeat, not both: streaming weighs all sources one way")
    if repeat:
        return {n: {"repeat": float(repeat.get(n, 1.0))} for n in info.sources}
    if not weights and not proportion:
        return {n: {} for n in info.sources}   # natural sizes
    base = dict(zip(info.sources, info.weights)) if weights else {n: 1.0 for n in info.sources}
    base.update(proportion or {})
    total = sum(base.values())
    if total <= 0:
        raise SptokError("proportions must not all be zero")
    return {n: {"proportion": base[n] / total} for n in info.sources}


def open_dataset(out: str, *, proportion: dict | None = None, repeat: dict | None = None, weights: bool = True,
                 expected_fingerprint: str | None = None, **kwargs):
    """The build in ``out`` as a dataset with one stream per source.

    MDS: a ``streaming.StreamingDataset`` (``kwargs`` go to it: ``batch_size``, ``shuffle``, ``shuffle_seed``,
    ``epoch_size``, ...), with shuffling and sharding across ranks and workers as streaming does it and
    mid-epoch resumption through ``streaming.StreamingDataLoader.state_dict()``.
    Arrow/Parquet: a ``datasets.Dataset`` of the same samples (sources interleaved by their proportions
    when weights differ). Either way ``.build`` holds the BuildInfo (SP table, special ids).
    ``expected_fingerprint`` refuses any other build.
    """
    info = BuildInfo.load(out)
    if expected_fingerprint and expected_fingerprint != info.fingerprint:
        raise SptokError(f"{out}: build fingerprint {info.fingerprint[:12]} is not the expected "
                         f"{expected_fingerprint[:12]}: this is another build than the one pinned")
    per_source = source_weights(info, proportion, repeat, weights)
    if info.format == "mds":
        from streaming import Stream

        streams = [Stream(local=os.path.join(out, name), **per_source[name]) for name in info.sources]
        kwargs.setdefault("batch_size", 1)
        kwargs.setdefault("shuffle", False)
        ds = _streaming_dataset_class()(streams=streams, **kwargs)
        ds.build = info
        return ds
    return _table_dataset(info, per_source, **kwargs)


def _table_dataset(info: BuildInfo, per_source: dict, seed: int = 0, **kwargs):
    import datasets

    parts = []
    for name in info.sources:
        files = sorted(glob.glob(os.path.join(info.path, name, f"data-*.{info.format}")))
        parts.append(datasets.load_dataset(info.format, data_files=files, split="train", **kwargs))
    probs = [per_source[n].get("proportion") for n in info.sources]
    if len(parts) == 1:
        ds = parts[0]
    elif all(p is None for p in probs):
        ds = datasets.concatenate_datasets(parts)
    else:
        ds = datasets.interleave_datasets(parts, probabilities=probs, seed=seed, stopping_strategy="all_exhausted")
    ds.build = info
    return ds

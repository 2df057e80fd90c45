"""Open a build for training: MDS through mosaicml-streaming (one Stream per source), Arrow/Parquet
through `datasets`. Source proportions come from the manifest weights unless overridden."""

from __future__ import annotations

import atexit
import os
import sys

import numpy as np

from .. import layout
from ..build_info import BuildInfo
from ..errors import SptokError
from ..spec import SHORT_FINGERPRINT
from .collate import is_finite_number


def _streaming_dataset_class():
    from streaming import StreamingDataset

    class SptokStreamingDataset(StreamingDataset):
        """A StreamingDataset that knows its build (``.build``: SP table, special ids, fingerprint) and gives
        its shared memory back when it goes (``close()``, or when it is collected)."""

        build: BuildInfo

        def __init__(self, *args, **kwargs):
            self._owner_pid = os.getpid()
            super().__init__(*args, **kwargs)

        def __iter__(self):
            """streaming's epoch, which fails loudly: where streaming's prefetch thread cannot read a shard
            (a corrupt one of the right size) it only ends the epoch early, and training would go on without
            the rest of it."""
            try:
                yield from super().__iter__()
            except SptokError:
                raise
            except Exception as e:
                raise self._damaged(f"{type(e).__name__}: {e}") from e
            if self._event.is_set():
                raise self._damaged("streaming's reader thread failed, see the message above")

        def get_item(self, sample_id: int, retry: int = 7):
            """streaming's, with a shard that cannot be read (a zstd or decoding error deep in streaming) named
            as damage to the build: ``ds[i]`` reads this way, as in-loop evaluation does."""
            if not 0 <= sample_id < self.num_samples:
                raise IndexError(f"sample {sample_id} of a build of {self.num_samples}")
            try:
                return super().get_item(sample_id, retry)
            except Exception as e:
                raise self._damaged(f"{type(e).__name__}: {e}") from e

        def _damaged(self, why: str) -> SptokError:
            path = self.build.path
            return SptokError(f"{path}: cannot read a shard ({' '.join(why.split())}); the build is damaged: "
                              f"`sptok verify {path}` says what is wrong")

        def close(self) -> None:
            """Stop the threads of an epoch iterated in this process and give back the shared memory (see
            ``release_shared_memory``)."""
            self._release(wait=True)

        def __del__(self) -> None:
            super().__del__()
            # at exit streaming's own hooks release everything; before, no thread refers to the dataset any
            # more (the last one may be ending here: it must not wait for itself)
            if not sys.is_finalizing():
                self._release(wait=False)

        def _release(self, wait: bool) -> None:
            """Once, and only in the process that made the dataset: a worker's copy must not unlink what its
            parent still uses."""
            if getattr(self, "_owner_pid", None) == os.getpid():
                self._owner_pid = None
                release_shared_memory(self, wait=wait)

    return SptokStreamingDataset


def release_shared_memory(ds, wait: bool = True) -> None:
    """Stop the threads of an epoch a ``streaming.StreamingDataset`` is iterating in this process, then close
    (and, where this process made them, unlink) its shared-memory segments. streaming keeps each segment open
    until the process exits (an ``atexit`` hook per segment), and an epoch left half-read keeps its two threads
    polling, which keep the dataset alive: a process that opens many datasets (in-loop evaluation, tests) runs
    out of file descriptors. The dataset must not be used afterwards."""
    from streaming.base.shared import SharedMemory

    if hasattr(ds, "_iterator"):
        ds._iterator.exit()
    if wait and hasattr(ds, "_executor"):
        ds._executor.shutdown(wait=True)   # the threads read the shared memory: they end first

    found = []   # directly, or inside its shared arrays, scalars and barrier (streaming/base/shared)
    for value in vars(ds).values():
        for inner in (value, getattr(value, "shm", None), getattr(getattr(value, "arr", None), "shm", None),
                      getattr(getattr(value, "_arr", None), "shm", None)):
            if isinstance(inner, SharedMemory) and inner not in found:
                found.append(inner)
    for shm in found:
        atexit.unregister(shm.cleanup)
        try:
            shm.cleanup()
        except BufferError:   # a numpy view still points into it: streaming's exit hook will do it
            atexit.register(shm.cleanup)


def source_weights(info: BuildInfo, proportion: dict | None, repeat: dict | None, weights: bool) -> dict:
    """Per-source Stream keyword arguments (proportion=... or repeat=...) from the manifest and overrides."""
    names = set(info.sources)
    for what, given in (("proportion", proportion), ("repeat", repeat)):
        unknown = sorted(set(given or {}) - names)
        if unknown:
            raise SptokError(f"{what}: no source {unknown[0]!r} in {info.path} (sources: {', '.join(info.sources)})")
    for what, given in (("proportion", proportion), ("repeat", repeat)):
        for name, v in (given or {}).items():   # streaming's own checks end in a ValueError or a TypeError
            if not (is_finite_number(v) and v >= 0):
                raise SptokError(f"{what}: {name}: must be a finite number >= 0, got {v!r}")
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


def check_fingerprint(info: BuildInfo, expected: str) -> None:
    """Refuse any build but the pinned one: ``expected`` is its fingerprint or a prefix of at least
    ``SHORT_FINGERPRINT`` characters (the form every command prints)."""
    expected = expected.lower()
    if len(expected) < SHORT_FINGERPRINT:
        raise SptokError(f"expected_fingerprint: {expected!r} is too short to pin a build; give at least its first "
                         f"{SHORT_FINGERPRINT} characters")
    if not info.fingerprint.startswith(expected):
        raise SptokError(f"{info.path}: build fingerprint {info.fingerprint[:len(expected)]} is not the expected "
                         f"{expected}: this is another build than the one pinned")


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
    if expected_fingerprint:
        check_fingerprint(info, expected_fingerprint)
    per_source = source_weights(info, proportion, repeat, weights)
    if info.format == "mds":
        from streaming import Stream

        _clean_shared_memory()

        # a source at proportion 0 is not read: as a stream, streaming's rounding could still give it a sample
        names = [name for name in info.sources if per_source[name].get("proportion") != 0]
        for name in names:
            layout.listed_files(out, name, info.format)
        streams = [Stream(local=os.path.join(out, name), **per_source[name]) for name in names]
        kwargs.setdefault("batch_size", 1)
        kwargs.setdefault("shuffle", False)
        ds = _streaming_dataset_class()(streams=streams, **kwargs)
        ds.build = info
        return ds
    return _table_dataset(info, per_source, **kwargs)


def _clean_shared_memory() -> None:
    """Remove what readers killed with kill -9 left in /dev/shm: once per machine (the local leader), and
    before any rank looks for a free shared-memory prefix (they must all find the same one)."""
    from .shm import clean_stale_shm

    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        clean_stale_shm()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# keyword arguments of StreamingDataset that mean the same for a table build; the rest are about
# streaming's own download, cache and partitioning machinery
TABLE_KWARGS = ("batch_size", "shuffle", "shuffle_seed", "epoch_size")
SHUFFLE_SEED = 9176   # streaming's default, so both formats draw with the same seed by default


def samples_per_source(sizes: list[int], per_source: list[dict], epoch_size: int | None, seed: int) -> list[int]:
    """How many samples of each source one epoch holds: streaming's rule (``Stream.apply_weights``), so an
    MDS and a table build of the same inputs and weights give the same counts per source."""
    sizes = np.array(sizes, np.int64)
    read = [i for i, w in enumerate(per_source) if w.get("proportion") != 0]   # as open_dataset's streams
    if len(read) < len(sizes):
        counts = [0] * len(sizes)
        for i, k in zip(read, samples_per_source(sizes[read].tolist(), [per_source[i] for i in read], epoch_size,
                                                 seed)):
            counts[i] = k
        return counts
    if all("proportion" in w for w in per_source) or (epoch_size and not any(per_source)):
        want = np.array([w.get("proportion", n) for w, n in zip(per_source, sizes)], np.float64)
        total = epoch_size or int(sizes.sum())
        choose = (total * want / want.sum()).astype(np.int64)
        short = total - int(choose.sum())
        choose[np.random.default_rng(seed).choice(len(sizes), short, False)] += 1
        return choose.tolist()
    if epoch_size:
        raise SptokError("epoch_size: give it with proportions (or natural sizes), not with repeat")
    return [int(w["repeat"] * n) if "repeat" in w else int(n) for w, n in zip(per_source, sizes)]


def _table_dataset(info: BuildInfo, per_source: dict, **kwargs):
    """A ``datasets.Dataset`` over the build's files, read in place (Arrow memory-mapped, Parquet decoded
    into memory; no cache is written), holding the epoch an MDS build of the same weights would."""
    unknown = sorted(set(kwargs) - set(TABLE_KWARGS))
    if unknown:
        raise SptokError(f"open_dataset: {unknown[0]!r} applies to MDS builds only; a {info.format} build takes "
                         f"{', '.join(TABLE_KWARGS)} (and proportion, repeat, weights)")
    import datasets
    import pyarrow as pa

    seed = int(kwargs.get("shuffle_seed", SHUFFLE_SEED))
    tables = [_read_table(info, name) for name in info.sources]
    sizes = [t.num_rows for t in tables]
    counts = samples_per_source(sizes, [per_source[n] for n in info.sources], kwargs.get("epoch_size"), seed)
    rng = np.random.default_rng(seed)
    picks, offset = [], 0
    for n, k in zip(sizes, counts):
        # whole repeats, then a seeded subset for the fraction (as streaming up- and down-samples)
        part = np.sort(rng.choice(n, k % n, replace=False)) if n else np.empty(0, np.int64)
        picks.append(offset + np.concatenate([np.tile(np.arange(n), k // n) if n else [], part]).astype(np.int64))
        offset += n
    order = np.concatenate(picks) if picks else np.empty(0, np.int64)
    if kwargs.get("shuffle"):
        order = rng.permutation(order)
    ds = datasets.Dataset(datasets.table.InMemoryTable(pa.concat_tables(tables))).select(order)
    ds.build = info
    return ds


def _read_table(info: BuildInfo, name: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = layout.listed_files(info.path, name, info.format)
    if not files:
        raise SptokError(f"{info.path}/{name}: no {info.format} data files; the build is damaged "
                         f"(`sptok verify {info.path}` says what is missing)")
    try:
        if info.format == "parquet":
            return pa.concat_tables([pq.read_table(f) for f in files])
        return pa.concat_tables([pa.ipc.open_file(pa.memory_map(f)).read_all() for f in files])
    except (OSError, pa.ArrowException) as e:
        raise SptokError(f"{info.path}/{name}: cannot read the build's files ({e})") from None

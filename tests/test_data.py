"""sptok.data on real builds: datasets, the three collators, load-time SP policies, resumption, proportions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TOKENIZER
from shards import documents

from sptok.build import run_build
from sptok.data import (IGNORE, BuildInfo, CausalLMCollator, Loader, MLMCollator, SpanCorruptionCollator,
                        SPPolicy, apply_policy, as_arrays, open_dataset)
from sptok.errors import SptokError

SEQ = 128


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import SOURCES, demo_records, write_jsonl

    d = tmp_path_factory.mktemp("data-corpus")
    for name, n in zip(SOURCES, (40, 12, 400, 40)):
        write_jsonl(d / f"{name}.jsonl", demo_records(name, n))
    m = d / "m.yaml"
    m.write_text("sources:\n" + "".join(
        f"  - {{name: {n}, paths: {n}.jsonl, id_field: id, weight: {w}}}\n"
        for n, w in zip(SOURCES, (1, 1, 0.5, 0.5))))
    return d


def _build(corpus, name, **flags):
    out = corpus / name
    if not (out / "sptok.json").exists():
        flags = dict(tokenizer=str(TOKENIZER), quiet=True, workers=1, seq_len=SEQ, **flags)
        run_build(str(corpus / "m.yaml"), str(out), flags, log=lambda m: None)
    return str(out)


@pytest.fixture(scope="module")
def prefix_build(corpus):
    return _build(corpus, "prefix", msp_prob=0.3, insert_prob=0.9)


def _all(ds):
    return [ds[i] for i in range(len(ds))]


def test_open_dataset_knows_the_build(prefix_build):
    ds = open_dataset(prefix_build, weights=False)
    assert isinstance(ds.build, BuildInfo) and ds.build.sources == ["pydocs", "code", "fortunes", "chinese"]
    assert len(ds) == sum(c["samples"] for c in ds.build.raw["counts"].values())
    assert {e for e in ds.build.sp_ids.tolist()} <= set(ds.build.special_ids.tolist())
    with pytest.raises(SptokError, match="not the expected"):
        open_dataset(prefix_build, expected_fingerprint="0" * 64)
    with pytest.raises(SptokError, match="no source 'web'"):
        open_dataset(prefix_build, proportion={"web": 1.0})


def test_mlm_rates_split_and_no_sp_in_mlm(prefix_build):
    ds = open_dataset(prefix_build, weights=False)
    info = ds.build
    samples = _all(ds)
    batch = MLMCollator(info, mlm_prob=0.15, seed=1)(samples)
    ids = np.stack([np.pad(as_arrays(s)["input_ids"], (0, SEQ - len(s["input_ids"])), constant_values=info.pad_id)
                    for s in samples])
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    msp = batch["msp_target"].numpy()
    real = batch["token_source"].numpy() >= 0
    special = np.isin(ids, info.special_ids)
    mlm = (labels != IGNORE) & ~msp
    n_ord = int((real & ~special).sum())
    n = int(mlm.sum())
    assert abs(n - 0.15 * n_ord) < 4 * np.sqrt(n_ord * 0.15 * 0.85)
    assert not (mlm & special).any()                            # no SP or special is an MLM target
    masked = (inputs == info.mask_id) & mlm
    kept = (inputs == ids) & mlm
    rand = mlm & ~masked & ~kept
    for part, p in ((masked, 0.8), (kept, 0.1 + 0.1 / len(info.ordinary_ids)), (rand, 0.1)):
        assert abs(part.sum() - p * n) < 4 * np.sqrt(n * p * (1 - p)) + 2
    assert not np.isin(inputs[rand], info.special_ids).any()    # random replacements are never SPs/specials
    assert np.isin(inputs[rand], info.ordinary_ids).all()
    # MSP labels sit exactly on the masked SPs, which become [MASK]
    want = np.zeros_like(msp)
    for b, s in enumerate(samples):
        a = as_arrays(s)
        want[b, a["sp_positions"][a["msp_mask"]]] = True
    assert (msp == want).all() and want.any()
    assert (labels[msp] == ids[msp]).all() and np.isin(labels[msp], info.sp_ids).all()
    assert (inputs[msp] == info.mask_id).all()
    # each token's document, which attention is confined to (a masked SP cannot be copied from a neighbour)
    doc_ids = batch["doc_ids"].numpy()
    assert "attention_mask" not in batch
    for b, s in enumerate(samples):
        a = as_arrays(s)
        n = len(a["input_ids"])
        assert (doc_ids[b, :n] == np.searchsorted(a["doc_offsets"], np.arange(n), side="right") - 1).all()
        assert (doc_ids[b, n:] == -1).all()
    # per-token source ids
    src = batch["token_source"].numpy()
    for b, s in enumerate(samples):
        assert (src[b][real[b]] == s["source_id"]).all() and (src[b][~real[b]] == -1).all()


def test_msp_and_insert_policies_redraw_at_the_requested_rates(prefix_build):
    ds = open_dataset(prefix_build, weights=False)
    samples = _all(ds)
    n_sp = sum(len(as_arrays(s)["sp_positions"]) for s in samples)
    for p in (0.0, 0.15, 0.5):
        b = MLMCollator(ds.build, sp_policy=f"msp={p}", seed=3)(samples)
        got = int(b["msp_target"].sum())
        assert abs(got - p * n_sp) <= 4 * np.sqrt(n_sp * p * (1 - p)) + 1e-9
    q = 0.5
    b = MLMCollator(ds.build, sp_policy=f"insert={q}", seed=3)(samples)
    kept = int(np.isin(b["input_ids"].numpy(), ds.build.sp_ids).sum() + b["msp_target"].sum())
    assert abs(kept - q * n_sp) < 4 * np.sqrt(n_sp * q * (1 - q))
    with pytest.raises(SptokError):
        SPPolicy.parse("msp=2")


def test_strip_gives_the_tokens_of_a_build_without_sps(corpus, prefix_build):
    """Document by document, stripped samples hold exactly the tokens of a build made without SPs."""
    plain = _build(corpus, "nosp", insert_prob=0.0)
    info = BuildInfo.load(prefix_build)
    stripped = []
    for s in _all(open_dataset(prefix_build, weights=False)):
        a = apply_policy(as_arrays(s), SPPolicy.parse("strip"), info, np.uint64(0))
        stripped.append(dict(a, input_ids=a["input_ids"][: a.get("length", len(a["input_ids"]))]))
    assert documents(stripped) == documents([as_arrays(s) for s in _all(open_dataset(plain, weights=False))])
    coll = CausalLMCollator(info, sp_policy="strip")
    b = coll(_all(open_dataset(prefix_build, weights=False))[:8])
    assert b["input_ids"].shape == (8, SEQ)                         # shapes stay fixed (padded)
    assert not np.isin(b["input_ids"].numpy(), np.concatenate([info.sp_ids, info.delimiter_ids])).any()


@pytest.mark.parametrize("position", ["prefix", "post", "both"])
def test_causal_batches_describe_each_document(corpus, position):
    """Position ids restart at each document (transformers confines attention from them), the varlen view
    and doc_ids agree, and no padding mask turns that off."""
    out = _build(corpus, f"causal-{position}", position=position, msp_prob=0.0)
    ds = open_dataset(out, weights=False)
    samples = _all(ds)[:16]
    b = CausalLMCollator(ds.build)(samples)
    assert "attention_mask" not in b
    pos, labels, doc_ids = b["position_ids"].numpy(), b["labels"].numpy(), b["doc_ids"].numpy()
    for i, s in enumerate(samples):
        a = as_arrays(s)
        doc = np.searchsorted(a["doc_offsets"], np.arange(len(a["input_ids"])), side="right") - 1
        n = len(doc)
        assert (doc_ids[i][:n] == doc).all() and (doc_ids[i][n:] == -1).all()
        assert (pos[i][:n] == np.arange(n) - a["doc_offsets"][doc]).all()   # positions restart per document
        assert (labels[i][a["doc_offsets"]] == IGNORE).all()
    cu = b["cu_seqlens"].numpy()
    assert cu[-1] == len(samples) * b["input_ids"].shape[1] and (np.diff(cu) > 0).all()
    assert len(cu) - 1 == sum(len(as_arrays(s)["doc_offsets"]) for s in samples) + int((doc_ids == -1).any(1).sum())
    if position in ("post", "both"):   # a post SP is a prediction target
        sp_t = b["sp_target"].numpy()
        assert sp_t.any() and np.isin(labels[sp_t], ds.build.sp_ids).all()


def test_no_batch_grows_with_the_square_of_the_sequence(prefix_build):
    """Every collator's batch costs the same bytes per token at seq 64 and 512: document structure travels as
    doc ids, position ids and offsets, never as an L x L mask."""
    info = BuildInfo.load(prefix_build)
    rng = np.random.default_rng(0)

    def batch_bytes_per_token(coll, L):
        offsets = np.arange(0, L, 16)
        ids = rng.choice(info.ordinary_ids, (8, L))
        ids[:, offsets] = info.sp_ids[0]
        samples = [{"input_ids": row, "source_id": 0, "doc_offsets": offsets, "msp_mask": np.ones(len(offsets),
                    np.uint8).tobytes(), "sp_positions": offsets.astype("<u4").tobytes()} for row in ids]
        return sum(v.numel() * v.element_size() for v in coll(samples).values()) / (8 * L)

    for coll in (MLMCollator(info), CausalLMCollator(info), SpanCorruptionCollator(info)):
        short, long = batch_bytes_per_token(coll, 64), batch_bytes_per_token(coll, 512)
        assert long < 64 and abs(long - short) < 2, (type(coll).__name__, short, long)


def test_span_corruption_reassembles_and_spares_sps(prefix_build):
    ds = open_dataset(prefix_build, weights=False)
    info = ds.build
    samples = _all(ds)[:24]
    coll = SpanCorruptionCollator(info, noise_density=0.15, mean_span=3.0, seed=5)
    b = coll(samples)
    sentinels = set(coll.sentinels.tolist())
    for i, s in enumerate(samples):
        a = as_arrays(s)
        rebuilt, spans = _reassemble(b, i, sentinels)
        assert rebuilt == a["input_ids"].tolist()                    # input + target = the original sample
        noise = [x for v in spans.values() for x in v]
        masked_sps = a["input_ids"][a["sp_positions"][a["msp_mask"]]].tolist()
        assert sorted(x for x in noise if x in set(info.special_ids.tolist())) == sorted(masked_sps)
        assert b["msp_target"][i].sum() == len(masked_sps)


def test_span_corruption_of_short_samples(prefix_build):
    """A sample with room for one noise span only (and one with none) still corrupts and reassembles."""
    info = BuildInfo.load(prefix_build)
    coll = SpanCorruptionCollator(info)
    sentinels = set(coll.sentinels.tolist())
    for n in (2, 5, 12):
        s = {"input_ids": np.arange(100, 100 + n), "source_id": 0, "doc_offsets": np.array([0]),
             "sp_positions": b"", "msp_mask": b""}
        b = coll([s])
        rebuilt, spans = _reassemble(b, 0, sentinels)
        assert rebuilt == list(range(100, 100 + n))
        assert len(spans) == 1 and 1 <= len(spans[next(iter(spans))]) < n   # one noise span, never all of it


def test_span_corruption_equals_the_per_sample_reference(prefix_build):
    """The batch-wide collator gives exactly the per-sample reference's batch (draws, spans, sentinels, masks,
    documents, sources): on the build's real samples (masked SPs, several documents a sample), under a load-time
    policy, at several densities, and on short and ragged samples."""
    from t5_reference import ReferenceSpanCorruption

    ds = open_dataset(prefix_build, weights=False)
    info, samples = ds.build, _all(ds)
    short = [{"input_ids": np.arange(100, 100 + n), "source_id": 1, "doc_offsets": np.array([0] + [1] * (n > 3)),
              "sp_positions": b"", "msp_mask": b""} for n in (1, 2, 3, 5, 12, 40)]
    cases = [({}, samples[:32]), ({}, samples[-7:] + short), ({"noise_density": 0.3, "mean_span": 2.0}, samples[:16]),
             ({"noise_density": 0.5, "mean_span": 1.0, "seed": 3}, samples[16:40]),
             ({"sp_policy": "insert=0.5,msp=0.5", "doc_attention": False}, samples[:16]), ({}, short)]
    for kw, batch in cases:
        new, ref = SpanCorruptionCollator(info, **kw)(batch), ReferenceSpanCorruption(info, **kw)(batch)
        assert new.keys() == ref.keys()
        for k in ref:
            assert new[k].dtype == ref[k].dtype and torch.equal(new[k], ref[k]), (kw, k)


def _reassemble(b: dict, i: int, sentinels: set) -> tuple[list[int], dict[int, list[int]]]:
    """Sample i of a span-corruption batch put back together: each sentinel of the input replaced by its span
    from the target. Returns the tokens and the spans (sentinel -> tokens)."""
    inp = b["input_ids"][i][b["doc_ids"][i] >= 0].numpy()[:-1]       # drop the final EOS
    tgt = b["labels"][i][b["labels"][i] != IGNORE].numpy()[:-1]
    spans, cur = {}, None
    for t in tgt:
        if t in sentinels:
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    return [x for t in inp for x in (spans[int(t)] if t in sentinels else [int(t)])], spans


@pytest.mark.parametrize("kind", ["sptok Loader", "StreamingDataLoader"])
def test_resume_mid_epoch_gives_the_same_batches(prefix_build, kind):
    from streaming import StreamingDataLoader

    from sptok.data import Loader

    def loader(workers=2):
        ds = open_dataset(prefix_build, batch_size=4, shuffle=True, shuffle_seed=7)
        coll = MLMCollator(ds.build, seed=2, sp_policy="insert=0.7,msp=0.3")
        if kind == "sptok Loader":
            return Loader(ds, coll, batch_size=4, num_workers=workers)
        return StreamingDataLoader(ds, batch_size=4, num_workers=workers, collate_fn=coll)

    def kept(batch):   # a worker's tensor holds a file descriptor while it lives: keep copies, not them
        return {k: v.clone() for k, v in batch.items()}

    full = [kept(b) for b in loader()]
    first = loader()
    it = iter(first)
    head = [kept(next(it)) for _ in range(5)]
    state = first.state_dict()
    del it, first
    resumed = loader(workers=1)   # another count: streaming's order does not depend on it (elastic determinism)
    resumed.load_state_dict(state)
    tail = [kept(b) for b in resumed]
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_auto_workers_is_this_process_share_of_the_cpus_less_one(prefix_build, monkeypatch):
    from sptok.data import Loader, auto_workers

    # (CPUs, processes on the host): CPUs // processes - 1, at least 1, at most 8
    cases = {(1, 1): 1, (2, 1): 1, (2, 2): 1, (4, 1): 3, (16, 8): 1, (32, 8): 3, (16, 1): 8, (128, 4): 8}
    assert {k: auto_workers(*k) for k in cases} == cases
    ds = open_dataset(prefix_build, batch_size=4)
    assert Loader(ds, MLMCollator(ds.build), batch_size=4).num_workers == auto_workers()
    ds.close()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")   # as torchrun sets it
    assert auto_workers() == auto_workers(len(os.sched_getaffinity(0)), 2)


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(d))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the loader's workers in /proc")
def test_loader_workers_leave_stop_signals_to_the_training_process(prefix_build):
    """Slurm signals every process of a job: a worker killed by SIGTERM, SIGUSR1 or SIGINT ended the epoch with
    "DataLoader worker exited unexpectedly" before the training process could save. Workers ignore them."""
    from sptok.data import Loader

    before = _children(os.getpid())
    ds = open_dataset(prefix_build, batch_size=4)
    loader = Loader(ds, MLMCollator(ds.build), batch_size=4, num_workers=1)
    it = iter(loader)
    got = [next(it)]
    workers = _children(os.getpid()) - before
    assert workers
    for pid in workers:   # sent by another process, as Slurm's are (torch's own handler spares its parent's)
        for s in ("TERM", "USR1", "INT"):
            subprocess.run(["kill", f"-{s}", str(pid)], check=True)
    got += list(it)
    assert len(got) == len(loader)
    ds.close()
    # their parent's SIGTERM still ends them: a process exiting mid-epoch stops its workers that way
    r = subprocess.run([sys.executable, "-c", _EXIT_MID_EPOCH, str(prefix_build)], timeout=120)
    assert r.returncode == 3


_EXIT_MID_EPOCH = """
import sys
from sptok.data import Loader, MLMCollator, open_dataset
ds = open_dataset(sys.argv[1], batch_size=4)
it = iter(Loader(ds, MLMCollator(ds.build), batch_size=4, num_workers=1))
next(it)
sys.exit(3)
"""


def test_proportions_over_an_epoch(prefix_build):
    from collections import Counter

    ds = open_dataset(prefix_build)                          # manifest weights 1 : 1 : 0.5 : 0.5
    counts = Counter(s["source_id"] for s in ds)             # one epoch, as streaming samples it
    total = sum(counts.values())
    for sid, w in enumerate([1 / 3, 1 / 3, 1 / 6, 1 / 6]):
        assert abs(counts[sid] / total - w) < 0.01
    ds = open_dataset(prefix_build, proportion={"code": 2.0}, epoch_size=300, batch_size=1)
    counts = Counter(s["source_id"] for s in ds)
    assert abs(counts[1] / 300 - 2 / 4) < 0.02


_READER = """
import sys, time
from sptok.data import Loader, MLMCollator, open_dataset
ds = open_dataset(sys.argv[1], batch_size=4)
next(iter(Loader(ds, MLMCollator(ds.build), batch_size=4, num_workers=2)))
print("reading", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors in /proc")
def test_a_dataset_gives_back_its_threads_and_shared_memory(prefix_build):
    """streaming keeps every shared-memory segment open until the process exits, and the two threads of an
    epoch left half-read poll for good: a process that opens datasets one after another (evaluation, a
    mixture search, a test session) ran out of file descriptors. close() and collection give them back."""
    import gc

    def shm_fds() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/shm/")
            except OSError:
                pass
        return n

    fds = shm_fds()
    for _ in range(2):
        ds = open_dataset(prefix_build, batch_size=4)
        it = iter(ds)
        next(it)                                   # half an epoch: streaming's threads are running
        epoch_threads = list(ds._executor._threads)
        assert shm_fds() > fds and epoch_threads and all(t.is_alive() for t in epoch_threads)
        ds.close()
        assert shm_fds() == fds and not any(t.is_alive() for t in epoch_threads)
        del it, ds
    for _ in range(2):                             # never iterated, never closed: collected
        ds = open_dataset(prefix_build)
        assert len(ds) and shm_fds() > fds
        del ds
        gc.collect()
        assert shm_fds() == fds


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm: streaming keeps no POSIX shared memory")
def test_shared_memory_of_a_killed_reader_is_cleaned(prefix_build):
    """kill -9 of a reader with 2 loader workers leaks streaming's /dev/shm segments; the next
    open_dataset removes them, and never the segments of a reader that is alive."""
    from sptok.data.shm import clean_stale_shm

    def ctimes(names) -> dict[str, int]:
        """Creation times of the segments among ``names`` that still exist (another process may unlink one
        between the listing and the stat)."""
        out = {}
        for n in names:
            try:
                out[n] = os.stat(f"/dev/shm/{n}").st_ctime_ns
            except FileNotFoundError:
                pass
        return out

    def segments(pid: int) -> dict[str, int]:
        """The streaming segments a process maps (its own, and others' it looked at), with their creation times."""
        with open(f"/proc/{pid}/maps") as f:
            names = {line.split("/dev/shm/")[1].split()[0] for line in f if "/dev/shm/" in line}
        return ctimes(n for n in names if n[:6].isdigit())

    before = ctimes(os.listdir("/dev/shm"))

    def still_there(segs: dict[str, int]) -> set[str]:
        return {n for n, c in segs.items() if os.path.exists(f"/dev/shm/{n}")
                and os.stat(f"/dev/shm/{n}").st_ctime_ns == c}

    p = subprocess.Popen([sys.executable, "-c", _READER, prefix_build], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "reading"
        leaked = {n: c for n, c in segments(p.pid).items() if before.get(n) != c}   # made by the reader
        assert leaked, "the reader made no shared memory: the test would prove nothing"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert still_there(leaked) == set(leaked)          # kill -9: streaming never unlinked them
    live = open_dataset(prefix_build)                   # cleans, then makes its own
    assert not still_there(leaked)
    list(zip(range(2), live))                           # the live reader holds its segments now
    mine = segments(os.getpid())                        # this process's live readers, and what they looked at
    assert mine and not set(clean_stale_shm()) & set(mine)   # a live reader's segments are kept
    assert still_there(mine) == set(mine)
    del live


def test_plain_dataloader_loop_and_arrow_build(corpus, prefix_build):
    from torch.utils.data import DataLoader

    ds = open_dataset(prefix_build, weights=False)
    batches = list(DataLoader(ds, batch_size=8, collate_fn=CausalLMCollator(ds.build)))
    assert sum(len(b["input_ids"]) for b in batches) == len(ds)
    pq = _build(corpus, "parquet", msp_prob=0.3, insert_prob=0.9, format="parquet")
    table = open_dataset(pq, weights=False)
    assert len(table) == len(ds)
    a = MLMCollator(table.build, seed=4)([table[i] for i in range(16)])
    b = MLMCollator(ds.build, seed=4)([ds[i] for i in range(16)])
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_hf_trainer_trains_a_tiny_bert(prefix_build, tmp_path):
    """The README's recipe: the collator with extras=False, and one line for document-confined attention."""
    from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments

    from sptok.data import apply_document_attention

    ds = open_dataset(prefix_build, batch_size=8, shuffle=True, weights=False)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=ds.build.vocab_size, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=128, max_position_embeddings=SEQ))
    model = apply_document_attention(model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40,
                             learning_rate=2e-3, logging_steps=5, report_to=[], use_cpu=True,
                             dataloader_num_workers=0, save_strategy="no", remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=MLMCollator(ds.build, extras=False))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 1.0, losses


def _damaged_copy(build: str, tmp_path, name: str = "b") -> str:
    """A copy of ``build`` without the decompressed shards streaming left beside the .zstd ones, so a read
    goes through the .zstd shards a test then damages."""
    import shutil

    out = shutil.copytree(build, tmp_path / name, ignore=shutil.ignore_patterns("shard.*.mds"))
    return str(out)


def test_a_deleted_or_cut_data_file_is_refused_before_reading(corpus, prefix_build, tmp_path):
    """streaming ends an epoch early without a word at a shard it cannot read, and a table build read by
    globbing lost a deleted file's rows: both are refused up front, naming the file."""
    out = _damaged_copy(prefix_build, tmp_path, "gone")
    os.remove(os.path.join(out, "fortunes", "shard.00000.mds.zstd"))
    with pytest.raises(SptokError, match=r"fortunes/shard\.00000\.mds\.zstd: missing \(listed in fortunes/index"):
        open_dataset(out, weights=False)
    out = _damaged_copy(prefix_build, tmp_path, "cut")
    shard = os.path.join(out, "fortunes", "shard.00000.mds.zstd")
    os.truncate(shard, os.path.getsize(shard) // 2)
    with pytest.raises(SptokError, match=r"shard\.00000\.mds\.zstd: [\d,]+ bytes, fortunes/index.json lists"):
        open_dataset(out, weights=False)
    pq = _damaged_copy(_build(corpus, "parquet", msp_prob=0.3, insert_prob=0.9, format="parquet"), tmp_path, "pq")
    last = sorted(f for f in os.listdir(os.path.join(pq, "fortunes")) if f.startswith("data-"))[-1]
    os.remove(os.path.join(pq, "fortunes", last))
    with pytest.raises(SptokError, match=rf"fortunes/{last}: missing \(listed in fortunes/_files.json\)"):
        open_dataset(pq, weights=False)


def test_a_corrupt_shard_of_the_right_size_fails_the_epoch_in_one_line(prefix_build, tmp_path):
    """A shard damaged inside, its size unchanged (only `sptok verify`'s hashes see it): the epoch reading it
    fails with one line naming the build, in a loader worker too, instead of ending early."""
    out = _damaged_copy(prefix_build, tmp_path)
    shard = os.path.join(out, "fortunes", "shard.00000.mds.zstd")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) * 3 // 4)
        f.write(bytes(1000))
    ds = open_dataset(out, weights=False, batch_size=8)
    with pytest.raises(SptokError) as e:
        for _ in Loader(ds, MLMCollator(ds.build), batch_size=8, num_workers=1):
            pass
    assert e.value.message.startswith(f"{out}: cannot read a shard (") and "\n" not in e.value.message
    ds.close()
    for f in os.listdir(os.path.join(out, "fortunes")):   # a decompressed copy streaming may have left
        if f.endswith(".mds"):
            os.remove(os.path.join(out, "fortunes", f))
    ds = open_dataset(out, weights=False)   # read by index, as in-loop evaluation reads its samples
    with pytest.raises(SptokError, match=f"^{out}: cannot read a shard"):
        [ds[i] for i in range(len(ds))]
    with pytest.raises(IndexError):
        ds[len(ds)]
    ds.close()


def test_odd_weights_and_collator_settings_are_refused_in_one_line(prefix_build):
    """Through the library, not the config: streaming's ValueError / TypeError deep in its weighting, numpy's
    broadcast or index errors in span corruption, or a negative noise density taken silently."""
    for kwargs, message in (({"proportion": {"code": -1}}, r"^proportion: code: must be a finite number >= 0, got -1$"),
                            ({"proportion": {"code": float("nan")}}, "^proportion: code: .* got nan$"),
                            ({"repeat": {"code": "2"}}, "^repeat: code: .* got '2'$")):
        with pytest.raises(SptokError, match=message):
            open_dataset(prefix_build, **kwargs)
    info = BuildInfo.load(prefix_build)
    for kwargs, message in (({"noise_density": 2}, "^noise_density must be a number in"),
                            ({"noise_density": -0.1}, "^noise_density must be a number in"),
                            ({"mean_span": 0}, "^mean_span must be a number >= 1, got 0$"),
                            ({"max_sentinels": -1}, r"^max_sentinels must be a number \(an integer\) >= 1")):
        with pytest.raises(SptokError, match=message):
            SpanCorruptionCollator(info, **kwargs)
    with pytest.raises(SptokError, match=r"^mlm_prob must be in \(0, 1\), got '0.2'$"):
        MLMCollator(info, mlm_prob="0.2")
    ds = open_dataset(prefix_build, weights=False)
    for workers in (-1, "many", 1.5):   # torch's ValueError, or int()'s, and a noisy __del__ of streaming's loader
        with pytest.raises(SptokError, match=r'^num_workers: expected "auto" or a count >= 0, got '):
            Loader(ds, MLMCollator(info), batch_size=2, num_workers=workers)
    ds.close()

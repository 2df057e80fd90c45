"""`sptok build --executor ray` with a remote --out (s3://...): no filesystem is shared, each node uploads its units.

A unit is built by a stage task in its node's own work directory (the plan and tokenizer come through Ray's object
store) and kept there; once every unit before it in its source is built, its shards have their final names
(numbered per source), and an upload task on that node sends them with streaming's uploader; the driver commits the
unit (its small files, ``uploaded`` naming the remote, result.json last) only then. ``ray_executor.RayPool`` runs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile

from .. import layout
from .encoders import EncoderMismatch
from .runner import unit_context


def _stage_task(files: dict, key: str, strict: bool, encoder: str, unit) -> dict:
    """One unit of a remote output, built in this node's own work directory and kept there for its upload: its
    result, this node, and its files but the shards (small: tail, held-out documents, rejects), which the driver
    commits once the shards are uploaded."""
    import ray

    from .finalize import file_basename

    work = _node_work(files, key)
    result = _unit_here(work, strict, encoder, unit)
    udir = layout.unit_dir(work, unit.index)
    shards = {file_basename(f, unit_context(work, strict, encoder).fmt) for f in result["files"]}
    small = {}
    for name in sorted(set(os.listdir(udir)) - shards):
        with open(os.path.join(udir, name), "rb") as f:
            small[name] = f.read()
    return {"result": result, "node": ray.get_runtime_context().get_node_id(), "files": small}


def _upload_task(files: dict, key: str, strict: bool, encoder: str, unit, remote: str,
                 names: list[tuple[str, str]]) -> None:
    """Upload a unit's shards from this node to ``remote``, each (its name in the unit, its path in the output) of
    ``names`` (their places in their source, known once the units before it are built); then drop the unit here.
    A node that does not hold the unit (a retry, another node) builds it again first: the same bytes."""
    from .remote import upload_files

    work = _node_work(files, key)
    _unit_here(work, strict, encoder, unit)
    udir = layout.unit_dir(work, unit.index)
    stage = os.path.join(work, "upload")   # one root per node and build: the worker's uploader is made once
    for mine, theirs in names:   # streaming's uploader sends a file to the same path under the remote
        os.makedirs(os.path.dirname(os.path.join(stage, theirs)), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):   # a dead attempt's link
            os.remove(os.path.join(stage, theirs))
        os.link(os.path.join(udir, mine), os.path.join(stage, theirs))
    upload_files(stage, remote, [theirs for _, theirs in names])
    for _, theirs in names:
        os.remove(os.path.join(stage, theirs))
    shutil.rmtree(udir, ignore_errors=True)


def _node_work(files: dict, key: str) -> str:
    """This node's own work directory for a remote output (no filesystem is shared): the plan and tokenizer the
    driver sent, made once per node (a rename: the node's workers race for it), and the units built here."""
    work = os.path.join(tempfile.gettempdir(), "sptok-ray", key)
    if not os.path.exists(os.path.join(work, layout.PLAN)):
        tmp = f"{work}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        try:
            os.rename(tmp, work)
        except OSError:   # another worker of this node made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return work


def _drop_task(key: str) -> None:
    """Remove this node's work directory of a build that no longer needs it (its plan, tokenizer and upload
    stage, and what killed attempts left beside it)."""
    root = os.path.join(tempfile.gettempdir(), "sptok-ray")
    for name in os.listdir(root) if os.path.isdir(root) else ():
        if name == key or name.startswith(f"{key}."):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    with contextlib.suppress(OSError):   # not empty: another build's
        os.rmdir(root)


def _drop_everywhere(ray, key: str) -> None:
    """``_drop_task`` on every live node (a retried or moved task may have made the directory on any of them).
    A node that does not answer within a minute keeps it: a temporary directory, not worth a failed build."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    drop = ray.remote(num_cpus=0, max_retries=0)(_drop_task)
    refs = [drop.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(key)
            for n in ray.nodes() if n["Alive"]]
    ray.wait(refs, num_returns=len(refs), timeout=60)


def _unit_here(work: str, strict: bool, encoder: str, unit) -> dict:
    """The result of ``unit`` committed in this node's ``work``, built now unless it is there."""
    from .unit import process_unit

    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one task per CPU; no thread pool inside
    udir = layout.unit_dir(work, unit.index)
    if layout.is_committed(udir):
        return layout.read_result(udir)
    return process_unit(unit_context(work, strict, encoder), unit)


def _work_files(work: str) -> dict[str, bytes]:
    """What a node needs of the driver's work directory to build units: the plan and the tokenizer."""
    tokenizer = os.path.join(work, layout.TOKENIZER)
    names = [layout.PLAN] + [os.path.join(layout.TOKENIZER, n) for n in os.listdir(tokenizer)]
    out = {}
    for name in names:
        with open(os.path.join(work, name), "rb") as f:
            out[name] = f.read()
    return out


def run_remote(pool, work: str, todo: list, strict: bool, encoder: str, progress, on_done) -> None:
    """Units of a remote output: each built on a node (``_stage_task``), then its shards uploaded from that node
    under their final names (``_upload_task``), which are known once every unit before it in its source is
    built; the driver commits a unit (its small files) only once its shards are uploaded, so a unit that looks
    committed is whole in the remote, and a killed or retried task leaves none half there."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .finalize import file_basename
    from .unit import commit_files

    ray = pool.ray
    stage = ray.remote(_stage_task).options(num_cpus=1, max_retries=pool.RETRIES)
    upload = ray.remote(num_cpus=1, max_retries=pool.RETRIES)(_upload_task)   # placed per call
    plan = layout.read_json(os.path.join(work, layout.PLAN))
    fmt = plan["options"]["format"]
    # the node's work directory: this build, this encoder (a fallback's units are other units), this remote
    key = hashlib.sha1(f"{pool.remote}\0{plan['fingerprint']}\0{encoder}".encode()).hexdigest()[:16]
    files = ray.put(_work_files(work))
    shards: dict[int, list[str]] = {}   # unit index -> its shards' names in the unit, once built
    for u in plan["units"]:
        udir = layout.unit_dir(work, u["index"])
        if layout.is_committed(udir):
            shards[u["index"]] = [file_basename(f, fmt) for f in layout.read_result(udir)["files"]]
    by_source: dict[str, list[int]] = {}
    for u in plan["units"]:
        by_source.setdefault(u["source"], []).append(u["index"])
    units = {u.index: u for u in todo}
    staged: dict[int, dict] = {}
    order = sorted(todo, key=lambda u: -u.size)   # big units first: a shorter tail of the schedule
    builds = {stage.remote(files, key, strict, encoder, u): u for u in order}
    uploads: dict = {}

    def upload_ready() -> list:
        new = []
        for source, indexes in by_source.items():
            k = 0
            for i in indexes:
                if i not in shards:   # the units after it wait for their place in the source
                    break
                if i in staged and "upload" not in staged[i]:
                    names = [(n, f"{source}/{layout.data_file(k + j, fmt)}") for j, n in enumerate(shards[i])]
                    where = NodeAffinitySchedulingStrategy(staged[i]["node"], soft=True)
                    ref = upload.options(scheduling_strategy=where).remote(
                        files, key, strict, encoder, units[i], pool.remote, names)
                    staged[i]["upload"], uploads[ref] = ref, i
                    new.append(ref)
                k += len(shards[i])
        return new

    pending = list(builds)
    pool.refs = builds
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
            for ref in done:
                if ref in builds:
                    report, unit = pool._get(ref), builds[ref]
                    staged[unit.index], result = report, report["result"]
                    shards[unit.index] = [file_basename(f, fmt) for f in result["files"]]
                    pool.report(progress, result, unit)
                    pending += upload_ready()
                else:
                    pool._get(ref)
                    unit = units[uploads[ref]]
                    small = staged.pop(unit.index)["files"]
                    commit_files(work, unit, {**small, layout.UPLOADED: pool.remote.encode()})
                    progress.unit_done()
                    on_done(unit)
    except EncoderMismatch:   # the build falls back: let no unit of this encoder commit after this
        pool._stop(pending)
        _drop_everywhere(ray, key)   # the fallback's units have another key
        raise
    _drop_everywhere(ray, key)   # (after another error, the units built on nodes are kept for the resume)


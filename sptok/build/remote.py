"""Remote outputs (s3://, gs://, oci://, azure://, hf://, dbfs:...): build in a local staging directory,
then upload it with mosaicml-streaming's own uploaders (no hand-written cloud clients), sptok.json last."""

from __future__ import annotations

import functools
import hashlib
import os
import urllib.parse

from ..errors import SptokError
from ..extras import require
from ..layout import MARKER, WORK


def is_remote(out: str) -> bool:
    scheme = urllib.parse.urlparse(out).scheme
    return len(scheme) > 1   # not a Windows drive letter


def staging_dir(remote: str) -> str:
    """Where a remote build is made first, unless --local says otherwise."""
    key = hashlib.sha1(remote.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~/.cache/sptok/builds"), key)


def check_remote(remote: str, timeout: float = 30.0) -> None:
    """Before a build: can streaming's uploader start on ``remote`` (credentials, bucket)? It checks both when
    made, so a refusal comes now, in one line, not after the build. Bounded: a remote that does not answer
    would otherwise hold the build for as long as the provider's retries last."""
    require("remote", f"--out {remote}")
    if urllib.parse.urlparse(remote).scheme == "s3":   # no credentials at all: said at once, without a request
        import boto3

        if boto3.session.Session().get_credentials() is None:
            raise SptokError(f"--out {remote}: no AWS credentials found, so nothing could be uploaded; nothing was "
                             f"built: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, then run the "
                             f"same command again")
    import tempfile
    import threading

    from streaming.base.storage.upload import CloudUploader

    failed: list[BaseException] = []

    def start():
        try:
            with tempfile.TemporaryDirectory() as d:
                CloudUploader.get((d, remote), keep_local=True, exist_ok=True)
        except Exception as e:  # each provider raises its own types
            failed.append(e)

    t = threading.Thread(target=start, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise SptokError(f"--out {remote}: no answer within {timeout:.0f} s; check the network, the endpoint and the "
                         f"credentials, or build to a local --out and upload it later")
    if failed:
        raise SptokError(f"--out {remote}: streaming cannot upload there ({_one_line(failed[0])}); nothing was "
                         f"built: set the provider's credentials (S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                         f"or AWS_PROFILE) or fix the address, then run the same command again")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def upload_files(local: str, remote: str, files: list[str]) -> None:
    """Upload ``files`` (paths under ``local``) to the same paths under ``remote``, in this order, with streaming's
    uploader: what a Ray task of a remote --out does with its unit's shards. Fails in one line."""
    try:
        up = _uploader(local, remote)
        for f in files:
            if not urllib.parse.urlparse(remote).scheme:   # a local "remote" (LocalUploader) needs its folders
                os.makedirs(os.path.dirname(os.path.join(remote, f)), exist_ok=True)
            up.upload_file(f)
    except Exception as e:  # each provider raises its own types
        raise SptokError(f"upload to {remote} failed ({_one_line(e)}); the units committed so far are kept: run the "
                         f"same command again to resume") from None


@functools.lru_cache(maxsize=4)
def _uploader(local: str, remote: str):
    """streaming's uploader from ``local`` to ``remote``, made once per process (a client and a bucket check)."""
    from streaming.base.storage.upload import CloudUploader

    return CloudUploader.get((local, remote), keep_local=True, exist_ok=True)


def upload_build(local: str, remote: str, log=print) -> int:
    """Upload every file of a complete build; sptok.json goes last so the remote never looks complete early."""
    require("remote", f"--out {remote}")
    from streaming.base.storage.upload import CloudUploader

    if not os.path.exists(os.path.join(local, MARKER)):
        raise SptokError(f"{local}: not a complete build; nothing to upload")
    files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs
                   if not os.path.relpath(d, local).startswith(WORK))
    # every sptok.json after the files it describes: the validation split's, then the build's own
    files.sort(key=lambda f: (os.path.basename(f) == MARKER, -f.count("/"), f))
    try:
        up = CloudUploader.get((local, remote), keep_local=True, exist_ok=True)
    except Exception as e:  # each provider raises its own types (botocore's NoCredentialsError, ...)
        raise SptokError(f"--out {remote}: streaming cannot upload there ({_one_line(e)}); the local build in {local} "
                         f"is complete: run the same command again to retry the upload") from None
    for i, f in enumerate(files):
        if not urllib.parse.urlparse(remote).scheme:   # a local "remote" (LocalUploader) needs its folders
            os.makedirs(os.path.dirname(os.path.join(remote, f)), exist_ok=True)
        try:
            up.upload_file(f)
        except Exception as e:  # each provider raises its own types
            raise SptokError(f"upload of {f} to {remote} failed ({e}); the local build in {local} is complete: run "
                             f"the same command again to retry the upload") from None
    log(f"uploaded {len(files)} files to {remote}")
    return len(files)

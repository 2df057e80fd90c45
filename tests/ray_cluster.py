"""Run by tests/test_ray.py inside a network + PID namespace of its own (so Ray only ever talks over loopback, and
every Ray process ends with the namespace): builds with `--executor ray`, and what happened to each.

    unshare --net --pid --fork --mount-proc sh -c 'ip link set lo up && exec python tests/ray_cluster.py CONFIG.json'

CONFIG names the corpus, the tokenizer, the build flags and a directory; the builds go there, and results.json
records each one's exit code and stderr (and what the kill scenarios saw). The asserts are in tests/test_ray.py.
Scenarios, in order:
  local          no address: the build starts a local Ray with --workers CPUs (before any cluster exists), on a
                 corpus where the fast encoder (gigatoken hidden) is caught giving other ids mid-build: the
                 fallback to the Hugging Face tokenizer, with every unit it built built again; then which Ray
                 processes are left (none may be: the build kills the Ray it started)
  cluster        a two-node cluster (`ray start --head`, then a second node), the build on it via RAY_ADDRESS
  worker_killed  a Ray worker running a unit is killed (SIGKILL, by the pid in its unit's temporary directory)
  driver_killed  who holds the lock mid-build; the build's own process is killed after a few units; the same
                 command again
  task_error     --strict on a bad record deep in a unit: the task's SptokError
  remote         --out s3://... (moto's S3 server on loopback, started with the cluster so its nodes have the
                 endpoint): each task uploads its unit, and a worker building one in its node's own directory
                 is killed; what the bucket then holds is downloaded, and which files the driver's --local kept
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

ADDRESS = "127.0.0.1:6379"


def sptok(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sptok", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def finished(p: subprocess.Popen) -> dict:
    _, err = p.communicate(timeout=300)
    return {"rc": p.returncode, "stderr": err}


def ray(*args: str) -> None:
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), *args], capture_output=True,
                       text=True, timeout=120)
    if r.returncode:
        raise AssertionError(f"ray {' '.join(args)}: {r.stdout[-2000:]}{r.stderr[-2000:]}")


def wait_for(what, reached, p: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not reached():
        if p.poll() is not None or time.time() > end:
            raise AssertionError(f"the build ended (or {timeout:.0f} s passed) before {what}: {p.stderr.read()}")
        time.sleep(0.002)


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def kill_a_worker(build: list[str], tmp: str, env: dict) -> dict:
    """Kill the Ray worker process building the first unit seen in the temporary directories ``tmp`` (a glob:
    .sptok/tmp of a shared --out, or the nodes' own ones of a remote --out), named u<index>.<pid>."""
    p = sptok(build, env)
    seen: list[str] = []

    def started() -> bool:
        seen[:] = [os.path.join(d, n) for d in glob.glob(tmp) for n in os.listdir(d)]
        return bool(seen)

    wait_for("a unit started", started, p)
    path = seen[0]
    pid = int(path.rsplit(".", 1)[1])
    os.kill(pid, signal.SIGKILL)
    while alive(pid):
        time.sleep(0.001)
    # still there once the worker is dead: it died before its rename, so its unit must be built again
    seen = {"killed_mid_unit": os.path.isdir(path), "unit": os.path.basename(path).split(".")[0]}
    return {**finished(p), **seen}


def kill_the_driver(build: list[str], out: str, env: dict, after_units: int = 3) -> dict:
    units = os.path.join(out, ".sptok", "units")
    p = sptok(build, env)
    wait_for(f"{after_units} units were committed",
             lambda: os.path.isdir(units) and len(os.listdir(units)) >= after_units, p)
    from sptok.layout import writer_of

    writer = writer_of(out)   # the driver holds the directory's lock while Ray's workers write units into it
    p.kill()
    p.wait()
    left_complete = os.path.exists(os.path.join(out, "sptok.json"))
    return {"lock_holder": (writer or {}).get("pid"), "driver": p.pid, "killed_complete": left_complete,
            **finished(sptok(build, env))}


def other_processes(wait: float = 10.0) -> list[str]:
    """The command lines of this namespace's processes but this one (Ray's workers rename themselves ``ray::...``),
    once none is left or ``wait`` seconds passed: a killed raylet's workers notice its end within moments."""
    end = time.time() + wait
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid() or not alive(int(pid)):
                continue
            try:
                found.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
        if not found or time.time() > end:
            return found
        time.sleep(0.05)


def start_s3() -> tuple[object, str]:
    """moto's S3 server on loopback, a bucket on it, and the environment that points boto3 (streaming's S3
    uploader) there: set here, before the cluster starts, so every Ray node has it as a node in the cloud would."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=5000, verbose=False)
    server.start()
    os.environ.update(S3_ENDPOINT_URL="http://127.0.0.1:5000", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).create_bucket(Bucket="sptok-test")
    return server, "s3://sptok-test/built"


def download(remote: str, into: str) -> None:
    """Every object under ``remote`` (s3://bucket/prefix) into the directory ``into``."""
    import boto3

    bucket, prefix = remote[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            path = os.path.join(into, o["Key"][len(prefix) + 1:])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s3.download_file(bucket, o["Key"], path)


def files_under(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def main() -> None:
    cfg = json.load(open(sys.argv[1]))
    d, flags = cfg["dir"], cfg["flags"]
    os.environ["RAY_TMPDIR"] = os.path.join(d, "ray")   # Ray's sockets and logs: not the machine's /tmp/ray
    os.environ.pop("RAY_ADDRESS", None)
    # no cluster token: nothing outside this namespace can reach its loopback (Ray 2.60's token setup also
    # refuses a second `ray start` on the same machine, and writes ~/.ray)
    os.environ["RAY_AUTH_MODE"] = "disabled"

    def build(name: str, *extra: str, manifest: str = cfg["manifest"], out: str | None = None) -> list[str]:
        return ["build", manifest, "--out", out or os.path.join(d, name), "--tokenizer", cfg["tokenizer"], *flags,
                "--executor", "ray", *extra]

    t0 = time.time()
    mismatch = cfg["mismatch"]
    results = {"local": finished(sptok(["build", mismatch["manifest"], "--out", os.path.join(d, "local"),
                                        "--tokenizer", mismatch["tokenizer"], *mismatch["flags"], "--workers", "2",
                                        "--executor", "ray"], mismatch["env"]))}
    results["left_by_local"] = other_processes()   # the build stopped its Ray: nothing of it is left
    t1 = time.time()
    s3, remote = start_s3()
    os.environ["TMPDIR"] = os.path.join(d, "nodes")   # the nodes' own work directories (a remote --out)
    os.makedirs(os.environ["TMPDIR"])
    ray("start", "--head", "--node-ip-address=127.0.0.1", "--port=6379", "--num-cpus=1", "--include-dashboard=false",
        "--disable-usage-stats")
    ray("start", f"--address={ADDRESS}", "--node-ip-address=127.0.0.1", "--num-cpus=1")
    import ray as ray_module

    ray_module.init(address=ADDRESS, logging_level="ERROR")
    results["nodes"] = sorted(n["NodeManagerAddress"] for n in ray_module.nodes() if n["Alive"])
    ray_module.shutdown()
    results["seconds"] = {"local": t1 - t0, "cluster start": time.time() - t1}
    env = {"RAY_ADDRESS": ADDRESS}
    results["cluster"] = finished(sptok(build("cluster"), env))
    results["worker_killed"] = kill_a_worker(build("worker_killed", "--encoder", "hf"),
                                             os.path.join(d, "worker_killed", ".sptok", "tmp"), env)
    results["driver_killed"] = kill_the_driver(build("driver_killed", "--encoder", "hf"),
                                               os.path.join(d, "driver_killed"), env)
    results["task_error"] = finished(sptok(build("task_error", "--strict", manifest=cfg["bad_manifest"]), env))
    t2 = time.time()
    local = os.path.join(d, "remote_local")
    results["remote"] = kill_a_worker(build("", "--local", local, "--encoder", "hf", out=remote),
                                      os.path.join(os.environ["TMPDIR"], "sptok-ray", "*", "tmp"), env)
    download(remote, os.path.join(d, "remote_download"))
    results["remote"]["local_files"] = files_under(local)
    results["remote"]["left_on_nodes"] = files_under(os.environ["TMPDIR"])
    s3.stop()
    results["seconds"]["remote"] = time.time() - t2
    results["seconds"]["scenarios"] = time.time() - t1 - results["seconds"]["cluster start"]
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()

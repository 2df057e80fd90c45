"""The guard of the core install: run by .ci/run in a fresh venv holding only `pip install -e .`.

1. No distribution that an extra names is installed: the core's dependencies pull none of them in.
2. build -> verify -> stats -> show -> rejects -> report succeed on the demo corpus, then a partitioned build,
   merge, tokenizer train and extend, and no process of theirs (the build's workers included) imports torch,
   transformers, datasets, streaming or ray: PYTHONPROFILEIMPORTTIME makes every Python process list each module it
   imports.
3. Every command that needs an extra fails with exit code 2 and one line naming the extra to install.

tests/test_extras.py runs 2 and 3 in the full environment too, where 3 hides the extras' packages.
Usage: python .ci/core_only.py [WORKDIR]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEVER = ("torch", "transformers", "datasets", "streaming", "ray")   # modules no core command may import

# (arguments, the extra the error must name); WORK is replaced by the working directory, BUILD by the demo build
NEEDS_EXTRA = [
    (["pretrain", "pipelines/tiny-cpu.yaml"], "train"),
    (["mix", "pipelines/tiny-cpu.yaml", "--out", "WORK/mix"], "train"),
    (["export", "WORK/ckpt", "--out", "WORK/model"], "train"),
    (["label", "--model", "WORK/model", "--input", "WORK/rows.jsonl", "--out", "WORK/labelled.jsonl"], "train"),
    (["stats", "BUILD", "--plot", "WORK/figures"], "plot"),
    (["build", "pipelines/demo.yaml", "--out", "s3://sptok-ci/demo", "--local", "WORK/staging"], "remote"),
    (["build", "pipelines/demo.yaml", "--out", "WORK/on-ray", "--executor", "ray"], "ray"),
]
IMPORTS_NEEDING_EXTRA = [("sptok.data", "train"), ("sptok.train", "train"), ("sptok.label", "train"),
                         ("sptok.mix", "train")]


def core_commands(build: str, work: str) -> list[list[str]]:
    at = lambda name: os.path.join(work, name)  # noqa: E731
    return [["build", "pipelines/demo.yaml", "--out", build],
            ["verify", build],
            ["stats", build], ["stats", build, "--json"],
            ["show", build, "-n", "3"], ["show", build, "--source", "code", "--ids", "-n", "1"],
            ["rejects", build],
            ["report", build, "--out", at("report.html")],
            ["build", "pipelines/demo.yaml", "--out", at("part0"), "--partition", "0/2", "--seq-len", "256"],
            ["build", "pipelines/demo.yaml", "--out", at("part1"), "--partition", "1/2", "--seq-len", "256"],
            ["merge", at("part0"), at("part1"), "--out", at("merged")],
            ["tokenizer", "train", "pipelines/demo.yaml", "--out", at("tok"), "--vocab-size", "1000",
             "--max-bytes", "1MB"],
            ["tokenizer", "extend", at("tok"), "--sp", "<EXTRA>", "--out", at("tok2")]]


def sptok(args: list[str], hide: tuple[str, ...] = (), importtime: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m sptok ARGS` from the repository root; ``hide`` makes those modules unimportable."""
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1") if importtime else None
    if hide:
        code = f"import sys; sys.modules.update(dict.fromkeys({list(hide)!r})); from sptok.cli import main; main()"
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "sptok", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def imported(stderr: str) -> set[str]:
    """Top-level modules named by -X importtime lines (of every process that wrote to this stderr)."""
    return {m.group(1) for m in re.finditer(r"^import time:[^|]*\|[^|]*\|\s*([\w]+)", stderr, re.M)}


def check_core_commands(work: str, encoders: tuple[str, ...] = ("tiktoken",)) -> list[str]:
    """Run the core commands on a fresh demo build; returns what went wrong (nothing when all is well). The
    build must run on one of ``encoders``: tiktoken in a core install (the [fast] extra adds the others)."""
    build = os.path.join(work, "demo")
    problems = []
    for args in core_commands(build, work):
        r = sptok(args, importtime=True)
        what = "sptok " + " ".join(args)
        if r.returncode != 0:
            problems.append(f"{what}: exit code {r.returncode}: {_tail(r.stderr)}")
            continue
        bad = sorted(imported(r.stderr) & set(NEVER))
        if bad:
            problems.append(f"{what} imported {', '.join(bad)}: a core command must not need an extra")
        if args[0] == "build" and "--partition" not in args and \
                not any(f"encoder: {e}" in r.stderr for e in encoders):
            problems.append(f"{what}: the build did not run on {' or '.join(encoders)}: {_tail(r.stderr)}")
        if args[0] == "show" and "=== sample 1/" not in r.stdout:
            problems.append(f"{what}: no sample printed")
    return problems


def check_extra_messages(work: str, build: str, hide: bool = False) -> list[str]:
    """Each extra-only command and import fails with one line naming its extra (``hide``: hide the packages)."""
    from sptok.extras import EXTRAS

    problems = []
    for args, extra in NEEDS_EXTRA:
        args = [a.replace("WORK", work).replace("BUILD", build) for a in args]
        r = sptok(args, hide=tuple(EXTRAS[extra]) if hide else ())
        lines = r.stderr.strip().splitlines()
        want = f"pip install 'sptok[{extra}]'"
        if r.returncode != 2 or len(lines) != 1 or want not in lines[0] or r.stdout.strip():
            problems.append(f"sptok {' '.join(args)}: wanted exit code 2 and one line naming {want}; got exit code "
                            f"{r.returncode}: {_tail(r.stdout + r.stderr)}")
    for module, extra in IMPORTS_NEEDING_EXTRA:
        hidden = f"sys.modules.update(dict.fromkeys({list(EXTRAS[extra])!r}))" if hide else "pass"
        code = (f"import sys; {hidden}\ntry:\n    import {module}\nexcept ImportError as e:\n    print(e)\n"
                f"else:\n    print('imported')")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        if f"pip install 'sptok[{extra}]'" not in out or "\n" in out:
            problems.append(f"import {module}: wanted an ImportError naming sptok[{extra}], got: {out!r}")
    return problems


def extras_installed() -> list[str]:
    """Distributions named by an extra of the installed sptok that are installed here."""
    names = set()
    for req in metadata.requires("sptok") or []:
        if "extra ==" in req:
            name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
            if name.lower() != "sptok":
                names.add(name)
    found = []
    for name in sorted(names):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def _tail(text: str, n: int = 600) -> str:
    text = " | ".join(line for line in text.strip().splitlines() if not line.startswith("import time:"))
    return text[-n:]


def main() -> int:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="sptok-core-")
    os.makedirs(work, exist_ok=True)
    problems = [f"installed with the core, though an extra names it: {d}" for d in extras_installed()]
    problems += check_core_commands(work)
    problems += check_extra_messages(work, os.path.join(work, "demo"))
    for p in problems:
        print(f"core-only check: {p}", file=sys.stderr)
    if not problems:
        print(f"core-only check: {len(core_commands('', ''))} core commands ran without torch, transformers, "
              f"datasets, streaming or ray; {len(NEEDS_EXTRA) + len(IMPORTS_NEEDING_EXTRA)} extra-only commands and "
              f"imports named their extra")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""A source's ``paths:`` expanded into its input files, by one rule (README, "What a build is"):

- a directory is walked recursively and a glob is matched (``**`` across directories); names starting with
  ``.``, files and directories alike, are skipped by both (``.git/config`` is not a document);
- symlinks are followed, but each real directory is walked once and each real file read once (under the
  same path on every run): a link loop ends where it closes, and a file linked twice is one input;
- a file found through a symlink whose real path lies outside the directory the source names (the directory
  itself, or a glob's directories before its first wildcard) is refused unless the source sets
  ``links_outside: true``; a file named in ``paths`` itself may be a link to anywhere;
- the build's output directory is never an input: a source whose paths reach into it is refused up front.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from typing import Iterator

from ..errors import SptokError


def walk(top: str, with_dirs: bool = False) -> Iterator[str]:
    """The files under ``top`` (and its directories, ``with_dirs``), hidden names skipped, following symlinks
    into each real directory once."""
    seen: set[str] = set()
    for d, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:          # a loop, or a second link to a directory already walked
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(n for n in dirs if not n.startswith("."))
        names = (dirs if with_dirs else []) + sorted(f for f in files if not f.startswith("."))
        yield from (os.path.join(d, n) for n in names)


def match(pattern: str) -> list[str]:
    """Paths matching a glob (files and directories): ``glob`` itself, or, for ``**``, a walk (``glob`` follows a
    link loop until the path is too long, once for every way round it)."""
    base, rest = split_glob(pattern)
    if "**" not in rest:
        return glob.glob(pattern, recursive=True)
    return [p for p in walk(base, with_dirs=True) if _matches(rest, os.path.relpath(p, base).split(os.sep))]


def split_glob(pattern: str) -> tuple[str, list[str]]:
    """(the directory before the first wildcard, the pattern's components after it)."""
    parts = pattern.split(os.sep)
    k = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return os.sep.join(parts[:k]) or os.sep, parts[k:]


def _name_matches(pattern: str, name: str) -> bool:
    """One path component, as ``glob`` matches it: a wildcard does not match a leading dot."""
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _matches(parts: list[str], names: list[str]) -> bool:
    if not parts:
        return not names
    if parts[0] == "**":
        return any(_matches(parts[1:], names[i:]) for i in range(len(names) + 1))
    return bool(names) and _name_matches(parts[0], names[0]) and _matches(parts[1:], names[1:])


def _reaches(parts: list[str], below: list[str]) -> bool:
    """Whether a glob's components (after its base directory) can match a path below the directory
    ``below`` (components from the base down to it)."""
    if not below:
        return bool(parts)
    if not parts:
        return False
    if parts[0] == "**":
        for i, name in enumerate(below):
            if _reaches(parts[1:], below[i:]):
                return True
            if name.startswith("."):
                return False
        return True
    return _name_matches(parts[0], below[0]) and _reaches(parts[1:], below[1:])


def is_within(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or below it (both real paths)."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def unique_inside(found: list[str], base: str, allow_outside: bool, where) -> list[str]:
    """``found`` (from a walk or a glob of ``base``) with each real file once, refusing a file whose real path
    is outside ``base`` unless ``allow_outside``. ``where(path)`` names a path in a message."""
    base_real = os.path.realpath(base)
    out, reals = [], set()
    for f in sorted(found):
        real = os.path.realpath(f)
        if real in reals:
            continue
        if not os.path.exists(f):
            raise SptokError(f"{where(f)} is a broken symlink (to {real}); remove it or fix its target")
        if not allow_outside and not is_within(real, base_real):
            raise SptokError(f"{where(f)} is a symlink to {real}, outside {base}, the directory this source reads; "
                             f"set `links_outside: true` on the source to read such links, or list the file in "
                             f"`paths:`")
        reals.add(real)
        out.append(f)
    return out


def refuse_output_as_input(manifest, out: str) -> None:
    """The output tree is never an input: refuse, before anything is written or removed, a build whose --out lies
    where a source's paths would find its files (its rejects, its JSON) on this run or the next."""
    out_real = os.path.realpath(out)
    for src in manifest.sources:
        inside = [f for f in src.files if is_within(os.path.realpath(f), out_real)]
        for p in src.paths:
            full = os.path.join(manifest.root, os.path.expanduser(p))
            if glob.has_magic(full):
                base, rest = split_glob(full)
                base_real = os.path.realpath(base)
                reach = is_within(out_real, base_real) and _reaches(
                    rest, [] if out_real == base_real else os.path.relpath(out_real, base_real).split(os.sep))
            else:
                reach = os.path.isdir(full) and is_within(out_real, os.path.realpath(full))
            if reach:
                raise SptokError(f"--out {out} is inside what source {src.name!r} reads (paths: {p!r}): the build's "
                                 f"own files would become its inputs; choose an --out outside it, or narrow the paths")
        if inside:
            raise SptokError(f"--out {out} holds input files of source {src.name!r} (first: "
                             f"{os.path.relpath(inside[0], manifest.root)}): a build writes and removes files in "
                             f"--out; choose an --out that holds no input")

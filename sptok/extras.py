"""The optional extras, and the one place where a missing one becomes a single line naming what to install.

The core install (``pip install sptok``) builds, merges, trains tokenizers, verifies and inspects builds. The
training stack, figures, remote output and Ray come with the extras of ``pyproject.toml``, named here by what they
provide. Presence is checked with ``find_spec``, which imports nothing: finding out that torch is there must
not cost the seconds of importing it.
"""

from __future__ import annotations

from importlib.util import find_spec

from .errors import SptokError

# extra -> {module it provides: its distribution on PyPI}; tests/test_extras.py holds pyproject.toml to this
EXTRAS = {
    "train": {"torch": "torch", "streaming": "mosaicml-streaming", "transformers": "transformers",
              "datasets": "datasets", "sklearn": "scikit-learn"},
    "plot": {"matplotlib": "matplotlib"},
    "remote": {"streaming": "mosaicml-streaming"},
    "ray": {"ray": "ray"},
}


class MissingExtra(SptokError, ImportError):
    """An extra is not installed: a user error for the CLI (one line) and an ImportError for Python code."""

    def __reduce__(self):
        return (MissingExtra, (self.message,))


def missing(extra: str) -> list[str]:
    """The distributions of ``extra`` that are not installed."""
    return [dist for module, dist in EXTRAS[extra].items() if find_spec(module) is None]


def available(extra: str) -> bool:
    return not missing(extra)


def require(extra: str, what: str) -> None:
    """Raise MissingExtra naming ``pip install 'sptok[extra]'`` unless every package of ``extra`` is there.

    ``what`` is what needs it, as the user would say it: ``sptok pretrain``, ``sptok.data``, ``--plot``."""
    gone = missing(extra)
    if gone:
        names = gone[0] if len(gone) == 1 else ", ".join(gone[:-1]) + " and " + gone[-1]
        raise MissingExtra(f"{what} needs {names}, which {'is' if len(gone) == 1 else 'are'} not installed: "
                           f"pip install 'sptok[{extra}]'")

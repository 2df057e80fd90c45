"""The layers of the install: core commands never import the training stack, and whatever needs an extra says
which one in one line. The real guard is .ci/run, which runs .ci/core_only.py in a venv holding the core only;
here the same checks run with everything installed, the extras' packages hidden where a test needs them gone."""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import sys

import pytest
from conftest import ROOT, small_sources

from sptok.errors import SptokError
from sptok.extras import EXTRAS, MissingExtra, available, require


def _core_only():
    spec = importlib.util.spec_from_file_location("core_only", ROOT / ".ci" / "core_only.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_extra_is_a_one_line_user_error_and_an_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "streaming", None)   # `import streaming` now raises ImportError
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert not available("train") and available("plot")
    with pytest.raises(MissingExtra) as e:
        require("train", "sptok pretrain")
    assert isinstance(e.value, SptokError) and isinstance(e.value, ImportError)
    assert e.value.message == ("sptok pretrain needs mosaicml-streaming and datasets, which are not installed: "
                               "pip install 'sptok[train]'")
    assert pickle.loads(pickle.dumps(e.value)).message == e.value.message
    require("plot", "--plot")   # installed: nothing happens


@pytest.mark.slow
def test_core_commands_import_no_training_stack(tmp_path):
    """build, verify, stats, show, rejects and report on the demo: no process imports torch, transformers,
    datasets or streaming (build workers included); the build runs on a fast encoder (all extras are here)."""
    assert _core_only().check_core_commands(str(tmp_path), ("gigatoken", "riptoken", "tiktoken")) == []


@pytest.mark.slow
def test_extra_only_commands_fail_with_one_line_naming_the_extra(manifest, build, small_corpus, tmp_path):
    out, _ = build(manifest(small_sources(tmp_path)))
    assert _core_only().check_extra_messages(str(tmp_path), out, hide=True) == []


def test_pyproject_extras_hold_what_extras_py_says():
    """sptok/extras.py names the extra to install for each package; pyproject.toml must agree, and the core's
    dependencies must name no package of an extra."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in reqs}

    optional = {k: names(v) for k, v in project["optional-dependencies"].items()}
    for extra, packages in EXTRAS.items():
        assert set(packages.values()) <= optional[extra], extra
    core = names(project["dependencies"])
    in_extras = {n for k, v in optional.items() for n in v if n != "sptok"}
    assert not core & in_extras and "tiktoken" in core
    assert not core & {"torch", "torchvision", "mosaicml-streaming", "transformers", "datasets", "matplotlib"}
    assert "sptok[all]" in project["optional-dependencies"]["test"]


def test_readme_commands_are_what_ci_runs():
    """.ci/run runs the README's two set-up commands as written."""
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"^# 1\..*\n(.+)$", readme, re.M).group(1)
    second = re.search(r"^# 2\..*\n(.+)$", readme, re.M).group(1)
    assert "pip install -q -e . " in first and "sptok build pipelines/demo.yaml" in first
    assert "'.[test]'" in second and "pytest" in second
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command 1" in ci and "readme_command 2" in ci and "core_only.py" in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_readme_names_every_package_of_the_core_and_of_each_extra():
    """The README's core sentence and extras table name what pyproject.toml installs: each extra has a row whose
    'adds' cell names each of its packages (an extra it includes as `name`, or as 'every extra above')."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"^\| extra \| adds \| for \|\n(?:\|.*\n)+", readme, re.M).group(0)
    rows = dict(re.findall(r"^\| `([\w-]+)` \| ([^|]*) \|", table, re.M))
    order = list(rows)

    def name(req):
        return re.match(r"[A-Za-z0-9._-]+", req).group(0).lower()

    for extra, reqs in project["optional-dependencies"].items():
        assert extra in rows, f"the README's extras table has no row for {extra!r}"
        adds = rows[extra].lower()
        for req in reqs:
            included = re.match(r"sptok\[(.+)\]", req)
            if included:
                for inner in included.group(1).split(","):
                    assert f"`{inner}`" in adds or ("every extra above" in adds and
                                                    order.index(inner) < order.index(extra)), (extra, inner)
            else:
                assert name(req) in adds, f"the README's row for {extra!r} does not name {name(req)}"
    core = re.search(r"The core \(`pip install sptok`: ([^)]*)\)", readme).group(1).lower()
    assert [name(r) for r in project["dependencies"] if name(r) not in core] == []

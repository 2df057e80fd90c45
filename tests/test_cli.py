"""The command line: every subcommand has --help, and `sptok --help` imports none of the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from conftest import ROOT

from sptok.cli import main


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path", list(_commands(main)))
def test_help_of_every_command(path):
    res = CliRunner().invoke(main, list(path) + ["--help"])
    assert res.exit_code == 0 and "Usage:" in res.output


def test_help_imports_nothing_heavy():
    code = ("import sys; from sptok.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'streaming', 'datasets', 'transformers', 'ray', 'numpy') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def _sptok_imports() -> dict[str, set[str]]:
    """Module -> the sptok modules it imports, at module level or inside a function."""
    import ast

    root = ROOT / "sptok"
    mods = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}
    graph = {}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("sptok")):
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - n.level + 1] + [n.module or ""]).strip(".") \
                    if n.level else n.module
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in n.names}
            elif isinstance(n, ast.Import):
                deps |= {a.name for a in n.names if a.name in mods}
        graph[mod] = (deps & set(mods)) - {mod}
    return graph


def test_no_import_circle():
    """No sptok module imports, even inside a function, one that leads back to it (issue 24: encoders ->
    tokenizer -> options -> encoders made `--help` load numpy)."""
    graph, state, path, circles = _sptok_imports(), {}, [], []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                circles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d)
        path.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "sptok.build.options" in graph["sptok.cli"] and "sptok.build.tokenizer" in graph["sptok.build.encoders"]
    assert circles == []


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "sptok", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("sptok, version")


# ------------------------------------------------------------------------------- one definition of each enum

def _choices(group: click.Group, prefix=()):
    """(command path, parameter name) -> choices, for every click.Choice of every command."""
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _choices(cmd, prefix + (name,))
            continue
        for p in cmd.params:
            if isinstance(p.type, click.Choice):
                yield (" ".join(prefix + (name,)), p.name), tuple(p.type.choices)


def test_cli_choices_are_the_code_s():
    import sptok.label as label
    from sptok import sp
    from sptok.build import options, tokenizer

    assert tuple(sp.POLICIES) == options.POLICIES          # every policy named is implemented, and only those
    want = {("build", "policy"): options.POLICIES, ("build", "position"): options.POSITIONS,
            ("build", "tail"): options.TAILS, ("build", "fmt"): options.FORMATS, ("build", "encoder"): options.ENCODERS,
            ("build", "executor"): options.EXECUTORS,
            ("tokenizer train", "model"): tokenizer.MODELS, ("tokenizer train", "policy"): options.POLICIES,
            ("tokenizer extend", "policy"): options.POLICIES,
            # written out in cli.py (sptok.label needs the train extra, `sptok label --help` must not): held here
            ("label", "mode"): label.MODES, ("label", "device"): label.DEVICES,
            ("label", "precision"): label.PRECISIONS, ("label", "input_format"): label.FORMATS}
    got = dict(_choices(main))
    got.pop(("mix", "prior"))   # sptok/mix keeps its own list (mix/__init__.py), outside this check for now
    assert got == {k: tuple(v) for k, v in want.items()}


def _enums(doc, path=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from [(path, tuple(v))] if k == "enum" else _enums(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _enums(v, path + (i,))


def test_schema_enums_are_the_code_s():
    """Every enum of schemas/ equals the tuple the code checks against, so neither can change alone."""
    import json

    from sptok.build import manifest, options, readers, writers
    from sptok.build.manifest import schema_path

    build = {"policy": options.POLICIES, "position": options.POSITIONS, "tail": options.TAILS,
             "format": options.FORMATS}
    want = {("files", ("properties", "format")): tuple(f for f in options.FORMATS if f != "mds"),
            ("manifest", ("$defs", "source", "properties", "format")): manifest.format_names(),
            ("sptok", ("properties", "format")): options.FORMATS,
            ("sptok", ("properties", "manifest", "properties", "sources", "items", "properties", "format")):
                manifest.FORMATS,
            ("sptok", ("properties", "input_ids_dtype")): writers.ID_DTYPES,
            ("stats", ("$defs", "counts", "properties", "rejected", "propertyNames")): readers.REASONS}
    want.update({("manifest", ("$defs", "metadata", "properties", "form")): options.METADATA_FORMS,
                 ("sptok", ("properties", "options", "properties", "metadata", "additionalProperties", "oneOf", 1,
                            "properties", "form")): options.METADATA_FORMS,
                 ("stats", ("properties", "sources", "additionalProperties", "properties", "metadata", "properties",
                            "form")): options.METADATA_FORMS})
    want.update({("manifest", ("$defs", "build", "properties", k)): v for k, v in build.items()})
    want.update({("sptok", ("properties", "options", "properties", k)): v for k, v in build.items()})
    got = {(name, path): values for name in ("files", "manifest", "sptok", "stats")
           for path, values in _enums(json.loads(schema_path(f"{name}.schema.json").read_text()))}
    assert got == {k: tuple(v) for k, v in want.items()}


def test_data_file_names_are_what_the_schema_allows():
    import json
    import re

    from sptok import layout
    from sptok.build.manifest import schema_path

    files = json.loads(schema_path("files.schema.json").read_text())
    pattern = files["properties"]["files"]["items"]["properties"]["basename"]["pattern"]
    for fmt in files["properties"]["format"]["enum"]:
        assert re.match(pattern, layout.data_file(7, fmt)) and layout.data_file_pattern(fmt).match(layout.data_file(7, fmt))
    assert layout.data_file_pattern("mds").match(layout.data_file(7, "mds"))
    assert layout.data_file_pattern("mds").match(layout.mds_shard(7))

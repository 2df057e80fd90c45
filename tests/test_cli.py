"""The command line: every subcommand has --help, and `sptok --help` imports none of the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

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
            "heavy = [m for m in ('torch', 'streaming', 'datasets', 'transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "sptok", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("sptok, version")

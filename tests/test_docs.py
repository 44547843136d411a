"""The docs a newcomer walks say what the code does: every command is documented, the README stays short."""

from __future__ import annotations

import argparse

import pytest

from gateway import cli
from tests.helpers import ROOT


def test_every_command_is_documented():
    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [name for name in commands if f"`edge-gateway {name}" not in doc]
    assert not missing, f"docs/operations.md does not document: {', '.join(missing)}"


def test_a_usage_error_in_one_command_still_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["check-config", "-c", "x.yaml"])  # only the daemon's module is loaded for it
    assert exit.value.code == 64
    usage = capsys.readouterr().err.splitlines()[0]
    assert usage == f"usage: edge-gateway [-h] [--version] {{{','.join(cli.COMMANDS)}}} ...", usage


def test_the_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f"docs/{p}" not in readme] == []

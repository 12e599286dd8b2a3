"""Every command of the ``workbench`` app is exercised through its CLI entry in at least one test.

The command tree is read from the Typer app itself (so a new command or sub-command is in it the
moment it is registered), and the tests are read from ``tests/*.py``: a command counts as tested
when some test calls the in-process runner of :mod:`cli_support`, ``workbench(capsys, monkeypatch,
"probe", "fit", ...)``, with that command path and without ``--help``.
A command nobody runs that way fails here, with its name. (``workbench select`` crashed on every
input for weeks because its only tests called its functions, never the command.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import typer

TESTS = Path(__file__).parent


def command_paths() -> set[tuple[str, ...]]:
    """Every leaf command of the ``workbench`` app as its words, e.g. ``("probe", "fit")``."""
    from workbench import cli

    cli._mount_subcommands()
    paths: set[tuple[str, ...]] = set()

    def walk(command, prefix: tuple[str, ...]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, (*prefix, name))
        else:
            paths.add(prefix)

    walk(typer.main.get_command(cli.app), ())
    return paths


def cli_calls(source: str) -> list[tuple[str, ...]]:
    """The leading string arguments of every ``workbench(capsys, monkeypatch, ...)`` call in
    ``source`` (a test module's text), one tuple per call; arguments that are not string literals end
    a tuple."""
    calls = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "workbench"):
            continue
        args = node.args[2:]  # after capsys, monkeypatch
        words = []
        for arg in args:
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                break
            words.append(arg.value)
        calls.append((tuple(words), len(args)))
    return [words + (("<more>",) if n > len(words) else ()) for words, n in calls]


def commands_run_by(paths: set[tuple[str, ...]], calls: list[tuple[str, ...]]) -> set[tuple[str, ...]]:
    """The command paths that some call runs for real (not for its ``--help``)."""
    tested = set()
    for call in calls:
        for path in paths:
            rest = call[len(path):]
            if call[: len(path)] == path and "--help" not in rest:
                tested.add(path)
    return tested


def test_every_command_runs_through_its_cli_entry_in_some_test():
    paths = command_paths()
    calls = [c for f in sorted(TESTS.glob("test_*.py")) for c in cli_calls(f.read_text(encoding="utf-8"))]
    missing = sorted(" ".join(p) for p in paths - commands_run_by(paths, calls))
    assert not missing, (f"commands no test runs through tests/cli_support.workbench (not just its --help): {missing}; "
                         "add a real minimal invocation of each")


def test_the_audit_sees_what_it_should():
    """The audit itself: it finds the known tree, and it would catch a command with only a --help test."""
    paths = command_paths()
    assert {("run",), ("select",), ("probe", "fit"), ("organism", "sample"), ("protocol", "show"), ("tui",)} <= paths
    source = ('def test_x(capsys, monkeypatch):\n    workbench(capsys, monkeypatch, "select", "--help")\n'
              '    workbench(capsys, monkeypatch, "probe", "fit", str(path))\n    workbench(capsys, monkeypatch, "protocol")\n'
              '    workbench(capsys, monkeypatch, "protocol", "list")\n')
    calls = cli_calls(source)
    assert calls == [("select", "--help"), ("probe", "fit", "<more>"), ("protocol",), ("protocol", "list")]
    assert commands_run_by(paths, calls) == {("probe", "fit"), ("protocol", "list")}

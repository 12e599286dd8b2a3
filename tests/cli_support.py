"""The real `workbench` command run in-process, and the check that an error is one clean line:
shared by the tests that drive the command line."""

from __future__ import annotations

import sys

PROGRESS_LINES = ("starting at", "batch done")  # what a run prints on stderr before it fails


def workbench(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """Run ``workbench ARGS`` through :func:`workbench.cli.main` in this process; returns
    (exit status, stdout, stderr)."""
    from workbench import cli

    monkeypatch.setattr(sys, "argv", ["workbench", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str, *needles: str) -> str:
    """Assert ``err`` (progress lines aside) is one line starting ``error: `` with no traceback and
    holding every needle; returns that line."""
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith(PROGRESS_LINES)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]

"""The real `workbench` command run in-process, and the check that an error is one clean line:
shared by the tests that drive the command line."""

from __future__ import annotations

import signal
import subprocess
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


def kill_at_line(cmd: list[str], prefix: str, **popen) -> subprocess.Popen:
    """Run ``cmd`` and SIGKILL it at the first line of its stderr that starts with ``prefix`` (a
    progress line: the moment to kill is read from the program, never timed); the ended process.
    Fails the test when the program ends without printing such a line."""
    import pytest

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, **popen)
    try:
        for line in proc.stderr:
            if line.startswith(prefix):
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail(f"{' '.join(map(str, cmd[:4]))} … ended (exit {proc.wait()}) before a line starting {prefix!r}")
    finally:
        proc.kill()
        proc.wait()
    return proc


def stop_at_line(cmd: list[str], prefix: str, **popen) -> subprocess.Popen:
    """Run ``cmd`` and SIGSTOP it at the first line of its stderr that starts with ``prefix``; the
    stopped (still living) process, for the caller to SIGKILL and wait for. A stopped process holds
    its place: what it has written stays as it was at that line, however loaded the machine is.
    Fails the test (killing the program) when it ends without printing such a line."""
    import pytest

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, **popen)
    for line in proc.stderr:
        if line.startswith(prefix):
            proc.send_signal(signal.SIGSTOP)
            return proc
    proc.kill()
    pytest.fail(f"{' '.join(map(str, cmd[:4]))} … ended (exit {proc.wait()}) before a line starting {prefix!r}")


def interrupt_at_batch(monkeypatch, n: int = 2):
    """Make the engine's ``run_batch`` raise ``KeyboardInterrupt`` (a Ctrl-C) at its ``n``-th call;
    returns the real ``run_batch`` (to put back with ``monkeypatch.setattr``)."""
    from workbench.engine import batch as engine

    real, calls = engine.run_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run_batch", interrupted)
    return real

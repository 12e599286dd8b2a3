"""The one progress display of the long commands (`workbench.terminal.ProgressBar`): a rich bar on a
terminal, plain lines in a log — and the commands that use it print those lines through their CLI."""

from __future__ import annotations

import io
import re

from rich.console import Console

from cli_support import workbench
from workbench.terminal import ProgressBar


def log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False), out


def test_in_a_log_it_writes_plain_lines_first_last_and_at_most_one_per_interval():
    console, out = log_console()
    with ProgressBar("exported", "tokens", console=console, interval=3600) as bar:
        bar.update(0, 100)
        for _ in range(9):
            bar.advance(10)  # within the interval: no line
        bar.advance(10)  # the last: a line
    lines = out.getvalue().splitlines()
    assert lines == bar.lines and len(lines) == 2
    assert lines[0].startswith("exported: 0/100 tokens (") and "ETA" not in lines[0]
    assert re.fullmatch(r"exported: 100/100 tokens \(\d+ tokens/s\)", lines[1]), lines[1]
    assert "\x1b" not in out.getvalue()  # no terminal codes in a log


def test_every_update_is_a_line_with_interval_zero_and_lines_carry_an_eta():
    console, out = log_console()
    bar = ProgressBar("items", "items", console=console, interval=0, prefix="rank 1/2: ")
    bar.update(0, 30)
    bar.update(10, 30)
    bar.update(20, 30, line="custom line")
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("rank 1/2: items: 0/30 items")
    assert lines[1].startswith("rank 1/2: items: 10/30 items") and "ETA" in lines[1]
    assert lines[2] == "custom line"


def test_on_a_terminal_it_draws_a_bar_and_no_plain_lines():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    with ProgressBar("activations", "texts", console=console) as bar:
        bar.update(0, 4)
        bar.advance(4)
        assert bar.bar is not None and bar.bar.tasks[0].completed == 4 and bar.bar.tasks[0].total == 4
    assert bar.lines == [] and bar.bar is None
    hidden = ProgressBar("x", console=Console(file=io.StringIO(), force_terminal=True), show=False)  # another rank
    hidden.update(1, 2)
    assert hidden.bar is None and hidden.lines == []


def test_probe_fit_prints_progress_lines_in_a_log(tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.h5"
    code, _, err = workbench(capsys, monkeypatch, "probe", "fit", "--n", "40", "--batch-size", "16", "--device", "cpu",
                             "--layers", "1", "--out", str(out))
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("activations:")]
    assert lines[0].startswith("activations: 0/") and re.match(r"activations: (\d+)/\1 texts", lines[-1]), err

"""What the command line shows while something slow happens: a spinner while it has no count
(loading a model), and :class:`ProgressBar`, the one progress display of every long command."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text


class Spinner:
    """A rich status spinner on stderr, told each step (``spinner("loading …")``); nothing when
    stderr is not a terminal, so an error stays the only line in a log, or when ``show`` is False
    (a rank of a launcher other than rank 0). ``stop()`` ends it."""

    def __init__(self, console: Console | None = None, show: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.show = show
        self.status: Any = None

    def __call__(self, message: str) -> None:
        if not self.show or not self.console.is_terminal:
            return
        if self.status is None:
            self.status = self.console.status(Text(f"{message} …"))
            self.status.start()
        else:
            self.status.update(Text(f"{message} …"))

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def load_model_showing_steps(*args: Any, adapter: Any = None, **kwargs: Any) -> Any:
    """:func:`workbench.engine.models.load_model` with a spinner on stderr naming each step; same arguments,
    plus ``adapter`` (a LoRA adapter folder merged after loading, :func:`workbench.engine.adapter.apply_adapter`);
    returns the :class:`~workbench.engine.models.LoadedModel`."""
    from workbench.engine.adapter import apply_adapter, check_adapter
    from workbench.engine.models import load_model

    if adapter is not None:
        check_adapter(adapter)  # a missing or foreign folder fails before the model loads
    spinner = Spinner()
    try:
        model = load_model(*args, on_status=spinner, **kwargs)
        if adapter is not None:
            spinner(f"merging the adapter {adapter} into the weights")
        return apply_adapter(model, adapter)
    finally:
        spinner.stop()


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """The progress display of every long command (run, export, probe fit, organism check).

    On a terminal (``console.is_terminal``): a rich bar on stderr — ``label``, the bar, done/total,
    the rate (or the caller's ``speed`` text) and the time remaining. Elsewhere (a log, a pipe, CI):
    plain lines, ``{prefix}{label}: done/total unit (rate unit/s, ETA h:mm:ss)`` or the caller's
    ``line``, for the first update, the last (done = total), and at most one every ``interval``
    seconds between, so a log stays readable. ``show=False`` (a launcher's rank other than 0 on a
    shared terminal) draws no bar but still writes the plain lines in a log.

    ``update(done, total)`` sets the count (absolute), ``advance(k)`` adds to it; the rate and the
    ETA count from the first update (what was already done, e.g. by a resumed job, is not speed).
    Use as a context manager; ``close()`` removes the bar."""

    def __init__(self, label: str, unit: str = "", console: Console | None = None, show: bool = True,
                 interval: float = 10.0, prefix: str = "") -> None:
        self.label, self.unit, self.prefix = label, unit, prefix
        self.console = console or Console(stderr=True)
        self.show, self.interval = show, interval
        self.bar: Any = None
        self.task: Any = None
        self.done, self.total = 0, 0
        self.first: int | None = None
        self.t0 = 0.0
        self.printed_at: float | None = None
        self.lines: list[str] = []  # the plain lines written (what a log shows)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def rate(self) -> float:
        """Units per second since the first update."""
        import time

        return (self.done - (self.first or 0)) / max(1e-9, time.perf_counter() - self.t0)

    def eta(self) -> str:
        rate = self.rate()
        return _clock((self.total - self.done) / rate) if rate > 0 and self.total >= self.done else "?"

    def advance(self, k: int = 1) -> None:
        self.update(self.done + k)

    def update(self, done: int, total: int | None = None, speed: str | None = None, line: str | None = None) -> None:
        """The count is now ``done`` of ``total`` (None: unchanged). ``speed``: the bar's rate text
        (default: units a second); ``line``: the plain line for a log (default: the one above)."""
        import time

        now = time.perf_counter()
        if self.first is None:
            self.first, self.t0 = done, now
        self.done, self.total = done, self.total if total is None else total
        speed = speed if speed is not None else f"{self.rate():.0f} {self.unit}/s".strip()
        if self.console.is_terminal:
            if not self.show:
                return
            if self.bar is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.bar = Progress(TextColumn(f"[bold]{self.prefix}{self.label}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[speed]}"), TimeRemainingColumn(), console=self.console,
                                    speed_estimate_period=600)  # a step of a large model can take longer than rich's 30 s
                self.bar.start()
                self.task = self.bar.add_task(self.label, total=self.total, completed=done, speed="")
            else:
                self.bar.update(self.task, total=self.total, completed=done, speed=speed)
            return
        last = self.total > 0 and done >= self.total
        if self.printed_at is not None and not last and now - self.printed_at < self.interval:
            return
        self.printed_at = now
        if line is None:
            eta = "" if self.printed_at == self.t0 or last else f", ETA {self.eta()}"
            line = f"{self.prefix}{self.label}: {done}/{self.total} {self.unit} ({speed}{eta})".replace("  ", " ")
        self.lines.append(line)
        print(line, file=self.console.file, flush=True)

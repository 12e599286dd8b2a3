"""What the command line shows while something slow happens that has no progress count."""

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

"""The one way the TUI runs blocking work (file reads, model calls) and the one place its errors go.

:func:`run_blocking` runs a function in a thread worker. What it returns (a Message) is posted to
the node that asked, unless the worker was cancelled by a newer one of its group; an exception
becomes a :class:`tui.messages.WorkFailed` posted to that node, which bubbles up to the app, which
shows it (``WorkbenchApp.on_work_failed``): the app never crashes on a failed read or model call.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

from textual.dom import DOMNode
from textual.message import Message
from textual.worker import Worker, get_current_worker

from tui.messages import WorkFailed
from workbench.errors import WorkbenchError


def one_line(error: BaseException) -> str:
    """A WorkbenchError's own line; any other error as ``Type: message`` (first line only)."""
    if isinstance(error, WorkbenchError):
        return str(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def run_blocking(node: DOMNode, fn: Callable[..., Message | None], *args: Any, what: str, group: str,
                 exclusive: bool = True) -> Worker:
    """Run ``fn(*args)`` in a thread worker of ``node`` (``exclusive``: cancelling the previous
    worker of ``group``). ``what`` says what it does, for the error line ("reading sample 3")."""

    def work() -> None:
        try:
            message = fn(*args)
        except Exception as error:  # every failure of blocking work ends here
            node.log.error(f"{what} failed:\n{traceback.format_exc()}")
            node.post_message(WorkFailed(what, one_line(error)))  # bubbles up to the app, which shows it
            return
        if message is not None and not get_current_worker().is_cancelled:
            node.post_message(message)

    return node.run_worker(work, name=what, group=group, thread=True, exclusive=exclusive, exit_on_error=False)

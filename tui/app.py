"""The workbench's Textual app: browse a run file, or step rounds live with a loaded model.

``WorkbenchApp(run_path=...)`` opens browse mode on the sample screen (first sample, round 1);
``WorkbenchApp(live=LiveConfig(...))`` opens live mode. Failures of blocking work arrive here as
:class:`tui.messages.WorkFailed` and are shown as notifications (and kept in ``failures``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterable

from textual.app import App, SystemCommand
from textual.screen import Screen

from tui.keymap import APP_BINDINGS
from tui.messages import WorkFailed


class WorkbenchApp(App):
    """The TUI. ``keymap``: binding id → keys (from :func:`tui.keymap.load_keymap`)."""

    CSS_PATH = "styles.tcss"
    BINDINGS = APP_BINDINGS
    TITLE = "workbench"
    ENABLE_COMMAND_PALETTE = True
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]  # styles.tcss lays the sample view out tighter below 120 columns

    def __init__(self, run_path: str | Path | None = None, live: Any = None, keymap: dict[str, str] | None = None) -> None:
        super().__init__()
        if (run_path is None) == (live is None):
            raise ValueError("give a run file to browse or a live configuration, not both")
        self.run_path = Path(run_path) if run_path is not None else None
        self.live = live
        self.user_keymap = dict(keymap or {})
        self.failures: list[WorkFailed] = []

    def on_mount(self) -> None:
        self.set_keymap(self.user_keymap)
        if self.live is not None:
            from tui.screens.live import LiveScreen

            self.push_screen(LiveScreen(self.live))
        else:
            from tui.screens.browse import SampleScreen

            self.sub_title = str(self.run_path)
            self.push_screen(SampleScreen(self.run_path))

    def on_work_failed(self, message: WorkFailed) -> None:
        self.failures.append(message)
        self.notify(f"{message.what}: {message.error}", severity="error", timeout=10, markup=False)

    # ------------------------------------------------------------------ help and the command palette
    def binding_rows(self, screen: Screen) -> list[tuple[str, str, str, str]]:
        """(keys, description, binding id, action) of every binding with an id active on ``screen``,
        keys as remapped by the keymap, in the order the screen declares them."""
        by_id: dict[str, list[Any]] = {}
        order: list[str] = []
        for key, active in screen.active_bindings.items():
            binding = active.binding
            if binding.id is None:
                continue
            if binding.id not in by_id:
                by_id[binding.id] = [[], binding.description, binding.action, active.node]
                order.append(binding.id)
            by_id[binding.id][0].append(self.get_key_display(binding.with_key(key)))
        declared = [b.id for node in (screen, self) for b in getattr(node, "BINDINGS", []) if getattr(b, "id", None)]
        order.sort(key=lambda i: declared.index(i) if i in declared else len(declared))
        return [(" ".join(by_id[i][0]), by_id[i][1], i, by_id[i][2]) for i in order]

    def action_help(self) -> None:
        from tui.screens.dialogs import HelpScreen

        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen([(keys, description, binding_id) for keys, description, binding_id, _ in self.binding_rows(self.screen)]))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Every key binding of the screen as a command (``next round  n ]``), then Textual's own."""
        for keys, description, binding_id, action in self.binding_rows(screen):
            if binding_id in ("quit", "help"):
                continue
            yield SystemCommand(f"{description}  [{keys}]", f"binding {binding_id}", partial(screen.run_action, action))
        yield from super().get_system_commands(screen)

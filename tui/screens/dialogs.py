"""Modal dialogs: help (every binding with its id), choose a probe, filter the samples, type an
instruction (live mode)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from tui.filters import KINDS, SampleFilter
from tui.keymap import default_keymap_path
from tui.literal import literal
from tui.runsource import ProbeInfo

CLOSE = [Binding("escape", "dismiss_none", "close", show=False)]


class Dialog(ModalScreen):
    """A modal that escape closes, returning None."""

    BINDINGS = CLOSE

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class HelpScreen(Dialog):
    """The bindings of the screen beneath: keys, what they do, and the id to remap them with."""

    BINDINGS = CLOSE + [Binding("question_mark,q", "dismiss_none", "close", show=False)]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows  # (keys, description, binding id)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="help"):
            yield Label("Keys (escape or ? closes; ctrl+p: the command palette)", classes="dialog-title")
            yield Static(f'remap by id in {default_keymap_path()} (or --keys FILE): [keys] "round.next" = "n,space"',
                         markup=False, classes="dialog-note")
            yield DataTable(id="help-table", cursor_type="row", show_cursor=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("keys", "does", "id")
        for keys, description, binding_id in self.rows:
            table.add_row(keys, description, binding_id)


class ProbeScreen(Dialog):
    """Pick one of the run's tracked probes; returns its name."""

    def __init__(self, probes: tuple[ProbeInfo, ...], current: str | None) -> None:
        super().__init__()
        self.probes = probes
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Probe (enter picks, escape cancels)", classes="dialog-title")
            options = []
            for p in self.probes:
                label = Text.assemble(literal(p.name), f"  {p.kind} {p.method} {p.hook}  layers {len(p.layers)}"
                                      + (f", best L{p.best_layer}" if p.best_layer is not None else ""))
                options.append(Option(label, id=p.name))
            yield OptionList(*options, id="probe-list")

    def on_mount(self) -> None:
        names = [p.name for p in self.probes]
        option_list = self.query_one(OptionList)
        option_list.highlighted = names.index(self.current) if self.current in names else 0

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class FilterScreen(Dialog):
    """Pick a filter kind (and a category, or type a text); returns a SampleFilter."""

    def __init__(self, categories: tuple[str, ...], multiple_choice: bool, current: SampleFilter) -> None:
        super().__init__()
        self.categories = categories
        self.multiple_choice = multiple_choice
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Filter samples (now: {self.current.label()}); enter picks, escape cancels", classes="dialog-title",
                        markup=False)
            kinds = ["all", "right_to_wrong", "wrong_to_right", "never_right"] if self.multiple_choice else ["all"]
            options = [Option(KINDS[k], id=f"kind:{k}") for k in kinds]
            options += [Option(Text.assemble("category: ", literal(c)), id=f"category:{c}") for c in self.categories]
            yield OptionList(*options, id="filter-list")
            yield Input(placeholder="or type text + enter: search ids, questions, responses",
                        id="filter-text", value=self.current.value if self.current.kind == "text" else "")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        kind, _, value = str(event.option.id).partition(":")
        self.dismiss(SampleFilter("category", value) if kind == "category" else SampleFilter(value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        self.dismiss(SampleFilter("text", text) if text else SampleFilter())


class InstructionScreen(Dialog):
    """Type a line (live mode: the next round's instruction, or a new item); returns the text, None
    when cancelled (escape, or an empty line unless ``allow_empty``: then "")."""

    def __init__(self, title: str, placeholder: str = "", allow_empty: bool = False) -> None:
        super().__init__()
        self.title_text = title
        self.placeholder = placeholder
        self.allow_empty = allow_empty

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title", markup=False)
            yield Input(placeholder=self.placeholder, id="instruction")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value if event.value.strip() else "" if self.allow_empty else None)

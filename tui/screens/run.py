"""The run screen: per-round curves (accuracy, mean token entropy, mean option entropy, concept
score) with each curve's convergence round marked, and the per-round table with flips and both
ECEs — all from :func:`workbench.analysis.summary.summary`, computed in a thread worker."""

from __future__ import annotations

import math
from typing import Any

from textual.app import ComposeResult
from textual.containers import Grid
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from workbench.printable import visible
from tui.keymap import RUN_BINDINGS
from tui.messages import RoundTableLoaded, WorkFailed
from tui.widgets.curve import Curve, CurveData
from tui.widgets.status import StatusLine
from tui.work import run_blocking

# (summary key, column label, curve title) of the run screen's metrics, in table order
COLUMNS = [
    ("round", "round", None),
    ("accuracy", "acc", "accuracy"),
    ("mean_token_entropy", "tok H", "mean token entropy (nats)"),
    ("mean_option_entropy", "opt H", "mean option entropy (nats)"),
    ("mean_chosen_confidence", "conf", None),
    ("ece", "ECE", None),
    ("ece_range", "ECE min–max", None),
    ("right_to_wrong", "R→W", None),
    ("wrong_to_right", "W→R", None),
]


def read_summary(path: Any) -> RoundTableLoaded:
    """Blocking: ``workbench.analysis.summary.summary`` of the run file at ``path``."""
    from workbench.analysis.summary import summary
    from workbench.store.reader import RunFile

    with RunFile(path) as run:
        return RoundTableLoaded(summary(run))


def concept_key(summary: dict[str, Any], probe_name: str | None) -> str | None:
    """The summary's per-round key for probe ``probe_name`` (``concept:NAME``, or the stereotype
    variant's ``stereotype_cos_L…``), None when the run has none."""
    keys = list(summary["rounds"][0]) if summary["rounds"] else []
    if probe_name is not None and f"concept:{probe_name}" in keys:
        return f"concept:{probe_name}"
    stereo = [k for k in keys if k.startswith("stereotype_cos_")]
    return stereo[0] if probe_name == "stereotype" and stereo else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


class RunScreen(Screen):
    """Shares the round and probe with the sample screen it was opened from (``browse``)."""

    BINDINGS = RUN_BINDINGS

    def __init__(self, browse: Any) -> None:
        super().__init__()
        self.browse = browse
        self.summary: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield StatusLine(id="status")
        with Grid(id="curves"):
            for name in ("accuracy", "token-entropy", "option-entropy", "concept"):
                yield Curve(id=f"curve-{name}")
        yield DataTable(id="table", cursor_type="row", zebra_stripes=True)
        yield Static("computing the per-round table …", id="notes", markup=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.browse_status()
        run_blocking(self, read_summary, self.browse.path, what="computing the per-round table", group="summary")

    def browse_status(self) -> None:
        o = self.browse.overview
        parts = [("", f"{o.model} · {o.protocol}"), ("", o.status), ("round", f"{self.browse.round + 1}/{o.n_rounds}"),
                 ("samples", f"{o.n_done}/{o.n_samples}")]
        if self.browse.probe_name:
            parts.append(("probe", self.browse.probe_name))
        self.query_one(StatusLine).show(parts)

    def on_round_table_loaded(self, message: RoundTableLoaded) -> None:
        self.summary = message.summary
        self.show_table()
        self.show_curves()

    def on_work_failed(self, message: WorkFailed) -> None:
        self.query_one("#notes", Static).update(f"could not compute the table: {message.error}")

    def _columns(self) -> list[tuple[str, str]]:
        assert self.summary is not None
        keys = set(self.summary["rounds"][0]) if self.summary["rounds"] else set()
        columns = [(k, label) for k, label, _ in COLUMNS if k in keys]
        concept = concept_key(self.summary, self.browse.probe_name)
        if concept:
            columns.append((concept, "concept"))
        return columns

    def show_table(self) -> None:
        table = self.query_one(DataTable)
        table.clear(columns=True)
        rows = self.summary["rounds"] if self.summary else []
        columns = self._columns()
        for _, label in columns:
            table.add_column(label)
        for row in rows:
            table.add_row(*[_fmt(row.get(k, math.nan)) for k, _ in columns])
        if rows:
            table.move_cursor(row=min(self.browse.round, len(rows) - 1), animate=False)
        convergence = {label: self.summary["convergence"].get(k) for k, label in columns if k != "round"}
        flat = {label for k, label in columns if self.summary.get("convergence_detail", {}).get(k, {}).get("status") == "flat"}
        reached = ", ".join(f"{label} {'flat' if label in flat else f'r{t}'}" for label, t in convergence.items() if t is not None) or "none"
        settings = self.summary.get("convergence_settings", {})
        eps = (f"{settings['eps']:g}" if settings.get("eps") is not None
               else f"max({settings.get('rel_eps', 0.05):.0%} range, {settings.get('floor', 0.01):.0%} scale)")
        self.query_one("#notes", Static).update(
            f"{self.summary['n_done']} samples · ▲ converged (|Δ| < ε = {eps} to the end, ≥ {settings.get('k', 2)} steps): {reached}")

    def show_curves(self) -> None:
        if self.summary is None:
            return
        rows = self.summary["rounds"]
        t = self.browse.round
        concept = concept_key(self.summary, self.browse.probe_name)
        probe = self.browse.probe
        concept_title = "concept: no probe tracked"
        if concept is not None:
            concept_title = f"concept {self.browse.probe_name}" + (
                f" (proj., best L{probe.best_layer})" if concept.startswith("concept:") and probe else " (cosine)")
        for widget_id, key, title in (("accuracy", "accuracy", "accuracy"),
                                      ("token-entropy", "mean_token_entropy", "mean token entropy (nats)"),
                                      ("option-entropy", "mean_option_entropy", "mean option entropy (nats)"),
                                      ("concept", concept, concept_title)):
            values = tuple(float(r.get(key, math.nan)) for r in rows) if key else ()
            converged = self.summary["convergence"].get(key) if key else None
            curve = self.query_one(f"#curve-{widget_id}", Curve)
            curve.border_title = visible(title, newlines=False)  # a probe name from the file
            curve.show(CurveData("", values, t, converged))

    def _set_round(self, round_: int) -> None:
        o = self.browse.overview
        round_ = min(max(0, round_), o.n_rounds - 1)
        if round_ == self.browse.round:
            return
        self.browse.round = round_
        self.browse.show_sample()
        self.browse_status()
        self.show_curves()
        if self.summary and self.summary["rounds"]:
            self.query_one(DataTable).move_cursor(row=round_, animate=False)

    def action_next_round(self) -> None:
        self._set_round(self.browse.round + 1)

    def action_previous_round(self) -> None:
        self._set_round(self.browse.round - 1)

    def action_choose_probe(self) -> None:
        o = self.browse.overview
        if not o.probes:
            self.notify("no probe is tracked in this run (workbench probe track RUN PROBE)", severity="warning")
            return
        from tui.screens.dialogs import ProbeScreen

        def chosen(name: str | None) -> None:
            if name is not None:
                self.browse.select_probe(name)
                self.browse_status()
                if self.summary:
                    self.show_table()
                    self.show_curves()

        self.app.push_screen(ProbeScreen(o.probes, self.browse.probe_name), chosen)

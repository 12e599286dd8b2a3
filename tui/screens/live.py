"""Live mode: one conversation with a loaded model, a round at a time (``n`` the protocol's next
instruction, ``i`` one typed now, ``x`` the immoral one), through :class:`workbench.engine.session.Session`.

The model works in one thread worker at a time; the screen stays responsive and says what the
model is doing; a failure is shown in the app (``tui.work``) and the session stays as it was.
State (what tests look at): ``live`` (the model side), ``sample`` (every round so far), ``round``
(the one shown, 0-based), ``busy`` (what the model is doing, or None), ``steer_on``/``alpha``
(``a`` steers the next rounds along the loaded probe at the layer shown, ``+``/``-`` change α; the
status line shows what acted in the round shown and what the next round will get), ``worked`` (everything it
was asked to do, in order), ``streamed`` (the round being generated, as last shown: a
:class:`tui.messages.LiveTokens`, or None). While a round is generated its text grows on screen
(:class:`tui.live.TokenStream`, at most 20 redraws a second).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Static

from tui import live as model_side
from tui.keymap import LIVE_BINDINGS
from tui.messages import LiveBusy, LiveReady, LiveRoundDone, LiveSaved, LiveTokens, WorkFailed
from tui.screens.browse import LayerKeys, entropy_line, entropy_scale_max, sample_view, show_concept, show_entropy
from tui.widgets.conversation import Conversation
from tui.widgets.option_bars import OptionBars
from tui.widgets.status import StatusLine
from tui.work import run_blocking


def probe_label(live: model_side.LiveModel) -> str:
    """What the header says of the probe: its file, ``PATH (found)`` when it was found at the default
    place (:data:`tui.live.DEFAULT_PROBES`) rather than given with --probe, or how to give one."""
    if live.probe is None:
        return "none (--probe FILE)"
    return f"{Path(live.probe_path).name if live.probe_found else live.probe_path}{' (found)' if live.probe_found else ''}"


ALPHA_STEP = 1.0


class LiveScreen(LayerKeys, Screen):
    BINDINGS = LIVE_BINDINGS

    def __init__(self, config: model_side.LiveConfig) -> None:
        super().__init__()
        self.config = config
        self.live: model_side.LiveModel | None = None
        self.sample = None
        self.pieces: tuple = ()
        self.round = 0
        self.layer_index = 0
        self.coloured = True
        self.busy: str | None = None
        self.saved: list[str] = []
        self.worked: list[str] = []  # what the model was asked to do, in order
        self.streamed: LiveTokens | None = None
        self.steer_on = False  # `a`: steer the next rounds along the loaded probe at the layer shown
        self.alpha = 4.0  # `+`/`-` raise and lower it by ALPHA_STEP

    def compose(self) -> ComposeResult:
        yield StatusLine(id="status")
        with Horizontal(id="body"):
            yield sample_view()
        yield Static("", id="live-progress", markup=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(OptionBars).border_title = "p̂(option)"
        self.query_one(OptionBars).clear("loading …")
        self.query_one(Conversation).clear("loading the model …")
        self.work("loading " + self.config.model, lambda: self._load())

    # ------------------------------------------------------------------ the model, in a worker
    def work(self, what: str, fn: Callable[[], Any]) -> bool:
        """Run ``fn`` in the model's worker unless it is busy; False (and a note) when it is."""
        if self.busy is not None:
            self.notify(f"the model is busy ({self.busy}); wait for it", severity="warning")
            return False
        self.busy = what
        self.worked.append(what)
        self.show_status()
        run_blocking(self, fn, what=what, group="model")
        return True

    def _load(self) -> LiveReady:
        self.post_message(LiveBusy(f"loading {self.config.model} …"))
        live = model_side.load_live(self.config)
        model_side.start_item(live, 0)
        self.live = live
        return LiveReady()

    def _round(self, instruction: str | None, interventions: list[Any] | None = None) -> LiveRoundDone:
        live = self.live
        number, text = len(live.session.rounds) + 1, model_side.next_instruction(live, instruction)
        stream = model_side.TokenStream(live.decoder, lambda ids, pieces: self.post_message(LiveTokens(number, text, ids, pieces)))
        with warnings.catch_warnings(record=True) as caught:  # shown in the app, not printed over it
            warnings.simplefilter("always")
            model_side.step(live, instruction, on_tokens=stream, interventions=interventions)
        for warning in caught:
            self.app.call_from_thread(self.notify, str(warning.message), severity="warning", timeout=8, markup=False)
        return LiveRoundDone(*model_side.sample_rounds(self.live))

    def _new_item(self, index: int | None, typed: Any | None) -> LiveReady:
        model_side.start_item(self.live, index, typed)
        return LiveReady()

    def _save(self) -> LiveSaved:
        return LiveSaved(str(model_side.save(self.live)))

    # ------------------------------------------------------------------ results
    def on_live_busy(self, message: LiveBusy) -> None:
        if message.text:
            self.query_one("#live-progress", Static).update(message.text)

    def on_live_ready(self, message: LiveReady) -> None:
        self.busy = None
        self.sample, self.pieces, self.round = None, (), 0
        probe = self.live.probe_info
        if probe is not None:
            self.layer_index = probe.layers.index(probe.best_layer) if probe.best_layer in probe.layers else 0
        self.show_item()
        self.show_status()

    def show_item(self) -> None:
        """The new conversation's item, before its first round."""
        s = self.live.session.samples[0]
        text = " ".join(x for x in (s.context, s.question) if x)
        self.query_one(Conversation).clear(f"item {self.live.item_index + 1}: {text}\n\n"
                                           "n: round 1 with the protocol's instruction · i: type your own · o: another item")
        self.query_one(OptionBars).clear("no round yet (n)" if s.options else "no options (open-ended task)")
        show_concept(self, None, self.probe, "cosine", 0, self.layer_index)
        show_entropy(self, None, 0, self.coloured)

    def on_live_tokens(self, message: LiveTokens) -> None:
        if self.busy is None or self.live is None or self.live.session is None:
            return  # the round ended (or failed) before this arrived
        self.streamed = message
        sample = self.sample if self.sample is not None else model_side.sample_rounds(self.live)[0]  # no rounds yet
        self.query_one(Conversation).show_partial(sample, message.instruction, message.ids, message.pieces,
                                                  self.live.protocol.prefix(message.number))
        self.query_one("#live-progress", Static).update(f"working: {self.busy} … {len(message.ids)} tokens", layout=False)

    def on_live_round_done(self, message: LiveRoundDone) -> None:
        self.busy = None
        self.streamed = None
        self.sample, self.pieces = message.sample, message.pieces
        self.round = self.sample.n_rounds - 1
        self.show_round()

    def on_live_saved(self, message: LiveSaved) -> None:
        self.busy = None
        self.saved.append(message.path)
        self.notify(f"saved {message.path}: open it with  workbench tui {message.path}", timeout=10, markup=False)
        self.show_status()

    def on_work_failed(self, message: WorkFailed) -> None:
        self.busy = None  # the app shows the error; the session is as it was before the call
        self.streamed = None
        self.show_status()
        if self.sample is not None:
            self.show_round()  # not a half-streamed round
        elif self.live is not None and self.live.session is not None:
            self.show_item()
        elif self.live is None:  # the model did not load
            self.query_one(OptionBars).clear("no model")
            self.query_one(Conversation).clear(f"the model did not load: {message.error}")

    # ------------------------------------------------------------------ drawing
    def show_status(self) -> None:
        live = self.live
        # most telling first: the line is cut with an ellipsis where the terminal ends (80 columns
        # keep everything up to the steering; the probe's file is last, its name is on the concept panel)
        parts = [("live", f"{self.config.model} · {self.config.protocol}")]
        if self.sample is not None:
            parts.append(("round", f"{self.round + 1}/{self.sample.n_rounds}"))
        if live is not None and live.session is not None:
            parts.append(("item", f"{live.item_index + 1}"))
            if self.sample is not None:
                parts.append(("steered", model_side.applied(live, self.round) or "no"))
            if live.probe is not None:
                parts.append(("next", f"α={self.alpha:+g} @L{self.steer_layer()}" if self.steer_on else "unsteered"))
        if live is not None:
            parts.append(("probe", probe_label(live)))
        self.query_one(StatusLine).show(parts)
        progress = self.query_one("#live-progress", Static)
        progress.set_class(self.busy is not None, "busy")
        progress.update(f"working: {self.busy} …" if self.busy else
                        "ready · next round: n protocol's, i typed, x immoral · o item · s save" +
                        (" · a steer, +/- α" if self.live is not None and self.live.probe is not None else ""))

    def show_round(self) -> None:
        self.show_status()
        sample = self.sample
        if sample is None:
            return
        t = self.round
        self.query_one(Conversation).show(sample, self.pieces, t, self.coloured, entropy_scale_max(sample))
        self.query_one("#token-info", Static).update(entropy_line(sample, t), layout=False)
        self.query_one(OptionBars).show(sample.options, sample.option_probs[t], sample.gold, int(sample.answer[t]))
        show_concept(self, sample, self.probe, "cosine", t, self.layer_index)
        show_entropy(self, sample, t, self.coloured)

    # ------------------------------------------------------------------ keys
    def action_step(self) -> None:
        if self.live is not None:
            ivs = self.interventions()
            self.work(f"generating round {self._next_round()}", lambda: self._round(None, ivs))

    def steer_layer(self) -> int:
        """The probe layer shown (``h``/``l``), where steering acts."""
        info = self.live.probe_info
        return info.layers[min(self.layer_index, len(info.layers) - 1)]

    def interventions(self) -> list[Any]:
        """The next round's interventions: the probe's direction at the layer shown, ×α, when on."""
        if not self.steer_on or self.live is None or self.live.probe is None:
            return []
        return model_side.steering(self.live, self.steer_layer(), self.alpha)

    def action_toggle_steer(self) -> None:
        if self.live is None:
            return
        if self.live.probe is None:
            self.notify("steering needs a probe: start live mode with --probe FILE.h5", severity="warning", markup=False)
            return
        self.steer_on = not self.steer_on
        self.show_status()

    def action_alpha_up(self) -> None:
        self.alpha += ALPHA_STEP
        self.show_status()

    def action_alpha_down(self) -> None:
        self.alpha -= ALPHA_STEP
        self.show_status()

    def _next_round(self) -> int:
        return (self.sample.n_rounds if self.sample is not None else 0) + 1

    def action_instruct(self) -> None:
        if self.live is None or self.busy is not None:
            return
        from tui.screens.dialogs import InstructionScreen

        def given(text: str | None) -> None:
            if text:
                ivs = self.interventions()
                self.work(f"generating round {self._next_round()} (typed instruction)", lambda: self._round(text, ivs))

        self.app.push_screen(InstructionScreen(f"Instruction for round {self._next_round()} (enter runs it, escape cancels)"), given)

    def action_inject(self) -> None:
        if self.live is not None:
            text, ivs = model_side.immoral_instruction(self.live), self.interventions()
            self.work(f"generating round {self._next_round()} (immoral instruction)", lambda: self._round(text, ivs))

    def action_new_item(self) -> None:
        if self.live is None or self.busy is not None:
            return
        from tui.screens.dialogs import InstructionScreen

        def given(text: str | None) -> None:
            text = (text or "").strip()
            if "|" in text:
                self.work("starting a typed item", lambda: self._new_item(None, model_side.typed_sample(text)))
            elif text.isdigit():
                self.work(f"starting item {text}", lambda: self._new_item(int(text) - 1, None))
            else:
                self.work("starting the next item", lambda: self._new_item(None, None))

        self.app.push_screen(InstructionScreen(
            "New item: enter for the next one, a number for that one, or type  question | option | option",
            placeholder="next", allow_empty=True), lambda text: None if text is None else given(text))

    def action_save(self) -> None:
        if self.live is not None:
            self.work("saving the session", self._save)

    def action_next_round(self) -> None:
        if self.sample is not None and self.round < self.sample.n_rounds - 1:
            self.round += 1
            self.show_round()

    def action_previous_round(self) -> None:
        if self.sample is not None and self.round > 0:
            self.round -= 1
            self.show_round()

    @property
    def probe(self):
        return self.live.probe_info if self.live else None

    def redraw(self) -> None:
        self.show_round()

    def action_toggle_colours(self) -> None:
        self.coloured = not self.coloured
        if self.sample is not None:
            self.show_round()

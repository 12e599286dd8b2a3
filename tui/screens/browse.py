"""The sample screen of browse mode: one sample, one round at a time, everything the run recorded.

State (what tests look at): ``position`` (the sample, among finished samples), ``round`` (0-based),
``probe_name``, ``score`` (``cosine``/``projection``), ``layer_index`` (into the probe's layers),
``coloured`` (entropy colouring), ``filter``. Stepping rounds reads nothing (a sample's rounds are
read together); changing sample shows it from ``cache`` (decoded samples, the list's neighbours of
the one shown read ahead in a thread worker), else reads that one sample in a thread worker.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static

from workbench.printable import visible
from tui.filters import SampleFilter, select
from tui.keymap import SAMPLE_BINDINGS
from tui.messages import (RunLoaded, SampleHighlighted, SampleLoaded, SamplesReadAhead, TextFilterDone, TokenFocused,
                          WorkFailed)
from tui.runsource import SCORES, ProbeInfo, RunOverview, SampleRounds, read_overview, read_samples, search_text
from tui.tokens import decoder_for, token_pieces
from tui.widgets.conversation import Conversation
from tui.widgets.curve import Curve, CurveData
from tui.widgets.entropy_curve import EntropyCurve, colour_legend
from tui.widgets.heatmap import ConceptHeatmap, cell_width_for
from tui.widgets.option_bars import OptionBars
from tui.widgets.picture import Picture
from tui.widgets.sample_list import SampleList
from tui.widgets.status import StatusLine
from tui.widgets.tokens import TokenView
from tui.work import run_blocking

REFRESH_SECONDS = 2.0  # how often a running run is re-read for new batches
READ_AHEAD = (1, -1, 2)  # the samples read ahead after one is shown: these steps away in the list's order
CACHE_SIZE = 64  # decoded samples kept (the most recently shown or read ahead)


def load_overview(path: Path) -> RunLoaded:
    """Blocking: the run's overview (a thread worker calls this)."""
    return RunLoaded(read_overview(path))


def load_samples_with_pieces(path: Path, positions: list[int], overview: RunOverview) -> tuple[SampleLoaded, ...]:
    """Blocking: read samples (the file opened once) and decode their responses' tokens."""
    decoder = decoder_for(overview.meta)
    return tuple(SampleLoaded(sample, tuple(tuple(token_pieces(decoder, ids)) for ids in sample.token_ids))
                 for sample in read_samples(path, positions, overview.probes))


def load_sample_with_pieces(path: Path, position: int, overview: RunOverview) -> SampleLoaded:
    """Blocking: read one sample and decode its responses' tokens (a thread worker calls this)."""
    return load_samples_with_pieces(path, [position], overview)[0]


def read_ahead(path: Path, positions: list[int], overview: RunOverview) -> SamplesReadAhead:
    """Blocking: :func:`load_samples_with_pieces` of samples near the one shown, for the cache."""
    return SamplesReadAhead(load_samples_with_pieces(path, positions, overview))


def entropy_scale_max(sample: SampleRounds) -> float:
    """The top of the token colour scale: the sample's largest token entropy over all its rounds
    (at least 0.5 nats, so a nearly certain answer does not look uncertain)."""
    values = [float(np.nanmax(e)) for e in sample.token_entropies if len(e) and np.isfinite(e).any()]
    return max([0.5, *values])


def show_concept(screen: Screen, sample: SampleRounds | None, probe: ProbeInfo | None, score: str, round_: int,
                 layer_index: int) -> None:
    """Draw the selected probe's score per round at the selected layer (``#concept-curve``) and its
    layers × rounds heatmap (``#heatmap``) on ``screen`` (browse and live share this)."""
    curve, heatmap = screen.query_one("#concept-curve", Curve), screen.query_one(ConceptHeatmap)
    heatmap.cell_width = cell_width_for(screen.size.width)
    if probe is None or sample is None or probe.name not in sample.concept:
        what = "no probe" if probe is None else "no round yet" if sample is None or not sample.n_rounds else "not scored"
        curve.show(CurveData(what, ()))  # the title fits at 80 columns; the body says why there is no curve
        curve.border_title = "concept"
        heatmap.clear(what)
        heatmap.border_title = "layers × rounds"
        return
    values = sample.concept[probe.name][score]  # [R, L_probe]
    layer = probe.layers[layer_index]
    curve.border_title = visible(f"{probe.name} {score[:3]} L{layer}", newlines=False)
    curve.show(CurveData("", tuple(values[:, layer_index].tolist()), round_))
    heatmap.show(values, probe.layers, probe.ranges[score], round_, layer_index, score[:3])
    heatmap.border_title = f"{score[:3]} L × r"


def entropy_line(sample: SampleRounds, round_: int) -> str:
    """``r2 token H 1.008 · option H 0.736 nats`` of round ``round_`` (0-based); no option part
    for an open-ended task."""
    tok_h, opt_h = float(sample.mean_token_entropy[round_]), float(sample.option_entropy[round_])
    info = f"r{round_ + 1} token H {tok_h:.3f}"
    if math.isfinite(opt_h):
        info += f" · option H {opt_h:.3f}"
    return info + " nats"


def show_entropy(screen: Screen, sample: SampleRounds | None, round_: int, coloured: bool) -> None:
    """Draw ``sample``'s mean token entropy and option entropy per round (``#entropy-curve``) and
    the legend of its tokens' colouring (the conversation's border subtitle) on ``screen``
    (browse and live share this)."""
    curve = screen.query_one("#entropy-curve", EntropyCurve)
    curve.border_title = "entropy"
    conversation = screen.query_one(Conversation)
    if sample is None or not sample.n_rounds:
        curve.clear()
        conversation.border_subtitle = None
        return
    curve.show(sample.mean_token_entropy, sample.option_entropy, round_)
    conversation.border_subtitle = colour_legend(entropy_scale_max(sample), coloured)


def sample_view() -> Vertical:
    """The conversation, the token line, and the details row (option bars, concept curve,
    entropy curve, heatmap) of one sample: the browse and live screens show the same."""
    return Vertical(
        Conversation(id="conversation"),
        Static("", id="token-info", markup=False),
        Horizontal(Picture(id="picture"), OptionBars(id="options"), Curve(id="concept-curve"), EntropyCurve(id="entropy-curve"),
                   ConceptHeatmap(id="heatmap"), id="details"),
        id="main",
    )


class LayerKeys:
    """The l/h actions of a screen that shows a probe: its ``probe`` (or None), ``layer_index``
    into the probe's layers, and ``redraw()``."""

    layer_index = 0

    def _set_layer(self, index: int) -> None:
        probe = self.probe
        if probe is None or self.sample is None:
            return
        index = min(max(0, index), len(probe.layers) - 1)
        if index != self.layer_index:
            self.layer_index = index
            self.redraw()

    def action_next_layer(self) -> None:
        self._set_layer(self.layer_index + 1)

    def action_previous_layer(self) -> None:
        self._set_layer(self.layer_index - 1)


class SampleScreen(LayerKeys, Screen):
    """Sample list | conversation, token details, option bars, concept curve and heatmap."""

    BINDINGS = SAMPLE_BINDINGS

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.overview: RunOverview | None = None
        self.sample: SampleRounds | None = None
        self.pieces: tuple[tuple[str, ...], ...] = ()
        self.position: int | None = None
        self.round = 0
        self.probe_name: str | None = None
        self.score = SCORES[0]
        self.layer_index = 0
        self.coloured = True
        self.filter = SampleFilter()
        self.text_hits: np.ndarray | None = None
        self.error = ""
        self._refreshing = False
        self.cache: OrderedDict[int, SampleLoaded] = OrderedDict()  # position → a decoded sample, oldest first

    def compose(self) -> ComposeResult:
        yield StatusLine(id="status")
        with Horizontal(id="body"):
            yield SampleList(id="samples")
            yield sample_view()
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(OptionBars).border_title = "p̂(option)"
        self.show_status()
        run_blocking(self, load_overview, self.path, what=f"opening {self.path}", group="overview")

    # ------------------------------------------------------------------ data arriving
    @property
    def probe(self) -> ProbeInfo | None:
        return self.overview.probe(self.probe_name) if self.overview else None

    def on_run_loaded(self, message: RunLoaded) -> None:
        first = self.overview is None
        grown = not first and message.overview.n_done != self.overview.n_done
        if grown or (not first and message.overview.probes != self.overview.probes):
            self.cache.clear()  # a position may name another file row now, or the probes' scores changed
        self.overview = message.overview
        overview = message.overview
        if first:
            if overview.probes:
                self.select_probe(overview.probes[0].name)
            if overview.status == "running":
                self.set_interval(REFRESH_SECONDS, self.reload_overview, name="refresh")
        samples = self.query_one(SampleList)
        samples.set_samples(overview.ids, overview.categories, overview.correct, overview.multiple_choice)
        if first or grown:
            self.apply_filter(self.filter)
        self.show_status()
        if self.sample is None and samples.position is not None:
            self.load_sample(samples.position)
        elif samples.position is None:
            self.query_one(Conversation).clear("no finished samples yet" if overview.status == "running" else "no samples")

    def reload_overview(self) -> None:
        """Timer of a running run: re-read the overview (new batches)."""
        if self.overview is not None and self.overview.status != "running":
            return
        run_blocking(self, load_overview, self.path, what=f"re-reading {self.path}", group="refresh")

    def load_sample(self, position: int) -> None:
        """Show the sample at ``position``: at once from the cache, else once a worker has read it."""
        self.position = position
        assert self.overview is not None
        cached = self.cache.get(position)
        if cached is not None:
            self.cache.move_to_end(position)
            self.on_sample_loaded(cached)
            return
        run_blocking(self, load_sample_with_pieces, self.path, position, self.overview,
                     what=f"reading sample {position + 1}", group="sample")

    def remember(self, loaded: SampleLoaded) -> None:
        self.cache[loaded.sample.position] = loaded
        self.cache.move_to_end(loaded.sample.position)
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)

    def on_sample_loaded(self, message: SampleLoaded) -> None:
        self.remember(message)
        if message.sample.position != self.position:
            return  # an older read that finished late
        self.sample, self.pieces = message.sample, message.pieces
        self.round = min(self.round, self.sample.n_rounds - 1)
        self.show_sample()
        self.call_after_refresh(self.read_ahead)  # after the paint, so the reads do not slow it down

    def read_ahead(self) -> None:
        """Read the list's neighbours of the shown sample (``READ_AHEAD``) into the cache, in a worker."""
        samples = self.query_one(SampleList)
        shown, cursor = samples.shown, samples.cursor
        wanted = [int(shown[cursor + d]) for d in READ_AHEAD if 0 <= cursor + d < len(shown)]
        wanted = [p for p in dict.fromkeys(wanted) if p not in self.cache]
        if wanted and self.overview is not None:
            run_blocking(self, read_ahead, self.path, wanted, self.overview, what="reading the next samples ahead",
                         group="read-ahead")

    def on_samples_read_ahead(self, message: SamplesReadAhead) -> None:
        for loaded in message.loaded:
            if loaded.sample.position not in self.cache:
                self.remember(loaded)

    def on_sample_highlighted(self, message: SampleHighlighted) -> None:
        """The list's own keys or a click moved its cursor (``j``/``k`` show the sample themselves)."""
        if message.position == self.query_one(SampleList).position and message.position != self.position:
            self.load_sample(message.position)

    def on_token_focused(self, message: TokenFocused) -> None:
        self.query_one("#token-info", Static).update(self.query_one(TokenView).token_info(message.index), layout=False)

    def on_work_failed(self, message: WorkFailed) -> None:
        self.error = message.error
        self.show_status()

    def on_text_filter_done(self, message: TextFilterDone) -> None:
        if self.filter == SampleFilter("text", message.needle):
            self.text_hits = message.hits
            self.apply_filter(self.filter)

    # ------------------------------------------------------------------ drawing
    def show_status(self) -> None:
        o = self.overview
        if o is None:
            self.query_one(StatusLine).show([("", f"opening {self.path.name} …")], self.error)
            return
        parts = [("", f"{o.model} · {o.protocol}"), ("", o.status), ("round", f"{self.round + 1}/{o.n_rounds}")]
        samples = self.query_one(SampleList)
        if samples.position is not None:
            parts.append(("sample", f"{samples.cursor + 1}/{len(samples.shown)}"))
        if o.status == "running" or o.n_done < o.n_samples:
            parts.append(("done", f"{o.n_done}/{o.n_samples}"))
        steered = o.interventions_at(self.round + 1)
        if steered is not None:  # before the probe: the line is cut where the terminal ends, and the probe is on its panel
            parts.append(("steered", steered))
        fit = len(parts)  # what acted shows whole: on a narrow terminal the model and protocol give way (r shows the run), then "complete"
        probe = self.probe
        if probe is not None:
            parts.append(("", f"{probe.name} {self.score[:3]} L{probe.layers[self.layer_index]}"))
        spare = ((0, 1) if o.status == "complete" else (0,)) if steered is not None else ()
        self.query_one(StatusLine).show(parts, self.error, spare=spare, fit=fit)

    def show_sample(self) -> None:
        """Redraw everything that depends on the sample, round, probe, layer or colouring."""
        self.show_status()
        samples = self.query_one(SampleList)
        samples.current_round = self.round
        sample = self.sample
        if sample is None:
            return
        samples.border_subtitle = self.filter.label()
        t = self.round
        self.query_one(Conversation).show(sample, self.pieces, t, self.coloured, entropy_scale_max(sample))
        hint = " · hover a token for its entropy and id" if self.size.width >= 110 else ""
        self.query_one("#token-info", Static).update(entropy_line(sample, t) + hint, layout=False)
        self.query_one(OptionBars).show(sample.options, sample.option_probs[t], sample.gold, int(sample.answer[t]))
        self.query_one(Picture).show(sample.thumbnail)  # a vision-language run's image; hidden otherwise
        show_concept(self, sample, self.probe, self.score, t, self.layer_index)
        show_entropy(self, sample, t, self.coloured)

    # ------------------------------------------------------------------ actions (keys)
    def _set_round(self, round_: int) -> None:
        if self.sample is None:
            return
        round_ = min(max(0, round_), self.sample.n_rounds - 1)
        if round_ != self.round:
            self.round = round_
            self.show_sample()

    def action_next_round(self) -> None:
        self._set_round(self.round + 1)

    def action_previous_round(self) -> None:
        self._set_round(self.round - 1)

    def action_first_round(self) -> None:
        self._set_round(0)

    def action_last_round(self) -> None:
        if self.sample is not None:
            self._set_round(self.sample.n_rounds - 1)

    def _move_sample(self, delta: int) -> None:
        samples = self.query_one(SampleList)
        if samples.move(delta):  # shown in this pass (from the cache), with the list's cursor
            self.load_sample(samples.position)

    def action_next_sample(self) -> None:
        self._move_sample(1)

    def action_previous_sample(self) -> None:
        self._move_sample(-1)

    def redraw(self) -> None:
        self.show_sample()

    def select_probe(self, name: str) -> None:
        """Show probe ``name``, at its best layer, with its first score."""
        assert self.overview is not None
        probe = self.overview.probe(name)
        if probe is None:
            return
        self.probe_name = name
        self.score = self.score if self.score in probe.ranges else next(iter(probe.ranges))
        self.layer_index = probe.layers.index(probe.best_layer) if probe.best_layer in probe.layers else len(probe.layers) - 1
        if self.sample is not None and name not in self.sample.concept:
            self.cache.clear()
            self.load_sample(self.sample.position)
        self.show_sample()

    def action_choose_probe(self) -> None:
        if self.overview is None or not self.overview.probes:
            self.notify("no probe is tracked in this run (workbench probe track RUN PROBE)", severity="warning")
            return
        from tui.screens.dialogs import ProbeScreen

        def chosen(name: str | None) -> None:
            if name is not None:
                self.select_probe(name)

        self.app.push_screen(ProbeScreen(self.overview.probes, self.probe_name), chosen)

    def action_toggle_score(self) -> None:
        probe = self.probe
        if probe is None or len(probe.ranges) < 2:
            return
        names = list(probe.ranges)
        self.score = names[(names.index(self.score) + 1) % len(names)]
        self.show_sample()

    def action_toggle_colours(self) -> None:
        self.coloured = not self.coloured
        self.query_one(TokenView).set_coloured(self.coloured)
        show_entropy(self, self.sample, self.round, self.coloured)

    def action_filter(self) -> None:
        if self.overview is None:
            return
        from tui.screens.dialogs import FilterScreen

        categories = tuple(sorted(set(self.overview.categories)))
        self.app.push_screen(FilterScreen(categories, self.overview.multiple_choice, self.filter), self.set_filter)

    def set_filter(self, flt: SampleFilter | None) -> None:
        """Apply ``flt`` (None: leave the filter as it is); a text filter first searches in a worker."""
        if flt is None:
            return
        if flt.kind == "text":
            self.filter, self.text_hits = flt, None
            run_blocking(self, lambda: TextFilterDone(flt.value, search_text(self.path, flt.value)),
                         what=f"searching for {flt.value!r}", group="search")
            return
        self.apply_filter(flt)

    def apply_filter(self, flt: SampleFilter) -> None:
        if self.overview is None or (flt.kind == "text" and self.text_hits is None):
            return
        self.filter = flt
        o = self.overview
        hits = self.text_hits if flt.kind == "text" and self.text_hits is not None and len(self.text_hits) == o.n_done else None
        if flt.kind == "text" and hits is None:
            self.set_filter(flt)  # the run grew since the search: search again
            return
        samples = self.query_one(SampleList)
        before = samples.position
        samples.set_visible(select(flt, o.correct, o.categories, hits), keep=before)
        samples.border_subtitle = flt.label()
        if samples.position is not None and samples.position != before:
            self.load_sample(samples.position)
        elif samples.position is None:
            self.sample, self.position = None, None
            self.query_one(Conversation).clear(f"no sample matches the filter ({flt.label()}); / to change it")
        self.show_status()

    def action_show_run(self) -> None:
        if self.overview is None:
            return
        from tui.screens.run import RunScreen

        self.app.push_screen(RunScreen(self))

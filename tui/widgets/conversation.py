"""The conversation up to the current round: earlier turns as text, the current response as
entropy-coloured tokens (highlighted), and a word-level diff against the previous round's response."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from tui.literal import literal
from tui.runsource import SampleRounds
from tui.textdiff import word_diff
from tui.widgets.tokens import TokenView


def history_text(sample: SampleRounds, round_: int, user_style, model_style, dim_style, pending: str | None = None,
                 pending_prefix: str = "") -> Text:
    """Rounds ``0 … round_ − 1`` (instruction and response each) and the current round's
    instruction, with labels; every model and user string literal. A round's assistant prefix (the
    words the protocol made the model say before it generated, ``sample.prefixes``) is shown dimmed
    before its response; the current round's ends the text, just above its tokens. ``pending``: the
    instruction of a round still being generated (``round_`` = the rounds the sample has), and
    ``pending_prefix`` its assistant prefix."""
    text = Text(end="")
    if sample.context or sample.question:
        text.append("item  ", dim_style)
        text.append_text(literal(" ".join(x for x in (sample.context, sample.question) if x)))
        text.append("\n")
    for t in range(round_ + 1):
        text.append(f"\nuser · round {t + 1}\n", user_style)
        text.append_text(literal(sample.instructions[t] if t < sample.n_rounds else pending or ""))
        note = ("  (generating …)" if pending is not None else "  (shown below)") if t == round_ else ""
        text.append(f"\nmodel · round {t + 1}{note}\n", model_style)
        prefix = sample.prefixes[t] if t < len(sample.prefixes) else pending_prefix if t == sample.n_rounds else ""
        if prefix:
            text.append_text(literal(prefix, dim_style))
            response = sample.responses[t] if t < sample.n_rounds else ""
            if not prefix[-1].isspace() and not response[:1].isspace():
                text.append(" ")  # a word-level tokenizer decodes without the space between words the model saw
        if t < round_:
            text.append_text(literal(sample.responses[t]))
            text.append("\n")
    return text


def diff_text(before: str, after: str, round_: int, added_style, removed_style, dim_style) -> Text:
    """``vs round r: word word …`` with removed words struck through and added ones marked."""
    text = Text(f"vs round {round_}: ", style=dim_style, end="")
    ops = word_diff(before, after)
    if all(op == "same" for op, _ in ops):
        text.append("no change", dim_style)
        return text
    for k, (op, word) in enumerate(ops):
        if k:
            text.append(" ")
        style = added_style if op == "added" else removed_style if op == "removed" else ""
        text.append_text(literal(("+" if op == "added" else "-" if op == "removed" else "") + word, style))
    return text


class Conversation(VerticalScroll):
    """Scrolls to its end (the current response and its diff) whenever the round or the sample
    changes: anchored to the bottom, so the layout pass that places the new text also scrolls to it
    (no second render); scrolling up by hand releases the anchor until the next change. A filler
    (``#conversation-end``, 1fr high) makes the content at least as tall as the view: Textual's
    anchor would otherwise scroll a short conversation above its top."""

    COMPONENT_CLASSES = {"conversation--user", "conversation--model", "conversation--dim", "conversation--added",
                         "conversation--removed"}

    def compose(self) -> ComposeResult:
        yield Static(id="history", markup=False)
        yield TokenView(id="response")
        yield Static(id="diff", markup=False)
        # fills the view below a short conversation, so the anchored scroll never goes above the top
        yield Static(id="conversation-end")

    def show(self, sample: SampleRounds, pieces: tuple[tuple[str, ...], ...], round_: int, coloured: bool, scale_max: float) -> None:
        """Show ``sample`` up to ``round_`` (0-based); ``pieces[t]`` are round t's token texts."""
        style = self.get_component_rich_style
        self.query_one("#history", Static).update(
            history_text(sample, round_, style("conversation--user"), style("conversation--model"), style("conversation--dim")))
        self.query_one(TokenView).show(pieces[round_], sample.token_ids[round_], sample.token_entropies[round_], scale_max, coloured)
        diff = self.query_one("#diff", Static)
        if round_ > 0:
            diff.update(diff_text(sample.responses[round_ - 1], sample.responses[round_], round_,
                                  style("conversation--added"), style("conversation--removed"), style("conversation--dim")))
        else:
            diff.update(Text("round 1: no earlier response to compare", style=style("conversation--dim")))
        self.anchor()  # scrolled to the end (the current response and its diff) in the same layout pass

    def show_partial(self, sample: SampleRounds, instruction: str, ids: tuple[int, ...], pieces: tuple[str, ...],
                     prefix: str = "") -> None:
        """Show ``sample``'s rounds and the next one being generated: its ``instruction``, its
        assistant ``prefix`` and the response so far (``ids``/``pieces`` ``[T]``, not coloured: the
        entropies come with the round)."""
        style = self.get_component_rich_style
        self.query_one("#history", Static).update(history_text(
            sample, sample.n_rounds, style("conversation--user"), style("conversation--model"), style("conversation--dim"),
            pending=instruction, pending_prefix=prefix))
        self.query_one(TokenView).show(pieces, ids, [], 1.0, False)
        self.query_one("#diff", Static).update(Text(f"{len(ids)} tokens so far …", style=style("conversation--dim")))
        self.anchor()

    def clear(self, message: str = "") -> None:
        self.query_one("#history", Static).update(Text(message))
        self.query_one(TokenView).show((), [], [], 1.0, True)
        self.query_one("#diff", Static).update("")

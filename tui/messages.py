"""Every message the TUI's own parts send each other, in one place.

Workers post these when a read or a model call finishes; widgets post them when the user picks
something. Tests read them through ``App.run_test(message_hook=...)``.
"""

from __future__ import annotations

from typing import Any

from textual.message import Message

from tui.runsource import RunOverview, SampleRounds


class RunLoaded(Message):
    """The run file's overview was read (at open, and again when a running run grew)."""

    def __init__(self, overview: RunOverview) -> None:
        super().__init__()
        self.overview = overview


class SampleLoaded(Message):
    """One sample's rounds were read (browse) or grew by a round (live)."""

    def __init__(self, sample: SampleRounds, pieces: tuple[tuple[str, ...], ...]) -> None:
        super().__init__()
        self.sample = sample
        self.pieces = pieces  # [R] token texts of each round's response


class SamplesReadAhead(Message):
    """Samples near the one shown were read ahead (each with its pieces), for the sample cache."""

    def __init__(self, loaded: tuple["SampleLoaded", ...]) -> None:
        super().__init__()
        self.loaded = loaded


class RoundTableLoaded(Message):
    """``workbench.analysis.summary.summary`` of the run, for the run screen."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__()
        self.summary = summary


class TextFilterDone(Message):
    """The samples matching a text filter were found."""

    def __init__(self, needle: str, hits: Any) -> None:
        super().__init__()
        self.needle = needle
        self.hits = hits  # [n_done] bool


class SampleHighlighted(Message):
    """The sample list's cursor moved to ``position`` (among finished samples)."""

    def __init__(self, position: int) -> None:
        super().__init__()
        self.position = position


class TokenFocused(Message):
    """The mouse or the cursor is on token ``index`` of the shown response (None: on no token)."""

    def __init__(self, index: int | None) -> None:
        super().__init__()
        self.index = index


class WorkFailed(Message):
    """A worker raised: ``what`` it was doing and the error's one line. Shown by the app."""

    def __init__(self, what: str, error: str) -> None:
        super().__init__()
        self.what = what
        self.error = error


class LiveBusy(Message):
    """Live mode: the model started (``text``: what it is doing) or stopped (``text=None``) working."""

    def __init__(self, text: str | None) -> None:
        super().__init__()
        self.text = text


class LiveReady(Message):
    """Live mode: the model is loaded, or a new item's conversation has begun (no rounds yet)."""


class LiveRoundDone(Message):
    """Live mode: a round finished; ``sample`` holds every round so far."""

    def __init__(self, sample: SampleRounds, pieces: tuple[tuple[str, ...], ...]) -> None:
        super().__init__()
        self.sample = sample
        self.pieces = pieces


class LiveTokens(Message):
    """Live mode: round ``number`` (1-based) is being generated; ``ids``/``pieces`` ``[T]`` are the
    shown sample's response tokens so far and their texts, ``instruction`` the round's user message."""

    def __init__(self, number: int, instruction: str, ids: tuple[int, ...], pieces: tuple[str, ...]) -> None:
        super().__init__()
        self.number = number
        self.instruction = instruction
        self.ids = ids
        self.pieces = pieces


class LiveSaved(Message):
    """Live mode: the session was saved as a run file at ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

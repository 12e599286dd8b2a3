"""Which samples the sample list shows: pure functions over the per-round correctness matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = {
    "all": "all samples",
    "right_to_wrong": "flipped right → wrong at some round",
    "wrong_to_right": "flipped wrong → right at some round",
    "never_right": "never right",
    "category": "one category",
    "text": "text in id, context, question or a response",
}


@dataclass(frozen=True)
class SampleFilter:
    """A filter of the sample list: ``kind`` is a key of :data:`KINDS`; ``value`` is the category
    or the text for those kinds."""

    kind: str = "all"
    value: str = ""

    def label(self) -> str:
        """A short description for the sample list's title."""
        if self.kind in ("category", "text"):
            return f"{self.kind}: {self.value}"
        return {"all": "all", "right_to_wrong": "R→W", "wrong_to_right": "W→R", "never_right": "never right"}[self.kind]


def flips(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``correct [n, R]`` bool → (right→wrong, wrong→right) ``[n]`` bool: whether the sample
    flipped that way between some pair of consecutive rounds."""
    if correct.shape[1] < 2:
        empty = np.zeros(correct.shape[0], dtype=bool)
        return empty, empty
    before, after = correct[:, :-1], correct[:, 1:]
    return (before & ~after).any(1), (~before & after).any(1)


def select(flt: SampleFilter, correct: np.ndarray, categories: tuple[str, ...], text_hits: np.ndarray | None = None) -> np.ndarray:
    """Positions (ascending, into the finished samples) that ``flt`` keeps.

    correct: ``[n, R]`` bool; categories: ``[n]``; text_hits: ``[n]`` bool for a text filter
    (computed by :func:`tui.runsource.search_text`, as it needs the texts).
    """
    n = correct.shape[0]
    if flt.kind == "all":
        keep = np.ones(n, dtype=bool)
    elif flt.kind == "right_to_wrong":
        keep = flips(correct)[0]
    elif flt.kind == "wrong_to_right":
        keep = flips(correct)[1]
    elif flt.kind == "never_right":
        keep = ~correct.any(1)
    elif flt.kind == "category":
        keep = np.asarray(categories, dtype=object) == flt.value
    elif flt.kind == "text":
        if text_hits is None:
            raise ValueError("a text filter needs text_hits")
        keep = text_hits
    else:
        raise ValueError(f"unknown filter kind {flt.kind!r}")
    return np.flatnonzero(keep)

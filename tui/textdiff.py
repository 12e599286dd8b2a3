"""Word-level diff between two responses (difflib over whitespace-separated words)."""

from __future__ import annotations

import difflib
from typing import Literal

Op = Literal["same", "added", "removed"]


def word_diff(before: str, after: str) -> list[tuple[Op, str]]:
    """The words of ``before`` and ``after`` in reading order, each tagged ``same``, ``removed``
    (only in ``before``) or ``added`` (only in ``after``); a replaced run of words gives its
    removed words first, then the added ones. Joining the ``same`` and ``added`` words with
    spaces gives ``after``'s words."""
    a, b = before.split(), after.split()
    out: list[tuple[Op, str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            out += [("same", w) for w in a[i1:i2]]
        else:
            out += [("removed", w) for w in a[i1:i2]]
            out += [("added", w) for w in b[j1:j2]]
    return out

"""The README and docs link only what is inside the repository (a clone has no ../shared/).
(Whether each linked file exists is not checked here: docs/ARCHITECTURE.md is written beside this
branch.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_relative_links_in_the_docs_stay_inside_the_repository():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path = (doc.parent / target).resolve()
            if not path.is_relative_to(ROOT):
                broken.append(f"{doc.relative_to(ROOT)} → {target}")
    assert not broken, broken

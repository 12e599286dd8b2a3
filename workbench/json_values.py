"""Values made writable as strict JSON (JSON has no NaN): used by ``workbench info --json``, ``analyze --json``
and the analysis result the run file keeps. Imports nothing heavy: the CLI's light paths use it."""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, recursively through dicts, lists
    and tuples (a tuple becomes a list); NumPy scalars become Python numbers. Safe for ``json.dumps(...,
    allow_nan=False)``."""
    if hasattr(value, "item") and type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value

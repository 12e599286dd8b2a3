"""How big an export is before it is written, and whether it fits: ``--max-size`` and the free space."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from workbench.cache.file import HookLayout
from workbench.errors import WorkbenchError


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "m": 1000**2, "mb": 1000**2, "mib": 2**20,
          "g": 1000**3, "gb": 1000**3, "gib": 2**30, "t": 1000**4, "tb": 1000**4, "tib": 2**40}


def parse_size(text: str, option: str = "--max-size") -> int:
    """Bytes from ``10GiB``, ``500 MB``, ``1.5G``, ``1024`` (k/M/G/T are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text or "")
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise WorkbenchError(f"{option} takes a size such as 10GiB, 500MB or 2000000 (bytes), not {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def human_bytes(n: float) -> str:
    """``n`` bytes as ``228.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def estimate_bytes(n_tokens: int, layouts: list[HookLayout]) -> int:
    """The activations of an export: ``n_tokens`` rows of every hook's per-token shape (an attention
    map's ``[head, key_pos]`` padded to the longest transcript) at its dtype. The token table and
    metadata add about 20 bytes a token on top."""
    return sum(n_tokens * int(np.prod(h.per_token)) * np.dtype(h.dtype).itemsize for h in layouts) + 20 * n_tokens


def bytes_under(path: Path) -> int:
    """Bytes of the file ``path``, or of every file under the folder ``path`` (0 when there is none)."""
    if path.is_file() and not path.is_symlink():
        return path.stat().st_size
    if not path.is_dir() or path.is_symlink():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on the file system of ``path`` (or its nearest existing folder)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def check_size(estimate: int, out: Path, parts: Path, max_size: int | None, reclaimed: int) -> None:
    """Refuse (one line) an export of about ``estimate`` bytes into ``out`` that exceeds ``max_size``
    or the free space there (plus ``reclaimed``: what --overwrite or --resume will free or reuse)."""
    advice = "fewer hooks, --samples, --rounds or --roles, or --dtype float16"
    if max_size is not None and estimate > max_size:
        raise WorkbenchError(f"the export would write about {human_bytes(estimate)} to {out}, more than --max-size "
                             f"{human_bytes(max_size)}: choose {advice}, or raise --max-size")
    free = free_bytes(parts)
    if free is not None and estimate > free + reclaimed:
        raise WorkbenchError(f"the export would write about {human_bytes(estimate)} to {out} but only "
                             f"{human_bytes(free + reclaimed)} is free there: choose {advice}, or another --out")

"""The one exception type a user ever sees.

Anything the user can fix (a missing file, a malformed line, an unknown model, a layer out of
range, a foreign HDF5 file) raises :class:`WorkbenchError` with one line naming what and where.
The CLI prints that line and exits non-zero; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class WorkbenchError(Exception):
    """A user-facing error: its message is one line that names what went wrong and where."""


def check_output_path(path: os.PathLike[str] | str, option: str = "--out", folder: bool = False, overwrite: bool | None = None,
                      what: str = "") -> None:
    """Refuse, before any work, an output path that cannot be written: a file where a folder is
    wanted (or the reverse), a parent that is a file, or a directory without write permission.

    ``folder`` says the output is a folder (``organism train --out``) rather than a file; with
    ``overwrite=False`` a folder that already holds files is refused too (``what``: said of it, e.g.
    " (the shipped checkpoint)"). Returns nothing; raises :class:`WorkbenchError` naming ``option``
    and the path.
    """
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise WorkbenchError(f"{option} {path}: exists and is not a folder")
        if not folder and path.is_dir():
            raise WorkbenchError(f"{option} {path}: is a folder; give a file path")
        if folder and overwrite is False and any(path.iterdir()):
            raise WorkbenchError(f"{option} {path} already holds files{what}; give a new folder, or --overwrite to replace them")
    parent = path.parent if not path.exists() else path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise WorkbenchError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WorkbenchError(f"{option} {path}: {parent} is not writable")


def parse_int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    """A comma-separated list of integers as a command-line option gives it (``"0,2,5"`` → ``(0, 2, 5)``);
    None when ``text`` is None. Refuses, naming ``option``, a value that is not an integer, an empty item
    (``1,,2``, a trailing comma) and a number given twice (``0,0``). Raises WorkbenchError."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",")]
    if any(not x for x in items) and text.strip():
        raise WorkbenchError(f"{option} {text!r} has an empty item: give comma-separated integers such as 0,2,5")
    try:
        values = tuple(int(x) for x in items if x)
    except ValueError:
        raise WorkbenchError(f"{option} takes comma-separated integers, not {text!r}") from None
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise WorkbenchError(f"{option} names {repeated[0]} more than once")
    return values


def import_optional(module: str, feature: str) -> Any:
    """``importlib.import_module(module)`` for a feature that needs one of the ``[data]`` extra's
    packages (pandas, xarray, h5netcdf, datasets): the module, or a WorkbenchError naming ``feature``
    and the install command when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise WorkbenchError(f"{feature} needs the `{module.split('.')[0]}` package: "
                             "pip install 'self-correction-workbench[data]'") from None

"""The one exception type a user ever sees.

Anything the user can fix (a missing file, a malformed line, an unknown model, a layer out of
range, a foreign HDF5 file) raises :class:`WorkbenchError` with one line naming what and where.
The CLI prints that line and exits non-zero; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """A user-facing error: its message is one line that names what went wrong and where."""

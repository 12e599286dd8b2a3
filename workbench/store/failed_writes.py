"""What happens after a write fails (a full disk, a file-size limit, a vanished folder): one line naming
the file and the OS's reason instead of HDF5's tracebacks, and no crash at exit.

**The HDF5 teardown crash, and why it is handled here.** After a failed write HDF5 keeps a dataset it could
not close, and its own C exit handler (``H5_term_library``, run by libc's ``exit`` after Python's teardown)
closes it again and crashes: a script that caught the error would end with a segmentation fault instead of
its own status. Closing the failed objects first does not help (h5py cannot close what HDF5 refuses to close),
and writing in a child process would cost every batch a copy. So :func:`skip_hdf5_teardown` registers libc's
``_exit`` with ``on_exit`` once a write has failed: it runs after Python's teardown and before HDF5's handler,
with the status the script gave. ``tests/test_crash_safety.py::test_a_script_that_catches_a_full_disk_ends_with_its_own_status``
shows it (exit statuses 0, 3 and 1 all fail without it). Every module that writes HDF5 reaches it through
:func:`write_errors`, or, for the cache and merge, :func:`skip_hdf5_teardown` directly."""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import h5py

from workbench.errors import WorkbenchError
from workbench.store.durability import free_space, libc_function, os_reason

FAILED_WRITES: list[Path] = []  # run files whose write failed in this process (see cli.entry)
ABANDONED: list[h5py.File] = []  # files left open after a failed write, never closed by this process


def _failed_write(value: Any) -> bool:
    return isinstance(value, (OSError, RuntimeError)) and "write failed" in str(value)


def _drop_failed_write_noise(unraisable: Any, previous: Any = sys.unraisablehook) -> None:
    """After a failed write, h5py's objects of that file fail again as they are freed, each printing
    a traceback (through ``sys.excepthook``) and "Exception ignored …" (through
    ``sys.unraisablehook``); drop those two (the one error line says it all), keep every other."""
    if not _failed_write(unraisable.exc_value):
        previous(unraisable)


def _drop_failed_write_traceback(kind: Any, value: Any, tb: Any, previous: Any = sys.excepthook) -> None:
    if not _failed_write(value):
        previous(kind, value, tb)


@functools.cache
def skip_hdf5_teardown() -> None:
    """After a failed write HDF5 holds a dataset it could not close, and its own exit handler
    (``H5_term_library``, run by the C library's ``exit`` after Python has finished) crashes on it:
    a script that caught the error would end with a segmentation fault. Register, once, the C
    library's ``_exit`` as an ``on_exit`` handler: handlers run last-registered first, so it runs
    before HDF5's, after Python's own teardown (its atexit functions, flushed streams), and ends
    the process with the status ``exit`` was given. Every part a run keeps is already on disk. A
    no-op off glibc."""
    import ctypes

    on_exit = libc_function("on_exit", ctypes.c_void_p, ctypes.c_void_p)
    if on_exit is None:
        return
    _exit = ctypes.cast(ctypes.CDLL(None)._exit, ctypes.c_void_p)  # called as _exit(status, arg): arg is ignored
    on_exit(_exit, None)


@contextmanager
def quiet_failed_writes() -> Iterator[None]:
    """While inside, drop the tracebacks h5py prints as it frees the objects of a failed write (see
    :func:`_drop_failed_write_noise`); after a failure they stay dropped (those objects are freed
    later), after success the previous hooks are back."""
    previous = sys.unraisablehook, sys.excepthook
    sys.unraisablehook, sys.excepthook = _drop_failed_write_noise, _drop_failed_write_traceback
    yield
    sys.unraisablehook, sys.excepthook = previous


@contextmanager
def write_errors(path: Path, action: str = "writing",
                 then: str = "finished batches are kept: make room and continue with --resume") -> Iterator[None]:
    """Turn any OSError while writing (a full disk, a file-size limit, a vanished folder) into one line
    ending with ``then`` (what is kept and what to do)."""
    previous = sys.unraisablehook, sys.excepthook
    sys.unraisablehook, sys.excepthook = _drop_failed_write_noise, _drop_failed_write_traceback
    try:
        yield
    except (OSError, RuntimeError) as e:  # h5py reports a failed write or close as OSError or RuntimeError
        if isinstance(e, RuntimeError) and "errno" not in str(e) and "write" not in str(e).lower():
            raise
        FAILED_WRITES.append(Path(path))
        skip_hdf5_teardown()
        raise WorkbenchError(f"{action} {path} failed: {os_reason(e)} ({free_space(path)} free there); {then}") from None
    sys.unraisablehook, sys.excepthook = previous  # kept after a failure: the failed file's objects are freed later

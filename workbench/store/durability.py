"""Durable file operations: fsync a file or folder, rename atomically and durably, write a whole file
under a temporary name, read the OS's reason for a failed write, look up libc functions (``sync_file_range``,
``fallocate``, ``on_exit``), the kernel's boot id (provisional parts are trusted only within one boot)."""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import h5py


# --------------------------------------------------------------------------- durable file operations
def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(src: Path, dest: Path) -> None:
    """Atomically rename ``src`` (already fsynced) to ``dest`` and make the rename durable."""
    os.replace(src, dest)
    fsync_path(dest.parent, directory=True)


def write_h5_atomic(dest: Path, fill: Callable[[h5py.File], None]) -> None:
    """Write a whole HDF5 file with ``fill`` under a temporary name, fsync it, rename it to ``dest``."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with h5py.File(tmp, "w", locking=False) as f:
        fill(f)
    fsync_path(tmp)
    replace_durably(tmp, dest)


def write_text_atomic(dest: Path, text: str) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a symlink placed there is removed, never written through
    with open(tmp, "x") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    replace_durably(tmp, dest)


def free_space(path: Path) -> str:
    """The space left on the file system that holds ``path`` (or its nearest existing folder), as text."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return "unknown"
    free = st.f_bavail * st.f_frsize
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    raise AssertionError


def os_errno(e: BaseException) -> int | None:
    """The operating system's error number of a failed write, also when HDF5 wraps it in its own
    report (``..., errno = 28, error message = '...', buf = ...``: the last one); None if it has none."""
    code = getattr(e, "errno", None)
    found = re.findall(r"errno = (\d+)", str(e))
    if not (isinstance(code, int) and code > 0) and found:
        code = int(found[-1])
    return code if isinstance(code, int) and code > 0 else None


def os_reason(e: BaseException) -> str:
    """The operating system's words for a failed write ("No space left on device"), also when
    HDF5 wraps them in its own report (see :func:`os_errno`)."""
    text = str(e)
    code = os_errno(e)
    if code is not None:
        return os.strerror(code)
    messages = re.findall(r"error message = '([^']*)'", text)
    return messages[-1] if messages else (text.splitlines() or [type(e).__name__])[0]


@functools.cache
def libc_function(name: str, *argtypes: Any) -> Any:
    """The C library's function ``name`` with ``argtypes`` (returning int, setting errno), or None
    off Linux or where the library has none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    return fn


BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")  # read at every call: a test points it elsewhere to simulate a restart


def boot_id() -> str | None:
    """This machine's boot id (hex; it changes whenever the machine restarts, so pages a killed
    process wrote are still in the page cache exactly while it is unchanged), or None where the
    kernel does not say (then every batch is made durable at once)."""
    try:
        boot = BOOT_ID_FILE.read_text().strip().replace("-", "").lower()
    except OSError:
        return None
    return boot if re.fullmatch(r"[0-9a-f]+", boot) else None


def atomic_replace(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it onto ``path``, fsync the folder: after this ``path`` is whole on disk."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)

"""Opening a stranger's HDF5 file must never read outside it.

HDF5 can make a dataset read bytes from other files: *external raw storage* (a dataset whose bytes
are in named files, ``/etc/passwd`` as well as any other), *external links* (a link that opens an
object in another HDF5 file) and *virtual datasets* (rows mapped from datasets of other files). Run
files, cache files and probe files are shared between researchers, so every reader of the workbench
calls :func:`check_contained` right after opening a file and before reading any dataset: it walks
every link of the file without following one and refuses, in one line naming the object, anything
that would read another file. The only exceptions are the workbench's own:

- a merged data-parallel run's activations are virtual datasets reading ``RUN.h5.shards/*.h5``:
  allowed when the source names are relative, lie inside that folder (symlinks resolved), and the
  source files are themselves contained (checked here too, before any read);
- a running run's in-memory view reads its activations from ``RUN.h5.parts/activations.h5`` by
  external storage: allowed for exactly that file (the caller names it).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Iterable

import h5py

from workbench.errors import WorkbenchError


def check_contained(f: h5py.File, where: Path | str, external_files: Iterable[Path] = (),
                    shards_folder: Path | None = None) -> None:
    """Refuse ``f`` (opened from ``where``) when any object in it would read another file: an
    external link or a link of an unknown kind, a dataset with external raw storage in any file
    but ``external_files`` (exact resolved paths), or a virtual dataset whose sources are not inside
    ``shards_folder`` (relative names only; each source file is checked the same way, with no
    exceptions). Reads only link and dataset metadata, never data. Returns nothing; raises
    :class:`WorkbenchError` naming the file and the object."""
    allowed = {os.path.realpath(p) for p in external_files}
    refusal: list[str] = []
    fid = f.id

    def visit(name: bytes, info: h5py.h5l.LinkInfo) -> int | None:
        # the low-level walk with each link's kind: no high-level link or object per name (a tenth of the time)
        text = name.decode("utf-8", errors="replace")
        if info.type == h5py.h5l.TYPE_EXTERNAL:
            file_name, path = (v.decode("utf-8", errors="replace") for v in fid.links.get_val(name))
            refusal.append(f"/{text} is an external link to {file_name}:{path}")
        elif info.type == h5py.h5l.TYPE_HARD:
            if h5py.h5o.get_info(fid, name).type == h5py.h5o.TYPE_DATASET:
                problem = _dataset_problem(h5py.h5d.open(fid, name), where, allowed, shards_folder)
                if problem:
                    refusal.append(f"/{text} {problem}")
        elif info.type != h5py.h5l.TYPE_SOFT:
            refusal.append(f"/{text} is a link of an unknown kind")
        return 1 if refusal else None  # a non-None value stops the walk

    try:
        root_problem = None
        fid.links.visit(visit, info=True)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        root_problem = f"its structure cannot be read ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    if refusal or root_problem:
        raise WorkbenchError(f"{where}: refused, {refusal[0] if refusal else root_problem}: "
                             "a workbench file never reads outside itself")


def _dataset_problem(ds: h5py.h5d.DatasetID, where: Path | str, allowed: set[str], shards_folder: Path | None) -> str | None:
    plist = ds.get_create_plist()
    for i in range(plist.get_external_count()):
        name = plist.get_external(i)[0]
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        if not os.path.isabs(name) or os.path.realpath(name) not in allowed or not _regular_file(name):
            return f"stores its data in another file ({name!r}, HDF5 external storage)"
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        for source in h5py.Dataset(ds).virtual_sources():
            problem = _virtual_source_problem(source.file_name, where, shards_folder)
            if problem:
                return problem
    return None


def _virtual_source_problem(file_name: str, where: Path | str, shards_folder: Path | None) -> str | None:
    if file_name == ".":  # the same file
        return None
    reads = f"reads {file_name!r} (an HDF5 virtual dataset)"
    if shards_folder is None or os.path.isabs(file_name) or ".." in Path(file_name).parts:
        return reads
    base = Path(where).parent
    target = os.path.realpath(base / file_name)
    folder = os.path.realpath(shards_folder)
    if Path(file_name).parts[:1] != (Path(shards_folder).name,) or os.path.dirname(target) != folder:
        return reads + f", not a shard inside {Path(shards_folder).name}/"
    if not os.path.exists(target):
        return None  # the missing shard is named by the reader's own check, in a clearer line
    if not _regular_file(base / file_name):
        return reads + ", which is not a regular file"
    try:
        with h5py.File(target, "r", locking=False) as shard:
            check_contained(shard, base / file_name)
    except WorkbenchError as e:
        return f"reads a shard that is refused ({e})"
    except (OSError, RuntimeError):
        return reads + ", which is not a readable HDF5 file"
    return None


def _regular_file(path: Path | str) -> bool:
    """Whether ``path`` is a regular file, a symlink not followed."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def open_contained(path: Path | str, where: Path | str | None = None, shards_folder: Path | None = None,
                   **kwargs) -> h5py.File:
    """``h5py.File(path, "r", **kwargs)`` checked by :func:`check_contained` (virtual datasets only
    into ``shards_folder``, no external storage): the open file, or :class:`WorkbenchError`. For the workbench's own auxiliary files (a running
    run's header and derived parts, a resumed export's data) that a stranger may have placed."""
    f = h5py.File(path, "r", **kwargs)
    try:
        check_contained(f, where or path, shards_folder=shards_folder)
    except BaseException:
        f.close()
        raise
    return f


# --------------------------------------------------------------------------- never through a symlink
def refuse_symlinks(*paths: Path | str) -> None:
    """Refuse, in one line, any of ``paths`` that is a symlink (dangling or not): paths where the
    workbench creates, truncates or deletes its own files and folders (a run's lock, parts and
    staging folders, an export's ``.parts``, a ``--out``). Following one would let whoever placed
    it make the workbench truncate, write or delete files elsewhere. Raises WorkbenchError."""
    for path in paths:
        if os.path.islink(path):
            raise WorkbenchError(f"{path}: refused, it is a symlink (to {os.readlink(path)!r}) where the workbench "
                                 "writes its own file or folder; it never writes or deletes through one: remove it")


def refuse_symlinks_in(folder: Path | str) -> None:
    """:func:`refuse_symlinks` for ``folder`` and every entry in it (a run's parts folder, an
    export's ``OUT.parts``: the workbench writes, truncates and deletes the files there). A folder
    that does not exist passes."""
    refuse_symlinks(folder)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_symlink():
            refuse_symlinks(entry.path)


def open_nofollow(path: Path | str, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, mode)``: a file descriptor, or WorkbenchError
    (one line) when ``path`` is a symlink."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_symlinks(path)
        raise


def refuse_special_file(path: Path | str) -> None:
    """Refuse, in one line, a path that exists but is neither a regular file nor a folder (a FIFO,
    which would block opening it forever; a device; a socket). Symlinks are followed here: a reader
    may open a run through one. Returns nothing."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the opener's own error names it
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device" if (
            stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) else "not a regular file"
        raise WorkbenchError(f"{path} is {kind}, not a file the workbench reads")

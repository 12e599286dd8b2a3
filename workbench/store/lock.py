"""The writer's lock (``RUN.h5.lock``: one process writes a run at a time; a killed holder releases it) and
the checks an output path gets before a model loads."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path


from workbench.errors import WorkbenchError
from workbench.store.format import lock_path, parts_dir, run_exists, staging_dir
from workbench.store.trust import open_nofollow, refuse_symlinks, refuse_symlinks_in

# --------------------------------------------------------------------------- the writer's lock
@dataclass
class RunLock:
    """An exclusive ``flock`` on ``RUN.h5.lock`` held while a process writes a run (batches, or
    derived results). A killed holder releases it automatically."""

    path: Path
    fd: int

    @classmethod
    def acquire(cls, run_path: Path) -> "RunLock":
        """Take the lock or raise a WorkbenchError naming the process that holds it."""
        lock = lock_path(Path(run_path))
        refuse_symlinks(lock)
        refuse_symlinks_in(parts_dir(Path(run_path)))
        refuse_symlinks_in(staging_dir(Path(run_path)))
        while True:
            fd = open_nofollow(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise WorkbenchError(f"{run_path} is being written by another process (pid {holder}): it is running; "
                                     f"wait for it to finish (`workbench info {run_path}` shows its progress), or stop it first") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its last holder removed while we were opening it
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return cls(lock, fd)
            os.close(fd)

    def release(self, remove: bool = False) -> None:
        if self.fd < 0:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


def check_output(path: Path, resume: bool, overwrite: bool) -> None:
    """Everything about an output path that can be checked before a model loads: the folder can be
    made and written, the path is not a folder, an existing run needs --resume or --overwrite, and
    no other process is writing it. Raises WorkbenchError with one line."""
    path = Path(path)
    refuse_symlinks(lock_path(path))
    refuse_symlinks_in(parts_dir(path))
    refuse_symlinks_in(staging_dir(path))
    if path.is_dir():
        raise WorkbenchError(f"--out {path} is a folder; give a file name such as {path / 'run.h5'}")
    parent = path.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise WorkbenchError(f"--out {path}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise WorkbenchError(f"--out {path}: cannot write in {p} (permission denied)")
            break
    if path.exists() and not os.access(path, os.R_OK):
        raise WorkbenchError(f"--out {path}: the existing file cannot be read (permission denied)")
    if resume and overwrite:
        raise WorkbenchError("--resume and --overwrite exclude each other")
    if parent.exists() and lock_path(path).exists():
        RunLock.acquire(path).release()  # a running run is named as running, before "use --resume"
    if run_exists(path) and not resume and not overwrite:
        raise WorkbenchError(f"{path} already exists (use --resume to continue it, or --overwrite)")

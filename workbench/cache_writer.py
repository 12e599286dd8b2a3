"""The cache file of a running ``workbench export``: created once at full size, each batch's rows
written straight into place, finished by one rename; resumable after a kill (docs/CACHE.md).

While an export runs it lives in the folder ``OUT.parts/``:

- ``manifest.json``: what the export computes (written and checked by :mod:`workbench.export`);
- ``cache.h5``: the cache file itself, made by :func:`workbench.cache_file.create_cache_file` with
  ``status = running``: token labels and metadata written, every activation dataset allocated at
  full size. Batch rows are written into the allocated chunks with ``pwrite``; HDF5 never writes
  this file's metadata again until the finish. It is not fsynced at creation: until a batch is
  committed, an open creates it afresh;
- ``done-A-B``: empty files; batches ``A … B-1`` are in ``cache.h5`` and on disk. At most every
  ``COMMIT_INTERVAL_S`` (and at the end) the file is fsynced and then one such name is created.

The finish: where each hook's rows lie (byte offsets) goes to ``layout.json``, ``cache.h5`` is
renamed ``finishing.h5``, its ``status`` set to ``complete`` (the one metadata write), and it is
fsynced and renamed onto ``OUT``. A kill during the finish can leave
``finishing.h5`` with damaged metadata; the next open rebuilds ``cache.h5`` from a fresh file and
the raw rows of ``finishing.h5`` (at ``layout.json``'s offsets), as the run file's writer does.
Every byte of activations is written once, and a file named ``OUT`` is always complete.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np

from workbench.cache_file import activation_slot, atomic_replace, fsync_path, write_rows
from workbench.store import COMMIT_INTERVAL_S, LAYOUT, ActivationSlot, _copy_raw, _read_layout, _replace, _write_text_atomic

DATA, FINISHING, REPAIR = "cache.h5", "finishing.h5", "repair"
DONE = re.compile(r"^done-(\d+)-(\d+)$")


def done_batches(folder: Path) -> set[int]:
    """The batches whose rows are on disk in ``folder/cache.h5`` (from its ``done-A-B`` names)."""
    done: set[int] = set()
    for path in folder.glob("done-*"):
        m = DONE.match(path.name)
        if m:
            done.update(range(int(m.group(1)), int(m.group(2))))
    return done


SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>


@functools.cache
def _sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file's dirty pages to the disk now, without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere nothing): the disk then works while
    the next batch is computed and copied, and the commit's fsync finds little left to write."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # a hint: its failure changes nothing the fsync does not


def _slots_of(path: Path) -> list[ActivationSlot]:
    """Where each hook's rows lie in an intact cache file (read only)."""
    with h5py.File(path, "r", locking=False) as f:
        return [activation_slot(f["activations"][h]) for h in json.loads(f.attrs["hooks"])]


def _layout_text(slots: Sequence[ActivationSlot]) -> str:
    return json.dumps([{"hook": s.hook, "shape": list(s.shape), "dtype": s.dtype, "segments": [list(x) for x in s.segments]}
                       for s in slots])


class PartialCache:
    """The cache file of one export while it is written. Use as a context manager.

    ``open`` creates it (or reopens an interrupted one, repairing a killed finish); ``write`` puts
    one batch's rows in place; ``finish`` makes it ``OUT``. ``batch_tokens[k]`` is the number of
    token rows of batch ``k``: batch ``k`` is rows ``Σ batch_tokens[:k]`` onwards."""

    def __init__(self, folder: Path, slots: list[ActivationSlot], batch_tokens: Sequence[int]):
        self.folder = folder
        self.slots = slots
        self.batch_tokens = list(batch_tokens)
        self.starts = np.concatenate([[0], np.cumsum(self.batch_tokens)]).astype(np.int64)
        self.done = done_batches(folder)
        self._fd = os.open(folder / DATA, os.O_RDWR)
        self._pending: list[int] = []
        self._last_commit = -float("inf")  # the first batch commits at once

    @classmethod
    def open(cls, folder: Path, batch_tokens: Sequence[int], create: Callable[[Path], list[ActivationSlot]]) -> "PartialCache":
        """Open ``folder/cache.h5`` for writing; ``create(path)`` makes a fresh one at ``path``
        (:func:`workbench.cache_file.create_cache_file` with ``status="running"``). ``folder`` exists."""
        for tmp in [*folder.glob("*.tmp"), *folder.glob("*.new")]:
            tmp.unlink()
        shutil.rmtree(folder / REPAIR, ignore_errors=True)
        data, finishing = folder / DATA, folder / FINISHING
        if finishing.exists() and data.exists():
            finishing.unlink()  # a repair finished but was killed before removing the damaged file
        elif finishing.exists():  # a finish was killed: its metadata may be damaged, its rows are whole
            (folder / REPAIR).mkdir()
            fresh = create(folder / REPAIR / DATA)
            _copy_raw(finishing, _read_layout(folder), folder / REPAIR / DATA, fresh)
            _replace(folder / REPAIR / DATA, data)
            finishing.unlink()
            shutil.rmtree(folder / REPAIR)
        if data.exists() and done_batches(folder):
            slots = _slots_of(data)  # made durable by the first commit's fsync
        else:  # nothing committed: whatever is there may not have reached the disk whole; start afresh
            for marker in folder.glob("done-*"):
                marker.unlink()
            slots = create(folder / (DATA + ".tmp"))
            os.replace(folder / (DATA + ".tmp"), data)  # no fsync: the first commit's fsyncs cover it
        return cls(folder, slots, batch_tokens)

    def __enter__(self) -> "PartialCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def missing(self) -> list[int]:
        """The batches still to write, in order."""
        return [k for k in range(len(self.batch_tokens)) if k not in self.done]

    @property
    def done_tokens(self) -> int:
        """Token rows of the committed batches."""
        return int(sum(self.batch_tokens[k] for k in self.done))

    @property
    def written_tokens(self) -> int:
        """Token rows written so far, committed or not (for a progress bar)."""
        return self.done_tokens + int(sum(self.batch_tokens[k] for k in self._pending))

    def write(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        """Write batch ``k``'s rows (``{hook: [batch_tokens[k], *per_token]}``) into place; it
        counts as done once committed (at most every ``COMMIT_INTERVAL_S``, and by ``finish``/``close``)."""
        n = write_rows(self._fd, self.slots, int(self.starts[k]), arrays)
        start_writeback(self._fd)
        if n != self.batch_tokens[k] and self.slots:
            raise ValueError(f"batch {k} has {n} token rows, the plan {self.batch_tokens[k]}")
        self._pending.append(k)
        if time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S:
            self.commit()

    def commit(self) -> None:
        """fsync the file, then record every written batch as done (one ``done-A-B`` per run of batches)."""
        if not self._pending:
            return
        os.fsync(self._fd)
        runs: list[list[int]] = []
        for k in sorted(self._pending):
            if runs and runs[-1][1] == k:
                runs[-1][1] = k + 1
            else:
                runs.append([k, k + 1])
        for a, b in runs:
            os.close(os.open(self.folder / f"done-{a:06d}-{b:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
        fsync_path(self.folder)
        self.done.update(self._pending)
        self._pending = []
        self._last_commit = time.monotonic()

    def blocks(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(first_token_row, {hook: [n, *per_token]})`` of every batch, in order, read back."""
        with h5py.File(self.folder / DATA, "r", locking=False) as f:
            for k, n in enumerate(self.batch_tokens):
                lo = int(self.starts[k])
                yield lo, {s.hook: f["activations"][s.hook][lo : lo + n] for s in self.slots}

    def finish(self, out: Path) -> Path:
        """Every batch done: mark the file complete and rename it onto ``out``; the folder is removed."""
        self.commit()
        if self.missing:
            raise AssertionError(f"finish with batches {self.missing[:5]} not written")
        self.close()
        _write_text_atomic(self.folder / LAYOUT, _layout_text(self.slots))  # for the repair of a killed finish
        finishing = self.folder / FINISHING
        _replace(self.folder / DATA, finishing)
        with h5py.File(finishing, "r+", locking=False) as f:
            f.attrs["status"] = "complete"
        atomic_replace(finishing, out)
        shutil.rmtree(self.folder)
        return out

    def close(self) -> None:
        """Commit what was written (unless that fails too) and close the file."""
        if self._fd < 0:
            return
        try:
            self.commit()
        except OSError:
            pass  # already failing (a full disk): the uncommitted batches are redone on --resume
        finally:
            os.close(self._fd)
            self._fd = -1

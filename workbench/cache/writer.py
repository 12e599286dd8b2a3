"""The cache file of a running ``workbench export``: created once at full size, each batch's rows
written straight into place, finished by one rename; resumable after a kill (docs/CACHE.md).

While an export runs it lives in the folder ``OUT.parts/``:

- ``manifest.json``: what the export computes (written and checked by :mod:`workbench.cache.export`);
- ``cache.h5``: the cache file itself, made by :func:`workbench.cache.file.create_cache_file` with
  ``status = running``: token labels and metadata written, every activation dataset allocated at
  full size. Batch rows are written into the allocated chunks with ``pwrite``; HDF5 never writes
  this file's metadata again until the finish. It is not fsynced at creation: until a batch
  counts as done, an open creates it afresh;
- ``done-A-B.{boot}``: empty files, one after each batch: batches ``A … B-1`` are in ``cache.h5``
  (in the page cache at least) since the machine with that boot id started. Nothing is fsynced:
  after a kill of the process every byte it wrote is in the kernel's page cache, so these count
  while the boot id is the machine's; after a restart they are ignored and their batches
  recomputed (their bytes may not have reached the disk);
- ``done-A-B``: the same, durable (``durable=True``, ``workbench export --fsync``): at most every
  ``COMMIT_INTERVAL_S`` (and at the end) the file is fsynced and then one such name is created
  and the folder fsynced.

The finish: where each hook's rows lie (byte offsets) goes to ``layout.json``, ``cache.h5`` is
renamed ``finishing.h5``, its ``status`` set to ``complete`` (the one metadata write), and it is
renamed onto ``OUT`` (fsynced before that rename when durable). A kill during the finish can leave
``finishing.h5`` with damaged metadata; the next open rebuilds ``cache.h5`` from a fresh file and
the raw rows of ``finishing.h5`` (at ``layout.json``'s offsets), as the run file's writer does.
Every byte of activations is written once, and a file named ``OUT`` is always complete (after a
power cut only when durable).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np

from workbench.cache.file import activation_slot, write_rows
from workbench.store.durability import atomic_replace, fsync_path
from workbench.store.activations import ActivationSlot, copy_raw, read_layout
from workbench.store.durability import boot_id, libc_function, replace_durably, write_text_atomic
from workbench.store.format import COMMIT_INTERVAL_S, LAYOUT
from workbench.store.trust import open_contained

DATA, FINISHING, REPAIR = "cache.h5", "finishing.h5", "repair"
DONE = re.compile(r"^done-(\d+)-(\d+)(?:\.([0-9a-f]+))?$")


def is_durable(fsync: bool) -> bool:
    """Whether an export commits durably: when asked to (``--fsync``), and wherever the kernel gives
    no boot id (a provisional marker could not tell a restart from a kill there)."""
    return fsync or boot_id() is None


def marker_name(start: int, stop: int, boot: str | None) -> str:
    """The name recording batches ``start … stop-1`` as written: durable without ``boot``,
    provisional (counting while the machine's boot id is ``boot``) with it."""
    return f"done-{start:06d}-{stop:06d}" + (f".{boot}" if boot else "")


def _markers(folder: Path) -> list[tuple[int, int, str | None, Path]]:
    """Every ``done-`` name in ``folder`` as ``(start, stop, boot or None when durable, path)``."""
    out = []
    for path in folder.glob("done-*"):
        m = DONE.match(path.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), m.group(3), path))
    return out


def done_batches(folder: Path) -> set[int]:
    """The batches whose rows count as written in ``folder/cache.h5``: those of every durable
    ``done-A-B`` name and of every ``done-A-B.{boot}`` name written since this machine last started."""
    boot = boot_id()
    done: set[int] = set()
    for start, stop, written, _ in _markers(folder):
        if written is None or written == boot:
            done.update(range(start, stop))
    return done


SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file's dirty pages to the disk now, without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere nothing): the disk then works while
    the next batch is computed and copied, and the commit's fsync finds little left to write."""
    fn = libc_function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    if fn is not None:
        fn(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # a hint: its failure changes nothing the fsync does not


def _slots_of(path: Path) -> list[ActivationSlot]:
    """Where each hook's rows lie in an intact cache file (read only)."""
    with open_contained(path, locking=False) as f:
        return [activation_slot(f["activations"][h]) for h in json.loads(f.attrs["hooks"])]


def _make_markers_durable(folder: Path, data: Path) -> None:
    """Turn the provisional ``done`` names of this boot (a killed export's) into durable ones:
    fsync the file, rename each, fsync the folder (the names are empty: only their entries count)."""
    provisional = [(a, b, path) for a, b, written, path in _markers(folder) if written is not None]
    if not provisional:
        return
    fsync_path(data)
    for a, b, path in provisional:
        os.replace(path, folder / marker_name(a, b, None))
    fsync_path(folder)


def _layout_text(slots: Sequence[ActivationSlot]) -> str:
    return json.dumps([{"hook": s.hook, "shape": list(s.shape), "dtype": s.dtype, "segments": [list(x) for x in s.segments]}
                       for s in slots])


class PartialCache:
    """The cache file of one export while it is written. Use as a context manager.

    ``open`` creates it (or reopens an interrupted one, repairing a killed finish); ``write`` puts
    one batch's rows in place; ``finish`` makes it ``OUT``. ``batch_tokens[k]`` is the number of
    token rows of batch ``k``: batch ``k`` is rows ``Σ batch_tokens[:k]`` onwards."""

    def __init__(self, folder: Path, slots: list[ActivationSlot], batch_tokens: Sequence[int], durable: bool = False):
        self.folder = folder
        self.slots = slots
        self.batch_tokens = list(batch_tokens)
        self.starts = np.concatenate([[0], np.cumsum(self.batch_tokens)]).astype(np.int64)
        self.done = done_batches(folder)
        self._boot = boot_id()
        self.durable = is_durable(durable)
        self._fd = os.open(folder / DATA, os.O_RDWR)
        self._pending: list[int] = []
        self._last_commit = -float("inf")  # the first batch commits at once

    @classmethod
    def open(cls, folder: Path, batch_tokens: Sequence[int], create: Callable[[Path], list[ActivationSlot]],
             durable: bool = False) -> "PartialCache":
        """Open ``folder/cache.h5`` for writing; ``create(path)`` makes a fresh one at ``path``
        (:func:`workbench.cache.file.create_cache_file` with ``status="running"``). ``folder`` exists.
        ``durable``: commit with fsyncs and durable names (and make the batches a killed export
        of this boot left provisional durable now)."""
        for tmp in [*folder.glob("*.tmp"), *folder.glob("*.new")]:
            tmp.unlink()
        shutil.rmtree(folder / REPAIR, ignore_errors=True)
        boot = boot_id()
        for _, _, written, marker in _markers(folder):
            if written is not None and written != boot:
                marker.unlink()  # written before the machine restarted: its rows may not be on the disk
        data, finishing = folder / DATA, folder / FINISHING
        if finishing.exists() and (data.exists() or not done_batches(folder)):
            finishing.unlink()  # a repair finished but was killed before removing it, or nothing in it counts
        elif finishing.exists():  # a finish was killed: its metadata may be damaged, its rows are whole
            (folder / REPAIR).mkdir()
            fresh = create(folder / REPAIR / DATA)
            copy_raw(finishing, read_layout(folder), folder / REPAIR / DATA, fresh)
            replace_durably(folder / REPAIR / DATA, data)
            finishing.unlink()
            shutil.rmtree(folder / REPAIR)
        if data.exists() and done_batches(folder):
            slots = _slots_of(data)  # its creation counts with the first batch that counts
            if durable:
                _make_markers_durable(folder, data)
        else:  # nothing counts: whatever is there may not have reached the disk whole; start afresh
            for marker in folder.glob("done-*"):
                marker.unlink()
            try:
                slots = create(folder / (DATA + ".tmp"))
            except BaseException:
                (folder / (DATA + ".tmp")).unlink(missing_ok=True)  # a full disk: give its space back at once
                raise
            os.replace(folder / (DATA + ".tmp"), data)  # no fsync: a durable commit's fsyncs cover it
        return cls(folder, slots, batch_tokens, durable)

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
        counts as done at once (a provisional ``done`` name), or when durable once committed (at
        most every ``COMMIT_INTERVAL_S``, and by ``finish``/``close``)."""
        n = write_rows(self._fd, self.slots, int(self.starts[k]), arrays)
        if self.durable:
            start_writeback(self._fd)
        if n != self.batch_tokens[k] and self.slots:
            raise ValueError(f"batch {k} has {n} token rows, the plan {self.batch_tokens[k]}")
        self._pending.append(k)
        if not self.durable or time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S:
            self.commit()

    def commit(self) -> None:
        """Record every written batch as done, one ``done`` name per run of batches; when durable,
        fsync the file first and the folder after."""
        if not self._pending:
            return
        if self.durable:
            os.fsync(self._fd)
        runs: list[list[int]] = []
        for k in sorted(self._pending):
            if runs and runs[-1][1] == k:
                runs[-1][1] = k + 1
            else:
                runs.append([k, k + 1])
        for a, b in runs:
            name = marker_name(a, b, None if self.durable else self._boot)
            os.close(os.open(self.folder / name, os.O_CREAT | os.O_WRONLY, 0o644))
        if self.durable:
            fsync_path(self.folder)
        self.done.update(self._pending)
        self._pending = []
        self._last_commit = time.monotonic()

    def blocks(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(first_token_row, {hook: [n, *per_token]})`` of every batch, in order, read back."""
        with open_contained(self.folder / DATA, locking=False) as f:
            for k, n in enumerate(self.batch_tokens):
                lo = int(self.starts[k])
                yield lo, {s.hook: f["activations"][s.hook][lo : lo + n] for s in self.slots}

    def finish(self, out: Path) -> Path:
        """Every batch done: mark the file complete and rename it onto ``out`` (fsynced first when
        durable); the folder is removed."""
        self.commit()
        if self.missing:
            raise AssertionError(f"finish with batches {self.missing[:5]} not written")
        self.close()
        layout, finishing = self.folder / LAYOUT, self.folder / FINISHING
        if self.durable:
            write_text_atomic(layout, _layout_text(self.slots))  # for the repair of a killed finish
            replace_durably(self.folder / DATA, finishing)
        else:
            layout.write_text(_layout_text(self.slots))  # plain: counts only with this boot's markers
            os.replace(self.folder / DATA, finishing)
        with h5py.File(finishing, "r+", locking=False) as f:
            f.attrs["status"] = "complete"
        if self.durable:
            atomic_replace(finishing, out)
        else:
            os.replace(finishing, out)
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

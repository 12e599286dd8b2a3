"""The run file: one HDF5 file per run, written crash-safely batch by batch (layout and storage
design in docs/FORMAT.md).

HDF5 rewrites its metadata in place and has no journal, so a kill while HDF5 writes a file can
leave it unreadable; the writer therefore never lets the only copy of finished data depend on
HDF5 metadata. While a run is running it lives in a folder ``RUN.h5.parts/``:

- ``run.h5``: the root attributes and ``samples/``, written once;
- ``batch-{start}-{stop}[.{boot}].part``: everything but the activations of one batch (or of
  consecutive batches), ragged arrays and strings as flat arrays with lengths: the record of
  what is finished;
- ``activations.h5``: the run file to be. Created once with the header, every array at full size
  and the dimension scales; each batch's activations are written into their preallocated place
  with plain ``pwrite`` at byte offsets recorded in ``layout.json``, never through HDF5; the
  other arrays of finished batches are written in through HDF5 a few hundred rows at a time
  ("built"), and ``built.json`` parses exactly while the file is consistent (it is made
  unparseable before HDF5 writes and written again after the flush). A writer that finds no
  parseable ``built.json`` (a kill while HDF5 wrote) rebuilds the file from the raw activation
  bytes and the parts.

Every file is written under a temporary name and renamed into place, so a file that exists is
complete. A batch is finished exactly when its part exists: ``write_batch`` renames it into place
before it returns (a SIGKILL loses nothing, the page cache survives the process). fsync, needed
only against a power cut, is batched: at most once a second a commit fsyncs the activations and
writes the batches since the last commit as one durable (fsynced) part; provisional parts (named
with the kernel's boot id) count only until the machine restarts. When the last batch lands,
its rows are built in, ``status`` becomes ``complete``, and ``activations.h5`` is fsynced and
renamed to ``RUN.h5``. Readers: :class:`RunFile` opens ``RUN.h5``, or, for a running run, an
in-memory view of its finished parts.

This module imports neither torch nor TransformerLens, so a viewer opens a run in a fraction of
a second.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from workbench.errors import WorkbenchError
from workbench.store.activations import ActivationSlot, create_activations, distrust_built, read_built, read_layout, start_writeback, write_built, write_slot_rows
from workbench.store.build import copy_derived, settle, write_part_rows
from workbench.store.durability import boot_id, replace_durably, write_h5_atomic
from workbench.store.failed_writes import ABANDONED, FAILED_WRITES, write_errors
from workbench.store.format import ACTIVATIONS, BUILD_ROWS, BUILT, COMMIT_INTERVAL_S, HEADER, POSITIONS, STANDARD_ARRAYS, parts_dir, run_exists, staging_dir
from workbench.store.header import SampleTable, add_dimension_scales, fill_header, utc_now
from workbench.store.lock import RunLock
from workbench.store.parts import batch_parts, consecutive, covered, done_from_parts, merged_ranges, part_name, write_part
from workbench.store.ragged import LENGTHS, concat_batches, flatten_batch
from workbench.store.reader import open_run
from workbench.store.trust import open_contained

# Settings that must match for --resume to continue a file (everything that changes the numbers).
RESUME_KEYS = ("n_samples", "n_rounds", "model_path", "model_revision", "model_dtype", "task", "seed", "batch_size",
               "activation_dtype", "hooks", "layers", "data", "protocol")

# Settings a resume may change with a warning: the batches agree to float rounding, not bit for bit.
PLACEMENT_KEYS = ("device", "device_map", "lookup_decoding")


class PlacementChangedWarning(UserWarning):
    """A run resumed on another device, device map or decoding path (lookup on or off) than it started on."""


# --------------------------------------------------------------------------- the writer
class RunWriter:
    """Creates or resumes a run and writes batches into it. Use as a context manager.

    ``create``/``resume`` take the run's lock; ``write_batch`` makes one batch durable;
    ``finish`` assembles the run file once every batch is done.
    """

    def __init__(self, path: Path, folder: Path, lock: RunLock, replaces_old: bool = False, durable: bool = True):
        self.path = path
        self.durable = durable  # fsync (power-cut safety) as described; False: only a kill of the process is survived
        self.folder = folder  # the parts folder (the staging folder until an --overwrite's first batch)
        self.lock = lock
        self.replaces_old = replaces_old
        self._complete = folder is None
        if self._complete:
            with open_run(path, "r") as f:
                self.n_samples, self.n_options = int(f.attrs["n_samples"]), int(f.attrs["n_options"])
            self.slots: list[ActivationSlot] = []
            self._fd = -1
            self._h5, self._datasets = None, {}
            self._committer, self._commit_future = None, None
            return
        with h5py.File(folder / HEADER, "r", locking=False) as h:
            self.n_samples, self.n_options = int(h.attrs["n_samples"]), int(h.attrs["n_options"])
            self.n_rounds = int(h.attrs["n_rounds"])
        self.slots = read_layout(folder)
        built = read_built(folder)
        if built is None:
            raise AssertionError(f"{folder}: {ACTIVATIONS} is not settled (no {BUILT})")
        self._built = built
        self._fd = os.open(folder / ACTIVATIONS, os.O_RDWR)
        self._h5: h5py.File | None = None  # activations.h5 through HDF5, opened at the first build
        self._datasets: dict[str, h5py.Dataset] = {}  # its datasets by path
        self._pending: list[tuple[int, int, dict[str, np.ndarray]]] = []  # finished since the last durable commit
        self._committer: ThreadPoolExecutor | None = None  # runs durable commits beside the caller
        self._commit_future: Future | None = None
        # finished batches whose rows are not in activations.h5 yet: (start, stop, arrays or their part's path)
        self._unbuilt: list[tuple[int, int, dict[str, np.ndarray] | Path]] = [
            (a, b, part) for a, b, part in batch_parts(folder) if not covered(built, a, b)]
        self._last_commit = -math.inf  # the first batch commits at once
        self._last_build = time.monotonic()  # rows are built in once BUILD_ROWS or COMMIT_INTERVAL_S have gathered
        self._boot = boot_id()

    # --------------------------------------------------------------------- open
    @classmethod
    def create(
        cls,
        path: Path,
        settings: dict[str, Any],
        samples: SampleTable,
        n_rounds: int,
        hook_shapes: dict[str, tuple[int, int]],
        activation_dtype: str = "float32",
        overwrite: bool = False,
        durable: bool = True,
    ) -> "RunWriter":
        """Start a new run at ``path``. hook_shapes: hook → (n_layers, d_model).

        With ``overwrite`` an existing run is replaced only once the new run's first batch is
        finished (until then it stays readable, and a failure leaves it as it was). ``durable``
        False (``workbench run --no-fsync``): nothing waits for the disk; a kill of the process
        still loses nothing finished, a power cut (or kernel crash) loses the batches since the
        start (they are recomputed) and can damage a run file finished in the last ~30 s."""
        path = Path(path)
        with write_errors(path, "creating"):
            path.parent.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(path)
        try:
            with write_errors(path, "creating"):
                settle(path)
                exists = run_exists(path)
                if exists and not overwrite:
                    raise WorkbenchError(f"{path} already exists (use --resume to continue it, or --overwrite)")
                folder = staging_dir(path) if exists else parts_dir(path)
                shutil.rmtree(staging_dir(path), ignore_errors=True)
                if not exists:
                    shutil.rmtree(folder, ignore_errors=True)  # a creation that was killed before its header landed
                folder.mkdir()
                n = len(samples.index)
                shapes = {h: (n, n_rounds, len(POSITIONS), nl, d) for h, (nl, d) in hook_shapes.items()}
                layers = settings.get("layers", list(range(next(iter(hook_shapes.values()))[0] if hook_shapes else 0)))
                layers_json = layers if isinstance(layers, str) else json.dumps(layers)
                run_id, created = uuid.uuid4().hex, utc_now()

                def header(f: h5py.File) -> None:
                    fill_header(f, settings, samples, n_rounds, run_id, created)

                create_activations(folder, shapes, activation_dtype, layers_json, header)
                write_h5_atomic(folder / HEADER, header)  # last: its existence means "the run exists"
            return cls(path, folder, lock, replaces_old=exists, durable=durable)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def resume(cls, path: Path, settings: dict[str, Any], durable: bool = True) -> "RunWriter":
        """Reopen an unfinished (or finished) run for writing, after checking it was made with the
        same settings; ``durable`` as for :meth:`create`."""
        path = Path(path)
        if not run_exists(path):
            raise WorkbenchError(f"--resume: {path} does not exist")
        lock = RunLock.acquire(path)
        try:
            with write_errors(path, "resuming"):
                settle(path)
            if path.exists():
                with open_run(path, "r") as f:
                    _check_settings(path, f.attrs, settings)
                    if f.attrs.get("status") != "complete":
                        raise WorkbenchError(f"{path} was written by an older workbench (schema 1) and is not "
                                             "complete; it cannot be resumed: run it again with --overwrite")
                return cls(path, None, lock)
            header = parts_dir(path) / HEADER
            if not header.exists():  # the creation was killed before the run existed
                raise WorkbenchError(f"--resume: {path} does not exist")
            with open_contained(header, locking=False) as h:  # its samples/ are copied into the run: nothing from outside
                _check_settings(path, h.attrs, settings)
                _warn_if_moved(path, h.attrs, settings)
            return cls(path, parts_dir(path), lock, durable=durable)
        except BaseException:
            lock.release()
            raise

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Commit what was written (unless that fails too), release the file and the lock."""
        try:
            if self._fd >= 0:
                self.commit(wait=True)
        except WorkbenchError:
            pass  # already failing (e.g. a full disk): the uncommitted batches are recomputed on --resume
        if self._committer is not None:
            self._committer.shutdown()
            self._committer = None
        if self._h5 is not None:
            if self.path in FAILED_WRITES:  # HDF5 can crash closing a file whose write failed: leave it open
                ABANDONED.append(self._h5)
            else:
                self._h5.close()  # what it holds since the last build is not counted (no built.json says so)
            self._h5, self._datasets = None, {}
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.lock.release(remove=self._complete)

    # --------------------------------------------------------------------- write
    def done_mask(self) -> np.ndarray:
        """``[N]`` bool: which samples are complete."""
        if self._complete:
            return np.ones(self.n_samples, dtype=bool)
        with write_errors(self.path):
            self._wait_commit()  # it renames and removes parts
        return done_from_parts(self.folder, self.n_samples)

    def write_batch(self, start: int, arrays: dict[str, Any], activations: dict[str, np.ndarray], transcripts: list[list[int]]) -> None:
        """Write rows ``start : start + B`` of every array; when it returns the batch is finished
        (a SIGKILL from then on loses nothing of it).

        arrays: name → ``[B, R, ...]`` (numpy, or nested lists for ``response_token_ids``,
        ``token_entropy``, ``instruction`` and ``response``). Unknown names are task fields.
        activations: hook → ``[B, R, P, L, d]``. transcripts: ``[B][tokens]``.

        The activations go straight to their place in the file, the other arrays into a part file
        renamed into place: provisional (not fsynced, trusted until the machine restarts).
        Durability against a power cut costs fsyncs, so it is batched and runs in a thread: at most
        every ``COMMIT_INTERVAL_S`` seconds (and by ``finish``/``close``) a commit fsyncs the
        activations and writes the batches since the last commit as one fsynced part. The rows are
        built into the run file to be every ``BUILD_ROWS`` rows or ``COMMIT_INTERVAL_S``.
        """
        if self._complete:
            raise WorkbenchError(f"{self.path} is complete; nothing to write")
        batch = len(transcripts)
        stop = start + batch
        if self._pending and self._pending[-1][1] != start:
            self.commit()  # a part covers consecutive rows only
        with write_errors(self.path):
            for slot in self.slots:
                acts = np.ascontiguousarray(activations[slot.hook], dtype=slot.dtype)
                if acts.shape != (batch, *slot.shape[1:]):
                    raise ValueError(f"activations/{slot.hook}: batch shape {acts.shape}, expected {(batch, *slot.shape[1:])}")
                write_slot_rows(self._fd, slot, start, acts)
                if self.durable:
                    start_writeback(self._fd, slot, start, stop)
            part = flatten_batch(arrays, transcripts, self.n_rounds)
            self._check_shapes(part, batch)
            if self._boot is None or self.replaces_old:  # nothing can be provisional: commit now
                self._pending.append((start, stop, part))
                self.commit(wait=True)
            else:
                write_part(self.folder / part_name(start, stop, self._boot), part, durable=False)
                if self.durable:
                    self._pending.append((start, stop, part))
                    if time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S:
                        self.commit()
            self._unbuilt.append((start, stop, part))
            if (sum(b - a for a, b, _ in self._unbuilt) >= BUILD_ROWS
                    or time.monotonic() - self._last_build >= COMMIT_INTERVAL_S):
                self._build()

    def _check_shapes(self, part: dict[str, np.ndarray], batch: int) -> None:
        """Refuse a batch whose standard arrays do not have the run's shape ``[B, R, K, ...]``."""
        for path, (tail, _) in STANDARD_ARRAYS.items():
            key = path if path in part else path + LENGTHS
            if key in part:
                want = (batch, *(self.n_rounds if d == "R" else self.n_options if d == "K" else d for d in tail))
                if part[key].shape != want:
                    raise ValueError(f"{path}: batch shape {part[key].shape}, the run's is {want}")

    def _build(self) -> None:
        """Write the finished batches' rows into ``activations.h5`` (the run file to be) through
        HDF5. HDF5 rewrites its metadata in place, so ``built.json`` is made unparseable first and
        written again after the flush: a kill in between leaves no trusted record, and the next
        writer rebuilds the file from the parts (which stay the record of what is finished) and the
        raw activations."""
        if not self._unbuilt:
            return
        distrust_built(self.folder)
        if self._h5 is None:
            self._h5 = h5py.File(self.folder / ACTIVATIONS, "r+", locking=False)
        created: list[str] = []
        for start, stop, arrays in consecutive(self._unbuilt):
            created += write_part_rows(self._h5, start, arrays, self._datasets)
            self._built.append((start, stop))
        if created:
            add_dimension_scales(self._h5, created)
        self._h5.flush()
        if self._boot is None:
            os.fsync(self._fd)  # no boot id to date the record by: it must be durable
        self._built = merged_ranges(self._built)
        write_built(self.folder, self._built, durable=False)
        self._unbuilt = []
        self._last_build = time.monotonic()

    def commit(self, wait: bool = False) -> None:
        """Make every batch finished since the last commit durable (against a power cut too): fsync
        the activations, write the batches' other arrays as one part (fsynced, renamed into place,
        the rename fsynced), then remove their provisional parts. Those are in place already, so
        unless ``wait`` the commit runs in a thread while the caller goes on (an fsync waits for
        the disk, not the processor); one commit at a time, and its failure is raised by the next
        call that writes."""
        with write_errors(self.path):
            self._wait_commit()
            if not self._pending:
                return
            pending, self._pending = self._pending, []
            self._last_commit = time.monotonic()
            if wait or self.replaces_old or self._boot is None:
                self._commit_now(pending)
            else:
                if self._committer is None:
                    self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-commit")
                self._commit_future = self._committer.submit(self._commit_now, pending)

    def _wait_commit(self) -> None:
        """Wait for the commit running in the thread (raising what it raised)."""
        future, self._commit_future = self._commit_future, None
        if future is not None:
            future.result()

    def _commit_now(self, pending: list[tuple[int, int, dict[str, np.ndarray]]]) -> None:
        start, stop = pending[0][0], pending[-1][1]
        os.fsync(self._fd)
        write_part(self.folder / part_name(start, stop), concat_batches([p[2] for p in pending]), durable=True)
        if self.replaces_old:
            self._take_over()
        for a, b, _ in pending if self._boot else ():
            (self.folder / part_name(a, b, self._boot)).unlink(missing_ok=True)

    def _take_over(self) -> None:
        """``--overwrite``: the new run has a finished batch, so now (and only now) it replaces the old one."""
        parts, old = parts_dir(self.path), self.path.with_name(self.path.name + ".parts.old")
        if self.path.exists():
            self.path.unlink()
        if parts.exists():
            os.replace(parts, old)
        replace_durably(self.folder, parts)
        shutil.rmtree(old, ignore_errors=True)
        self.folder, self.replaces_old = parts, False

    def finish(self) -> None:
        """Finish the run file once every sample is done (otherwise commit: the parts stay): build
        the last rows in, mark it complete, fsync it (which makes the last provisional batches
        durable, so no commit precedes it) and rename it to the run's path."""
        if self._complete:
            return
        with write_errors(self.path):
            self._wait_commit()  # it renames and removes parts in the folder read here
        if not self.done_mask().all():
            self.commit()
            return
        with write_errors(self.path, "assembling"):
            self._build()
            distrust_built(self.folder)
            if self._h5 is None:
                self._h5 = h5py.File(self.folder / ACTIVATIONS, "r+", locking=False)
            f = self._h5
            f.require_group("progress").create_dataset("done", data=np.ones(self.n_samples, dtype=np.uint8))
            copy_derived(f, self.folder)
            f.attrs["status"] = "complete"
            f.attrs["finished"] = utc_now()
            f.close()  # on a failure, close() leaves it open (see there)
            self._h5, self._datasets = None, {}
            if self.durable:
                os.fsync(self._fd)  # every batch, provisional ones too, is now durable
                replace_durably(self.folder / ACTIVATIONS, self.path)
            else:
                os.replace(self.folder / ACTIVATIONS, self.path)
            shutil.rmtree(self.folder)
        self._pending = []
        os.close(self._fd)
        self._fd = -1
        self._complete = True


def _setting_pair(attrs: Any, settings: dict[str, Any], key: str) -> tuple[Any, Any]:
    """``(the file's value, the value now)`` of setting ``key``, as the root attributes store them
    (lists and dicts as JSON)."""
    want = settings[key]
    want = want if isinstance(want, (str, int, float, bool)) else json.dumps(want)
    have = attrs.get(key)
    return (have.item() if isinstance(have, np.generic) else have), want


def _check_settings(path: Path, attrs: Any, settings: dict[str, Any]) -> None:
    """Refuse a resume whose ``settings`` differ from the file's in one of ``RESUME_KEYS``."""
    for key in RESUME_KEYS:
        if key not in settings:
            continue
        have, want = _setting_pair(attrs, settings, key)
        if have != want:
            detail = f" ({have} in the file, {want} now)" if len(str(have)) + len(str(want)) < 80 else ""
            raise WorkbenchError(f"--resume: {path} was made with a different {key}{detail}")


def _warn_if_moved(path: Path, attrs: Any, settings: dict[str, Any]) -> None:
    """Warn (:class:`PlacementChangedWarning`) when an unfinished run resumes with another
    placement (``PLACEMENT_KEYS``) than the file records (the one it started with)."""
    moved = []
    for key in PLACEMENT_KEYS:
        if key in settings and key in attrs:
            have, want = _setting_pair(attrs, settings, key)
            if have != want:
                moved.append(f"{key} {have} → {want}" if len(str(have)) + len(str(want)) < 60 else f"another {key}")
    if moved:
        warnings.warn(f"--resume: {path} started with another placement or decoding path and continues with {', '.join(moved)}: "
                      "the batches from before and after agree to float rounding, not bit for bit (a greedy "
                      "near-tie can go the other way)", PlacementChangedWarning, stacklevel=3)

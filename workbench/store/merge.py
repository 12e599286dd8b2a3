"""Merging the shards of a data-parallel run into one run file (docs/FORMAT.md, "Shards and merge").

Every shard is an ordinary finished run file (``RUN.h5.shards/shard-KKK-of-NNN.h5``, see
:mod:`workbench.store.shard`); the merge reads only that public format with h5py and writes ``RUN.h5``
as a single-process run over the same samples would have it: every array of ``samples/``,
``rounds/``, ``tokens/``, ``transcripts/`` and ``activations/`` equal, options padded to the widest
shard, the same dimension scales. ``activations/*`` are HDF5 virtual datasets reading the shard
files by relative path (no copy), or copies with ``copy=True``. The file is written under a
temporary name, fsynced and renamed, holding the merged path's lock (:class:`store.RunLock`).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from workbench.errors import WorkbenchError
from workbench.store.shard import SHARD_FILE, ShardPlan, shard_path, shards_dir
from workbench.store.durability import fsync_path, os_reason
from workbench.store.failed_writes import skip_hdf5_teardown
from workbench.store.format import FORMAT, run_exists
from workbench.store.header import add_dimension_scales
from workbench.store.lock import RunLock
from workbench.store.reader import decoded_attrs
from workbench.store.trust import check_contained, open_contained

# Root attributes that differ between the shards of one run; every other one must be equal.
PER_SHARD = frozenset({"created", "finished", "run_id", "n_samples", "n_options", "device", "command_line", "shard", "status"})
ROW_GROUPS = ("samples", "rounds", "tokens", "transcripts")  # copied row by row; activations/ and progress/ are built
CORE_GROUPS = (*ROW_GROUPS, "activations", "progress")
# Arrays with an options axis, padded to the widest shard's K as a single-process run pads: (axis, fill).
PADDED = {"samples/options": (1, ""), "rounds/option_probs": (2, np.nan)}
SCALE_ATTRS = frozenset({"DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME", "_Netcdf4Dimid", "_Netcdf4Coordinates"})
COPY_BLOCK_BYTES = 64 << 20  # --copy moves activations in blocks of about this many bytes


@dataclass(frozen=True)
class ShardState:
    """One shard of the plan: ``state`` is ``complete``, ``running`` (a writer holds its lock:
    ``pid``), ``unfinished`` (parts but no writer: killed or stopped) or ``missing``."""

    index: int
    path: Path
    state: str
    pid: str = ""


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_run` or :func:`merge_when_complete` did: ``action`` is ``merged``,
    ``up to date`` (the file already merges these shards) or ``waiting`` (shards not complete yet)."""

    path: Path
    action: str
    count: int
    n_samples: int = 0
    virtual: bool = True
    waiting_for: tuple[ShardState, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def message(self) -> str:
        """One line for a person."""
        if self.action == "waiting":
            return (f"waiting for the other shards ({_describe(self.waiting_for, self.count)}): the last shard to finish "
                    f"merges all {self.count} into {self.path} (or run `workbench merge {self.path}` once they are done)")
        how = (f"its activations are virtual datasets reading {shards_dir(self.path).name}/: keep that folder beside it, "
               "or `workbench merge --copy` for a self-contained file") if self.virtual else "activations copied (self-contained)"
        head = (f"merged {self.count} shard{'s' if self.count != 1 else ''} ({self.n_samples} samples) into {self.path}; {how}"
                if self.action == "merged" else f"{self.path} already merges these {self.count} shards; {how}")
        return "; ".join([head, *self.notes])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def writer_pid(run: Path) -> str | None:
    """The pid of the process writing ``run`` (holding ``RUN.h5.lock``), or None when none is."""
    lock = run.with_name(run.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def shard_count(run: Path) -> int:
    """The number of shards in ``RUN.h5.shards`` (from the file names); one line when there are
    none, or shards of plans with different counts."""
    folder = shards_dir(run)
    if not folder.is_dir():
        raise WorkbenchError(f"cannot merge {run}: {folder} does not exist (write shards with "
                             f"`workbench run --shard K/N --out {run}` or under torchrun)")
    counts: dict[int, list[str]] = {}
    for entry in folder.iterdir():
        m = SHARD_FILE.match(entry.name.split(".h5", 1)[0] + ".h5")
        if m:
            counts.setdefault(int(m.group(2)), []).append(entry.name)
    if not counts:
        raise WorkbenchError(f"cannot merge {run}: {folder} holds no shards (shard-KKK-of-NNN.h5)")
    if len(counts) > 1:
        plans = ", ".join(f"{n} ({sorted(names)[0]} …)" for n, names in sorted(counts.items()))
        raise WorkbenchError(f"cannot merge {run}: {folder} holds shards of plans with different numbers of shards: "
                             f"{plans}; remove the stale ones")
    return next(iter(counts))


def shard_states(run: Path, count: int) -> list[ShardState]:
    """The state of every shard of a ``count``-shard plan of ``run``."""
    states = []
    for k in range(count):
        path = shard_path(run, k, count)
        pid = writer_pid(path)
        if pid is not None:
            states.append(ShardState(k, path, "running", pid))
        elif path.exists():
            states.append(ShardState(k, path, "complete"))
        elif run_exists(path):
            states.append(ShardState(k, path, "unfinished"))
        else:
            states.append(ShardState(k, path, "missing"))
    return states


def _describe(states: tuple[ShardState, ...] | list[ShardState], count: int) -> str:
    """``of 8 shards, 3 and 5 are missing, 2 is still running (pid 12)``."""
    parts = []
    for state, words in (("missing", "missing"), ("running", "still running"), ("unfinished", "unfinished (stopped or killed: continue it with --resume)")):
        ks = [s for s in states if s.state == state]
        if not ks:
            continue
        names = [f"{s.index} (pid {s.pid})" if s.pid else str(s.index) for s in ks]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        parts.append(f"{listed} {'is' if len(ks) == 1 else 'are'} {words}")
    return f"of {count} shards, " + ", ".join(parts)


# --------------------------------------------------------------------------- checking the shards
@dataclass
class _Shard:
    index: int
    path: Path
    f: h5py.File
    plan: ShardPlan
    attrs: dict[str, Any]


def _check_shard(run: Path, s: ShardState, f: h5py.File, count: int) -> _Shard:
    where = f"cannot merge {run}: shard {s.index} ({s.path})"
    attrs = decoded_attrs(f.attrs)
    if attrs.get("format") != FORMAT:
        raise WorkbenchError(f"{where} is not a workbench run file")
    if attrs.get("status") != "complete" or "progress" not in f:
        raise WorkbenchError(f"{where} is not complete")
    if not isinstance(attrs.get("shard"), dict):
        raise WorkbenchError(f"{where} has no shard plan (it was not written with --shard or under torchrun)")
    try:
        plan = ShardPlan.from_json(attrs["shard"])
    except (KeyError, TypeError, ValueError):
        raise WorkbenchError(f"{where} has a damaged shard plan") from None
    if (plan.index, plan.count) != (s.index, count):
        raise WorkbenchError(f"{where} says it is shard {plan.index} of {plan.count} (a renamed file?)")
    if int(attrs.get("n_samples", -1)) != plan.stop - plan.start:
        raise WorkbenchError(f"{where} holds {attrs.get('n_samples')} samples, its plan {plan.stop - plan.start}")
    return _Shard(s.index, s.path, f, plan, attrs)


def _open_shards(run: Path, states: list[ShardState]) -> list[_Shard]:
    """Open every (complete) shard read-only and check that they belong together: the same plan
    and the same root attributes but for :data:`PER_SHARD`. The caller closes them."""
    files: list[h5py.File] = []
    try:
        shards = []
        for s in states:
            try:
                files.append(h5py.File(s.path, "r", locking=False))
            except OSError as e:
                raise WorkbenchError(f"cannot merge {run}: shard {s.index} ({s.path}) is not a readable HDF5 file "
                                     f"({str(e).splitlines()[0][:100]})") from None
            check_contained(files[-1], s.path)
            shards.append(_check_shard(run, s, files[-1], len(states)))
        first = shards[0]
        for s in shards[1:]:
            where = f"cannot merge {run}: shard {s.index} ({s.path}) is from another run"
            if {**s.plan.to_json(), "index": 0} != {**first.plan.to_json(), "index": 0}:
                raise WorkbenchError(f"{where}: its shard plan differs from shard {first.index}'s "
                                     f"({s.plan.n_samples} vs {first.plan.n_samples} samples, batch size "
                                     f"{s.plan.batch_size} vs {first.plan.batch_size}, data {s.plan.fingerprint} vs {first.plan.fingerprint})")
            for key in sorted(set(s.attrs) | set(first.attrs)):
                if key not in PER_SHARD and s.attrs.get(key) != first.attrs.get(key):
                    raise WorkbenchError(f"{where}: its {key} differs from shard {first.index}'s")
    except BaseException:
        for f in files:
            f.close()
        raise
    return shards


def _datasets(group: h5py.Group) -> list[str]:
    """The arrays of a group (not the dimension scales that label their axes)."""
    return sorted(name for name, obj in group.items() if isinstance(obj, h5py.Dataset) and not h5py.h5ds.is_scale(obj.id))


def _read(ds: h5py.Dataset) -> np.ndarray:
    return ds.asstr()[...] if h5py.check_string_dtype(ds.dtype) is not None else ds[...]


def _pad(name: str, data: np.ndarray, k: int) -> np.ndarray:
    axis, fill = PADDED[name]
    if data.shape[axis] == k:
        return data
    shape = list(data.shape)
    shape[axis] = k
    out = np.full(shape, fill, dtype=data.dtype)
    out[(slice(None),) * axis + (slice(0, data.shape[axis]),)] = data
    return out


def _copy_attrs(src: h5py.AttributeManager, dst: h5py.AttributeManager) -> None:
    for key, value in src.items():
        if key not in SCALE_ATTRS:
            dst[key] = value


def _write_rows(dst: h5py.File, run: Path, shards: list[_Shard], k: int) -> None:
    """``samples/``, ``rounds/``, ``tokens/``, ``transcripts/``: every shard's rows, in shard order."""
    for group in ROW_GROUPS:
        names = _datasets(shards[0].f[group]) if group in shards[0].f else []
        for s in shards[1:]:
            other = _datasets(s.f[group]) if group in s.f else []
            if other != names:
                extra = sorted(set(names) ^ set(other))
                raise WorkbenchError(f"cannot merge {run}: shard {s.index} has different arrays in {group}/ ({', '.join(extra)})")
        for name in names:
            path = f"{group}/{name}"
            parts = [_read(s.f[path]) for s in shards]
            if path in PADDED:
                parts = [_pad(path, p, k) for p in parts]
            for s, p in zip(shards[1:], parts[1:]):
                if p.shape[1:] != parts[0].shape[1:]:
                    raise WorkbenchError(f"cannot merge {run}: {path} is {list(p.shape[1:])} per sample in shard {s.index}, "
                                         f"{list(parts[0].shape[1:])} in shard {shards[0].index}")
            src = shards[0].f[path]
            ds = dst.require_group(group).create_dataset(name, data=np.concatenate(parts), dtype=src.dtype)
            _copy_attrs(src.attrs, ds.attrs)


def _write_activations(dst: h5py.File, run: Path, shards: list[_Shard], n: int, copy: bool) -> None:
    """``activations/{hook}``: a virtual dataset over the shards' (relative paths), or a copy."""
    group = dst.require_group("activations")
    first = shards[0].f
    hooks = _datasets(first["activations"]) if "activations" in first else []
    for hook in hooks:
        path = f"activations/{hook}"
        srcs = []
        for s in shards:
            if path not in s.f:
                raise WorkbenchError(f"cannot merge {run}: shard {s.index} has no {path}")
            ds = s.f[path]
            if ds.shape[1:] != first[path].shape[1:] or ds.dtype != first[path].dtype:
                raise WorkbenchError(f"cannot merge {run}: {path} is {ds.dtype} {list(ds.shape[1:])} in shard {s.index}, "
                                     f"{first[path].dtype} {list(first[path].shape[1:])} in shard {shards[0].index}")
            srcs.append(ds)
        tail, dtype = first[path].shape[1:], first[path].dtype
        if copy:
            out = group.create_dataset(hook, shape=(n, *tail), dtype=dtype, chunks=(1, *tail) if n else None)
            row_bytes = max(1, int(np.prod(tail)) * dtype.itemsize)
            step = max(1, COPY_BLOCK_BYTES // row_bytes)
            for s, ds in zip(shards, srcs):
                for lo in range(0, ds.shape[0], step):
                    hi = min(ds.shape[0], lo + step)
                    out[s.plan.start + lo : s.plan.start + hi] = ds[lo:hi]
        else:
            layout = h5py.VirtualLayout(shape=(n, *tail), dtype=dtype)
            for s, ds in zip(shards, srcs):
                name = os.path.relpath(s.path, run.parent)
                layout[s.plan.start : s.plan.stop] = h5py.VirtualSource(name, path, shape=ds.shape, dtype=dtype)
            out = group.create_virtual_dataset(hook, layout, fillvalue=np.nan if dtype.kind == "f" else 0)
        _copy_attrs(first[path].attrs, out.attrs)
    if "activations" in first:
        _copy_attrs(first["activations"].attrs, group.attrs)


def _root_attrs(dst: h5py.File, run: Path, shards: list[_Shard], n: int, k: int, copy: bool) -> None:
    for key, value in shards[0].f.attrs.items():
        if key not in PER_SHARD:
            dst.attrs[key] = value
    dst.attrs["status"] = "complete"
    dst.attrs["run_id"] = uuid.uuid4().hex
    dst.attrs["created"] = min(str(s.attrs.get("created", "")) for s in shards)
    dst.attrs["finished"] = _now()
    dst.attrs["n_samples"] = n
    dst.attrs["n_options"] = k
    dst.attrs["command_line"] = str(shards[0].attrs.get("command_line", ""))
    devices = sorted({str(s.attrs.get("device", "")) for s in shards})
    dst.attrs["device"] = ",".join(devices)
    dst.attrs["merged_from"] = json.dumps({
        "activations": "copy" if copy else "virtual",
        "plan": {**shards[0].plan.to_json(), "index": None},
        "shards": [{"file": os.path.relpath(s.path, run.parent), "run_id": str(s.attrs.get("run_id", "")),
                    "rows": [s.plan.start, s.plan.stop], "device": str(s.attrs.get("device", ""))} for s in shards],
    })


def _derived_groups(f: h5py.File) -> list[str]:
    return sorted(name for name in f if name not in CORE_GROUPS and isinstance(f[name], h5py.Group))


def _existing_merge(run: Path, overwrite: bool) -> dict[str, Any] | None:
    """The ``merged_from`` of an existing ``RUN.h5`` (None when there is none); refuses a file
    that is not a merge unless ``overwrite``."""
    if not run.exists():
        if run_exists(run):
            raise WorkbenchError(f"cannot merge into {run}: a single-process run of that name is in progress or "
                                 f"unfinished ({run.name}.parts); finish or remove it first")
        return None
    if run.is_dir():
        raise WorkbenchError(f"cannot merge into {run}: it is a folder")
    try:
        with h5py.File(run, "r", locking=False) as f:
            merged = decoded_attrs(f.attrs).get("merged_from")
    except OSError:
        merged = None
    if isinstance(merged, dict):
        return merged
    if not overwrite:
        raise WorkbenchError(f"{run} exists and is not a merge of its shards (a single-process run?); "
                             "remove it first, or pass --overwrite")
    return None


def check_merge_target(run: Path, overwrite: bool) -> None:
    """Before a sharded run starts (no model loaded yet): refuse when ``RUN.h5`` is something the
    final merge would not replace (see :func:`merge_run`). Raises WorkbenchError."""
    _existing_merge(Path(run), overwrite)


# --------------------------------------------------------------------------- merging
def _merge_locked(run: Path, count: int, copy: bool, overwrite: bool) -> MergeResult:
    states = shard_states(run, count)
    if any(s.state != "complete" for s in states):
        raise WorkbenchError(f"cannot merge {run}: {_describe(states, count)}")
    existing = _existing_merge(run, overwrite)
    shards = _open_shards(run, states)
    try:
        ids = [str(s.attrs.get("run_id", "")) for s in shards]
        same = existing is not None and [d.get("run_id") for d in existing.get("shards", [])] == ids
        n = shards[-1].plan.stop
        if same and (not copy or existing.get("activations") == "copy"):
            return MergeResult(run, "up to date", count, n, existing.get("activations") != "copy")
        notes = [f"shard {s.index}'s {', '.join(g + '/' for g in _derived_groups(s.f))} not merged (track probes on the merged file)"
                 for s in shards if _derived_groups(s.f)]
        k = max(int(s.attrs.get("n_options", 0)) for s in shards)
        tmp = run.with_name(run.name + ".merge.tmp")
        tmp.unlink(missing_ok=True)
        try:
            with h5py.File(tmp, "w", locking=False) as f:
                _root_attrs(f, run, shards, n, k, copy)
                _write_rows(f, run, shards, k)
                f.require_group("progress").create_dataset("done", data=np.ones(n, dtype=np.uint8))
                _write_activations(f, run, shards, n, copy)
                add_dimension_scales(f)
                if run.exists():
                    with open_contained(run, shards_folder=shards_dir(run), locking=False) as old:
                        for group in _derived_groups(old):
                            if same:
                                old.copy(old[group], f, group)
                            else:
                                notes.append(f"dropped {group}/ of the old {run.name} (its shards changed: compute it again)")
            fsync_path(tmp)
            os.replace(tmp, run)
            fsync_path(run.parent, directory=True)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            skip_hdf5_teardown()
            raise WorkbenchError(f"writing {run} failed: {os_reason(e)}; the shards are unchanged") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return MergeResult(run, "merged", count, n, not copy, notes=tuple(notes))
    finally:
        for s in shards:
            s.f.close()


def merge_run(run: Path, copy: bool = False, overwrite: bool = False) -> MergeResult:
    """Merge ``RUN.h5.shards/*`` into ``run`` (``workbench merge``). Refuses in one line when a
    shard is missing, running or unfinished, when the shards are not of one run, or when ``run``
    exists and is not a merge (unless ``overwrite``). A ``run`` that already merges exactly these
    shards is left alone (``up to date``) unless ``copy`` asks for a self-contained file where it
    has virtual datasets; rewriting it keeps its derived groups (``probes/``, ``analysis/``)."""
    run = Path(run)
    count = shard_count(run)
    lock = RunLock.acquire(run)
    try:
        return _merge_locked(run, count, copy, overwrite)
    finally:
        lock.release(remove=True)


def _acquire_waiting(run: Path, wait_s: float) -> RunLock | None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return RunLock.acquire(run)
        except WorkbenchError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)


def merge_when_complete(run: Path, count: int, overwrite: bool = False, wait_s: float = 600.0) -> MergeResult:
    """Called by a shard's process once its own shard is complete (and its lock released): under
    the merged path's lock, merge if every shard of the ``count``-shard plan is complete, else say
    which ones it waits for (``waiting``). The ranks need no communication: whichever finishes last
    sees every shard complete. Waits up to ``wait_s`` for a lock another rank holds."""
    run = Path(run)
    lock = _acquire_waiting(run, wait_s)
    if lock is None:
        raise WorkbenchError(f"{run} stayed locked by another process for {wait_s:.0f} s; merge later with `workbench merge {run}`")
    try:
        states = shard_states(run, count)
        if any(s.state != "complete" for s in states):
            return MergeResult(run, "waiting", count, waiting_for=tuple(states))
        return _merge_locked(run, count, False, overwrite)
    finally:
        lock.release(remove=True)

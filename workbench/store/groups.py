"""Derived groups: results written into a finished run after it ran (``probe track``, ``probe stereotype``,
``analyze``), each replacing one group atomically and crash-safely."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from workbench.errors import WorkbenchError
from workbench.store.trust import refuse_symlinks
from workbench.store.build import settle
from workbench.store.durability import fsync_path, replace_durably, write_h5_atomic
from workbench.store.failed_writes import write_errors
from workbench.store.format import HEADER, STR, parts_dir
from workbench.store.lock import RunLock
from workbench.store.reader import check_run_attrs

# --------------------------------------------------------------------------- derived results
GROUP_NAME = re.compile(r"^[^/\x00]+$")  # one HDF5 path component


def replace_group(path: Path, group: str, datasets: dict[str, np.ndarray], attrs: dict[str, Any],
                  dataset_attrs: dict[str, dict[str, Any]] | None = None) -> None:
    """Write derived results (probe scores, analyses) into ``group`` of a run, replacing any earlier
    version of it. A dataset name may hold ``/`` (``metrics/accuracy``: a subgroup). Values of
    ``attrs`` and ``dataset_attrs`` (dataset name → attributes) that are dicts or lists are stored as JSON.

    The run file is never modified in place: a copy with the new group is written, fsynced and
    renamed over it, so a failure or kill leaves the run exactly as it was or with the complete new
    group. On a run that is not finished the group goes into a derived part that the assembly and
    the running view include."""
    path = Path(path)
    leaf = group.rsplit("/", 1)[-1]
    if not GROUP_NAME.match(leaf) or leaf in (".", "..") or any(not GROUP_NAME.match(p) or p in (".", "..") for name in datasets for p in name.split("/")):
        raise WorkbenchError(f"{leaf!r} cannot name a group in a run file (it must be non-empty, without '/', and not '.' or '..')")
    prepared = {}
    for name, value in datasets.items():
        value = np.asarray(value)
        prepared[name] = (value, STR if value.dtype == object else value.dtype)
    def encode(values: dict[str, Any]) -> dict[str, Any]:
        return {k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else v for k, v in values.items()}

    encoded = encode(attrs)
    encoded_per_dataset = {name: encode(a) for name, a in (dataset_attrs or {}).items()}

    def write_group(f: h5py.File, where: str) -> None:
        if where in f:
            del f[where]
        g = f.create_group(where)
        for name, (value, dtype) in prepared.items():
            ds = g.create_dataset(name, data=value, dtype=dtype)
            for key, v in encoded_per_dataset.get(name, {}).items():
                ds.attrs[key] = v
        for key, value in encoded.items():
            g.attrs[key] = value

    lock = RunLock.acquire(path)
    try:
        tmp = path.with_name(path.name + ".derived.tmp")
        with write_errors(path, then="the run is unchanged: make room and run the command again"):
            settle(path)
            if path.exists():
                refuse_symlinks(tmp)
                tmp.unlink(missing_ok=True)
                try:
                    shutil.copyfile(path, tmp)
                    with h5py.File(tmp, "r+", locking=False) as f:
                        check_run_attrs(path, f)
                        write_group(f, group)
                    fsync_path(tmp)
                    replace_durably(tmp, path)
                except BaseException:
                    tmp.unlink(missing_ok=True)  # a full disk: its space back at once, nothing left behind
                    raise
            elif (parts_dir(path) / HEADER).exists():
                def fill(f: h5py.File) -> None:
                    f.attrs["group"] = group
                    write_group(f, "data")
                write_h5_atomic(parts_dir(path) / f"derived-{group.replace('/', '__')}.h5", fill)
            else:
                raise WorkbenchError(f"run file not found: {path}")
    finally:
        lock.release(remove=path.exists())

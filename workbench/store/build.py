"""Building finished rows into the run file to be, and settling a run's files after a kill: finish an
interrupted ``--overwrite`` swap, drop leftovers, rebuild from the raw activation bytes and the parts when a kill
cut HDF5's writes short (no trusted ``built.json``), and make provisional parts durable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from workbench.store.activations import copy_raw, create_activations, read_built, read_layout, write_built
from workbench.store.durability import boot_id, fsync_path, replace_durably
from workbench.store.format import ACTIVATIONS, ASSEMBLING, BUILT, HEADER, LAYOUT, STANDARD_ARRAYS, STR, parts_dir, staging_dir
from workbench.store.header import add_dimension_scales, create_array, fill_value
from workbench.store.parts import all_batch_parts, batch_parts, consecutive, derived_parts, merged_ranges, part_name, read_part
from workbench.store.trust import open_contained
from workbench.store.ragged import FLAT, LENGTHS, TEXT, put_ragged, write_ragged_rows

# --------------------------------------------------------------------------- building the file's groups
def copy_header(header: h5py.File, dst: h5py.File) -> None:
    for key, value in header.attrs.items():
        dst.attrs[key] = value
    header.copy(header["samples"], dst, "samples")


def fill_from_parts(dst: h5py.File, folder: Path, header: h5py.File) -> np.ndarray:
    """Create ``rounds/``, ``tokens/``, ``transcripts/`` and ``progress/`` in ``dst`` (the view of a
    running run) at full size holding every finished batch part's rows, fixed-shape arrays copied
    in whole-part slabs (rows not done: fill values, empty strings and sequences); add derived
    groups. Returns ``done`` ``[N]``."""
    n, n_rounds, k = int(header.attrs["n_samples"]), int(header.attrs["n_rounds"]), int(header.attrs["n_options"])
    done = np.zeros(n, dtype=bool)
    fixed: dict[str, np.ndarray] = {}
    ragged: dict[str, tuple[tuple[int, ...], Any, bool, list]] = {}  # path -> (shape, dtype, text, pieces)
    for start, stop, part in batch_parts(folder):
        arrays = read_part(part)
        for key, value in arrays.items():
            if key.endswith(LENGTHS):
                path = key[: -len(LENGTHS)]
                text = path + TEXT in arrays
                flat = arrays[path + (TEXT if text else FLAT)]
                ragged.setdefault(path, ((n, *value.shape[1:]), flat.dtype, text, []))[3].append((start, stop, flat, value))
            elif not key.endswith((FLAT, TEXT)):
                if key not in fixed:
                    fixed[key] = np.full((n, *value.shape[1:]), fill_value(key.rsplit("/", 1)[-1], value.dtype), dtype=value.dtype)
                fixed[key][start:stop] = value
        done[start:stop] = True
    for path, (tail, dtype) in STANDARD_ARRAYS.items():  # the same layout before any batch is done
        if path not in fixed and path not in ragged:
            shape = (n, *(n_rounds if d == "R" else k if d == "K" else d for d in tail))
            if np.dtype(dtype).kind == "O":
                text = h5py.check_string_dtype(dtype) is not None
                ragged[path] = (shape, None if text else h5py.check_vlen_dtype(dtype), text, [])
            else:
                fixed[path] = np.full(shape, fill_value(path.rsplit("/", 1)[-1], np.dtype(dtype)), dtype=dtype)
    for path in sorted({*fixed, *ragged}):
        group, name = path.rsplit("/", 1)
        g = dst.require_group(group)
        if path in ragged:
            shape, dtype, text, pieces = ragged[path]
            put_ragged(g, name, shape, dtype, pieces, text)
        else:
            g.create_dataset(name, data=fixed[path])
    dst.require_group("progress").create_dataset("done", data=done.astype(np.uint8))
    copy_derived(dst, folder)
    return done


def copy_derived(dst: h5py.File, folder: Path) -> None:
    """Add the derived groups (``probe track`` …) written beside an unfinished run to ``dst``."""
    for derived in derived_parts(folder):
        with open_contained(derived, locking=False) as d:
            group = d.attrs["group"]
            if group in dst:
                del dst[group]
            dst.require_group(group.rsplit("/", 1)[0] if "/" in group else "/")
            d.copy(d["data"], dst, group)


def write_part_rows(f: h5py.File, start: int, arrays: dict[str, np.ndarray], datasets: dict[str, h5py.Dataset]) -> list[str]:
    """Write one part's rows (``arrays`` as :func:`flatten_batch` gives them, rows ``start : start
    + B``) into the run file being built, creating at full size (fill values elsewhere) any array
    it does not have yet (a task's fields). ``datasets``: the file's datasets by path, filled as
    they are looked up (an HDF5 lookup by path costs more than a small write). Returns the paths
    of the arrays it created."""
    n = int(f.attrs["n_samples"])
    created: list[str] = []

    def dataset(path: str, shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
        if path not in datasets:
            if path not in f:
                create_array(f, path, shape, dtype)
                created.append(path)
            datasets[path] = f[path]
        return datasets[path]

    for key, value in arrays.items():
        if key.endswith((FLAT, TEXT)):
            continue
        if key.endswith(LENGTHS):
            path = key[: -len(LENGTHS)]
            text = path + TEXT in arrays
            flat = arrays[path + (TEXT if text else FLAT)]
            ds = dataset(path, (n, *value.shape[1:]), STR if text else h5py.vlen_dtype(flat.dtype))
            write_ragged_rows(ds, start, flat, value, text)
        elif len(value):
            ds = dataset(key, (n, *value.shape[1:]), value.dtype)
            ds.write_direct(np.ascontiguousarray(value), dest_sel=np.s_[start : start + len(value)])
    return created


# --------------------------------------------------------------------------- settling a run's state
def settle(path: Path) -> None:
    """Bring a run's files into one consistent state after a kill (the caller holds the lock):
    finish an interrupted ``--overwrite`` swap, drop parts a completed assembly left behind,
    remove unfinished temporary files, and rebuild a run file to be whose HDF5 writes a kill cut
    short (no trusted ``built.json``)."""
    parts, staging, old = parts_dir(path), staging_dir(path), path.with_name(path.name + ".parts.old")
    if staging.exists() and not parts.exists() and not path.exists() and (staging / HEADER).exists() and batch_parts(staging):
        replace_durably(staging, parts)  # killed between the --overwrite swap's renames
    if old.exists():
        shutil.rmtree(old)
    if staging.exists() and (parts.exists() or path.exists()):
        shutil.rmtree(staging)  # an --overwrite killed before its first batch: the old run stands
    if path.exists() and parts.exists():
        with h5py.File(path, "r", locking=False) as f:
            final_id = f.attrs.get("run_id")
        header = parts / HEADER
        part_id = None
        if header.exists():
            with h5py.File(header, "r", locking=False) as h:
                part_id = h.attrs.get("run_id")
        if part_id is None or part_id == final_id:
            shutil.rmtree(parts)  # assembly finished; its parts were not removed yet
    if not parts.exists():
        return
    for tmp in list(parts.glob("*.tmp")) + list(parts.glob("*.new")):
        tmp.unlink()
    assembling = parts / ASSEMBLING  # left by a killed assembly of an earlier workbench
    if assembling.exists() and not (parts / ACTIVATIONS).exists():
        _rebuild(parts, assembling)
        assembling.unlink()
    elif assembling.exists():
        assembling.unlink()
    elif (parts / ACTIVATIONS).exists() and read_built(parts) is None:
        _rebuild(parts, parts / ACTIVATIONS)
    _make_parts_durable(parts)


def _rebuild(folder: Path, source: Path) -> None:
    """Replace ``activations.h5`` by a fresh file built from ``source``'s raw activation bytes (at
    ``layout.json``'s offsets; its HDF5 metadata is not trusted) and every finished part's rows.
    The fresh file has the same layout, so a kill at any point leaves a state this repairs again."""
    slots = read_layout(folder)
    tmp_dir = folder / "repair"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    with h5py.File(folder / HEADER, "r", locking=False) as h:
        layers_json = h.attrs.get("layers", "[]")
        dtype = slots[0].dtype if slots else "float32"
        fresh = create_activations(tmp_dir, {s.hook: s.shape for s in slots}, dtype, layers_json, lambda f: copy_header(h, f))
    if fresh != slots:
        raise AssertionError(f"{folder}: a rebuilt {ACTIVATIONS} has another layout than {LAYOUT}")
    copy_raw(source, slots, tmp_dir / ACTIVATIONS, fresh)
    rows = []
    with h5py.File(tmp_dir / ACTIVATIONS, "r+", locking=False) as f:
        created: list[str] = []
        datasets: dict[str, h5py.Dataset] = {}
        for start, stop, arrays in consecutive([(a, b, part) for a, b, part in batch_parts(folder)]):
            created += write_part_rows(f, start, arrays, datasets)
            rows.append((start, stop))
        if created:
            add_dimension_scales(f, created)
    fsync_path(tmp_dir / ACTIVATIONS)
    (folder / BUILT).unlink(missing_ok=True)
    replace_durably(tmp_dir / ACTIVATIONS, folder / ACTIVATIONS)
    write_built(folder, merged_ranges(rows), durable=False)
    shutil.rmtree(tmp_dir)


def _make_parts_durable(folder: Path) -> None:
    """After a kill: provisional parts from before this machine's last restart are dropped (their
    rows are recomputed); those from since are made durable (the activations fsynced, then each
    part fsynced and renamed to its durable name), so a later power cut cannot lose them."""
    boot = boot_id()
    parts = all_batch_parts(folder)
    durable = [(a, b) for a, b, written, _ in parts if written is None]
    keep = []
    for start, stop, written, part in parts:
        if written is None:
            continue
        if written != boot or any(s <= start and stop <= e for s, e in durable):
            part.unlink()
        else:
            keep.append((start, stop, part))
    if not keep:
        return
    fsync_path(folder / ACTIVATIONS)
    for start, stop, part in keep:
        fsync_path(part)
        os.replace(part, folder / part_name(start, stop))
    fsync_path(folder, directory=True)

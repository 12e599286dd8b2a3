"""The header of a run file: the root attributes, the per-sample table (``samples/*``), the standard
per-round arrays created at full size, and HDF5 dimension scales naming each axis (docs/FORMAT.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

import h5py
import numpy as np

from workbench.version import __version__

from workbench.store.format import FORMAT, INT_FILL_MINUS_ONE, POSITIONS, SCHEMA_VERSION, STANDARD_ARRAYS, STR
from workbench.store.ragged import flat_text, put_ragged

def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class SampleTable:
    """Per-sample task fields, columnar. Every list has length N."""

    index: list[int]
    id: list[str]
    context: list[str]
    question: list[str]
    options: list[tuple[str, ...]]
    gold: list[int]
    category: list[str]
    condition: list[str]
    extra: list[str]  # JSON per sample


def fill_value(name: str, dtype: np.dtype) -> Any:
    if dtype.kind == "f":
        return np.nan
    if name in INT_FILL_MINUS_ONE:
        return -1
    return 0


# --------------------------------------------------------------------------- the parts of a run
def fill_header(f: h5py.File, settings: dict[str, Any], samples: SampleTable, n_rounds: int, run_id: str,
                 created: str) -> None:
    """Write a run's root attributes and ``samples/`` into ``f``."""
    n = len(samples.index)
    k = max((len(o) for o in samples.options), default=0)
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["workbench_version"] = __version__
    f.attrs["created"] = created
    f.attrs["status"] = "running"
    f.attrs["run_id"] = run_id
    f.attrs["n_samples"] = n
    f.attrs["n_rounds"] = n_rounds
    f.attrs["n_options"] = k
    f.attrs["positions"] = json.dumps(list(POSITIONS))
    for key, value in settings.items():
        f.attrs[key] = value if isinstance(value, (str, int, float, bool, np.integer, np.floating)) else json.dumps(value)
    s = f.create_group("samples")
    s.create_dataset("index", data=np.asarray(samples.index, dtype=np.int64))
    for name in ("id", "context", "question", "category", "condition", "extra"):
        texts = np.empty(n, dtype=object)
        texts[:] = list(getattr(samples, name))
        put_ragged(s, name, (n,), None, [(0, n, *flat_text(texts))], text=True)
    opts = np.full((n, k), "", dtype=object)
    for i, o in enumerate(samples.options):
        opts[i, : len(o)] = list(o)
    put_ragged(s, "options", (n, k), None, [(0, n, *flat_text(opts))], text=True)
    s.create_dataset("gold", data=np.asarray(samples.gold, dtype=np.int16))


def create_standard_arrays(f: h5py.File) -> None:
    """Create every array of ``STANDARD_ARRAYS`` at full size in ``f`` (whose root attributes are
    written), holding fill values: NaN, -1 for answers, 0, empty strings and sequences."""
    n, n_rounds, k = int(f.attrs["n_samples"]), int(f.attrs["n_rounds"]), int(f.attrs["n_options"])
    for path, (tail, dtype) in STANDARD_ARRAYS.items():
        shape = (n, *(n_rounds if d == "R" else k if d == "K" else d for d in tail))
        create_array(f, path, shape, np.dtype(dtype))


def create_array(f: h5py.File, path: str, shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
    """An empty dataset at ``path`` whose unwritten elements read as the array's fill value."""
    group, name = path.rsplit("/", 1)
    fill = None if dtype.kind == "O" else fill_value(name, dtype)
    return f.require_group(group).create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill)


def add_dimension_scales(f: h5py.File, only: Iterable[str] | None = None) -> None:
    """Name every dimension of every array with an HDF5 dimension scale (netCDF-4 style, so
    ``xarray.open_dataset(path, engine="h5netcdf", group="rounds")`` gets named dimensions and
    coordinates). Each group holds the scales its arrays use: ``sample`` (the global sample index),
    ``round`` (0-based), ``position``, ``layer`` (captured layer indices), ``d_model``, ``option``,
    ``bound`` (``start``/``end`` of a span), and ``{array}_dim{i}`` for other task-field axes.
    ``only``: the paths of the arrays to name (default: every array that has no scales yet), for
    a call after arrays were added."""
    n, rounds, k = int(f.attrs["n_samples"]), int(f.attrs["n_rounds"]), int(f.attrs["n_options"])
    values: dict[str, np.ndarray] = {
        "sample": f["samples/index"][...], "round": np.arange(rounds, dtype=np.int64),
        "option": np.arange(k, dtype=np.int64), "bound": np.array(["start", "end"], dtype=object),
        "position": np.array(POSITIONS, dtype=object),
    }
    only = None if only is None else set(only)
    for group_name in ("samples", "rounds", "tokens", "transcripts", "activations"):
        if group_name not in f or only is not None and not any(p.startswith(group_name + "/") for p in only):
            continue
        group = f[group_name]
        scales: dict[str, h5py.Dataset] = {}

        def scale(name: str, data: np.ndarray) -> h5py.Dataset:
            if name not in scales:
                if name in group:  # made by an earlier call
                    scales[name] = group[name]
                else:
                    ds = group.create_dataset(name, data=data, dtype=STR if data.dtype == object else data.dtype)
                    ds.make_scale(name)
                    scales[name] = ds
            return scales[name]

        for name, ds in list(group.items()):
            if only is not None and f"{group_name}/{name}" not in only:
                continue
            if not isinstance(ds, h5py.Dataset) or name in values or h5py.h5ds.is_scale(ds.id):
                continue
            if only is None and ds.ndim and len(ds.dims[0]):
                continue  # named by an earlier call
            for axis, length in enumerate(ds.shape):
                if axis == 0 and length == n:
                    dim = "sample"
                elif axis == 1 and length == rounds and group_name != "samples":
                    dim = "round"
                elif group_name == "activations":
                    dim = ("sample", "round", "position", "layer", "d_model")[axis]
                    if dim == "layer":
                        values["layer"] = np.asarray(json.loads(ds.attrs["layers"]), dtype=np.int64)
                    elif dim == "d_model":
                        values["d_model"] = np.arange(length, dtype=np.int64)
                elif length == k and name.startswith(("option", "exact_option")) or name == "options":
                    dim = "option"
                elif length == 2 and name.endswith("_span"):
                    dim = "bound"
                else:
                    dim = f"{name}_dim{axis}"
                    values[dim] = np.arange(length, dtype=np.int64)
                ds.dims[axis].attach_scale(scale(dim, values[dim]))

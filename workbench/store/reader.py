"""Reading a run: :class:`RunFile` opens a finished ``RUN.h5``, or a running run as an in-memory view of its
finished parts; it checks the file is a workbench run (format, schema, shapes) before anything reads it."""

from __future__ import annotations

import errno
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from workbench.errors import WorkbenchError, import_optional
from workbench.store.activations import activation_view, read_layout
from workbench.store.build import copy_header, fill_from_parts
from workbench.store.format import (ACTIVATIONS, ASSEMBLING, FORMAT, HEADER, LAYOUT, POSITIONS, SCHEMA_VERSION, STANDARD_ARRAYS,
                                    parts_dir, staging_dir)
from workbench.store.header import add_dimension_scales
from workbench.store.trust import check_contained, open_contained, refuse_special_file

# --------------------------------------------------------------------------- reading
def open_run(path: Path, mode: str) -> h5py.File:
    refuse_special_file(path)
    try:
        f = h5py.File(path, mode, locking=False) if mode == "r" else h5py.File(path, mode)
    except FileNotFoundError:
        raise WorkbenchError(f"run file not found: {path}") from None
    except (OSError, RuntimeError) as e:
        msg = str(e)
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM) or "permission denied" in msg.lower():
            raise WorkbenchError(f"{path} cannot be read (permission denied)") from None
        if "unable to lock file" in msg.lower():
            raise WorkbenchError(f"{path} is open for writing by another process") from None
        if os.path.isdir(path):
            raise WorkbenchError(f"{path} is a folder, not a run file") from None
        raise WorkbenchError(f"{path} is not a readable HDF5 file ({'truncated' if 'truncated' in msg else 'corrupt or not HDF5'})") from None
    try:
        check_contained(f, path, shards_folder=Path(path).with_name(Path(path).name + ".shards"))
        check_run_attrs(path, f)
    except WorkbenchError:
        f.close()
        raise
    except (KeyError, OSError, RuntimeError, ValueError, TypeError) as e:  # HDF5's own objects are damaged
        f.close()
        raise WorkbenchError(f"{path} is a damaged HDF5 file ({str(e).splitlines()[0][:120] or type(e).__name__})") from None
    except BaseException:
        f.close()
        raise
    return f


def check_run_attrs(path: Path, f: h5py.File) -> None:
    if f.attrs.get("format") != FORMAT:
        raise WorkbenchError(f"{path} is not a workbench run file (no format={FORMAT!r} attribute)")
    try:
        version = int(f.attrs.get("schema_version", -1))
    except (TypeError, ValueError):
        raise WorkbenchError(f"{path}: schema_version is not an integer") from None
    if version > SCHEMA_VERSION:
        raise WorkbenchError(f"{path} has schema_version {version}; this workbench reads up to {SCHEMA_VERSION}")
    for key in ("n_samples", "n_rounds"):
        value = f.attrs.get(key)
        if not isinstance(value, (int, np.integer)) or int(value) < 0:
            raise WorkbenchError(f"{path}: the attribute {key} is {'missing' if value is None else repr(value)}, not a count")
    if "progress" not in f or "done" not in f["progress"]:
        raise WorkbenchError(f"{path} has no progress/done dataset (not a complete workbench run file)")
    done = f["progress/done"]
    if done.shape != (int(f.attrs["n_samples"]),):
        raise WorkbenchError(f"{path}: progress/done has shape {done.shape}, expected ({int(f.attrs['n_samples'])},)")
    check_layout(path, f)


def check_layout(path: Path, f: h5py.File) -> None:
    """Refuse a run whose arrays disagree with its attributes (a lying ``n_rounds``, a damaged or
    forged file): every array of ``samples/``, ``rounds/``, ``tokens/``, ``transcripts/`` and
    ``activations/`` has one row per sample; those of ``rounds/``, ``tokens/`` and ``activations/``
    one column per round; the standard arrays their documented shape and kind of dtype; activations
    ``[N, R, P, L, d]`` of floats. Reads metadata only. Raises WorkbenchError naming the array."""
    n, r = int(f.attrs["n_samples"]), int(f.attrs["n_rounds"])
    k = f.attrs.get("n_options")
    for group in ("samples", "rounds", "tokens", "transcripts", "activations"):
        g = f.get(group)
        if g is None:
            continue
        if not isinstance(g, h5py.Group):
            raise WorkbenchError(f"{path}: {group} is not a group: the file is damaged")
        for name, ds in g.items():
            where = f"{group}/{name}"
            if not isinstance(ds, h5py.Dataset):
                continue
            if h5py.h5ds.is_scale(ds.id):
                continue
            shape = ds.shape or ()
            wanted: tuple[Any, ...] = (n,) + ((r,) if group in ("rounds", "tokens", "activations") else ())
            if group == "activations":
                wanted += (len(POSITIONS),)
            if tuple(shape[: len(wanted)]) != wanted:
                raise WorkbenchError(f"{path}: {where} has shape {tuple(shape)}, but the file says {n} samples and {r} rounds "
                                     f"(expected {tuple(wanted)} first): the file is damaged")
            if group == "activations" and (len(shape) != 5 or ds.dtype.kind != "f"):
                raise WorkbenchError(f"{path}: {where} is {ds.dtype} {tuple(shape)}, not floats [samples, rounds, positions, layers, d_model]")
            standard = STANDARD_ARRAYS.get(where)
            if standard is not None:
                tail, dtype = standard
                expected = (n, *(r if d == "R" else int(k) if d == "K" and k is not None else d for d in tail))
                if "K" in tail and k is None:
                    expected = (*expected[:-1], shape[-1] if shape else None)
                if tuple(shape) != expected or not _same_kind(ds.dtype, np.dtype(dtype)):
                    raise WorkbenchError(f"{path}: {where} is {ds.dtype} {tuple(shape)}, expected {np.dtype(dtype)} "
                                         f"{expected}: the file is damaged")


def _same_kind(have: np.dtype, want: np.dtype) -> bool:
    """Whether ``have`` can be read as ``want``: the same string or vlen kind, else the same numeric kind."""
    if h5py.check_string_dtype(want) is not None or h5py.check_string_dtype(have) is not None:
        return h5py.check_string_dtype(have) is not None and h5py.check_string_dtype(want) is not None
    vlen_want, vlen_have = h5py.check_vlen_dtype(want), h5py.check_vlen_dtype(have)
    if vlen_want is not None or vlen_have is not None:
        return vlen_want is not None and vlen_have is not None and vlen_want.kind == vlen_have.kind
    return have.kind == want.kind or (want.kind in "iu" and have.kind in "iu")


def _running_view(path: Path, folder: Path) -> h5py.File:
    """An in-memory HDF5 file with the layout of a finished run, holding a running run's finished
    parts: the small arrays copied, the activations read in place from ``activations.h5``. A
    provisional part the writer deleted between listing and reading (its durable commit replaced
    it) makes it list again."""
    for attempt in range(5):
        try:
            return _running_view_once(folder)
        except FileNotFoundError:
            if attempt == 4 or not (folder / HEADER).exists():
                raise
    raise AssertionError


def _running_view_once(folder: Path) -> h5py.File:
    view = h5py.File(f"{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False)
    try:
        with open_contained(folder / HEADER, locking=False) as header:
            copy_header(header, view)
            fill_from_parts(view, folder, header)
            layers_json = header.attrs.get("layers", "[]")
        raw = folder / ACTIVATIONS if (folder / ACTIVATIONS).exists() else folder / ASSEMBLING
        if raw.is_symlink():
            raise WorkbenchError(f"{raw}: refused, a symlink where the run's own activations file should be")
        activation_view(view, raw, read_layout(folder), layers_json)
        add_dimension_scales(view)
        check_contained(view, folder, external_files=[raw])  # exactly its own activations file, not a symlink
    except BaseException:
        view.close()
        raise
    return view


def decoded_attrs(attrs: Any) -> dict[str, Any]:
    """HDF5 attributes as plain Python: numpy scalars unwrapped, JSON lists and objects decoded."""
    out = {}
    for key, value in attrs.items():
        value = value.item() if isinstance(value, np.generic) else value
        if isinstance(value, str) and value.startswith(("[", "{")):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def check_virtual_sources(path: Path, f: h5py.File) -> None:
    """Refuse a merged run whose activations read shard files that are not there (HDF5 would read
    its fill value, NaN, in silence). Raises WorkbenchError naming the first missing file."""
    group = f.get("activations")
    if not isinstance(group, h5py.Group):
        return
    for ds in group.values():
        if isinstance(ds, h5py.Dataset) and ds.is_virtual:
            for source in ds.virtual_sources():
                name = Path(source.file_name)
                if not (name if name.is_absolute() else Path(path).parent / name).exists():
                    raise WorkbenchError(f"{path}: its activations are read from {source.file_name}, which is missing "
                                         f"(a merged run needs its shards folder beside it; `workbench merge --copy` "
                                         "writes a self-contained file)")


class RunFile:
    """Read access to a run: metadata and the arrays of its finished samples.

    ``RunFile(path)`` opens the run file, or, while the run is still running (or was killed), a
    read-only in-memory view of its finished batches (``running`` is then True; reopen to refresh).
    Use it as a context manager or call ``close()``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.running = False
        self._done_cache: tuple[np.ndarray, np.ndarray] | None = None
        folder = _readable_parts(self.path)
        shards = self.path.with_name(self.path.name + ".shards")
        if folder is None and not self.path.exists() and shards.is_dir():
            raise WorkbenchError(f"{self.path} is not merged yet: its shards are in {shards} "
                                 f"(`workbench merge {self.path}` once every shard is done)")
        if folder is None:
            self.f = open_run(self.path, "r")
            if "merged_from" in self.f.attrs:  # a merged data-parallel run: refuse it when its shard files are gone
                try:
                    check_virtual_sources(self.path, self.f)
                except BaseException:
                    self.f.close()
                    raise
            return
        try:
            self.f = _running_view(self.path, folder)
        except (OSError, KeyError, ValueError) as e:
            if self.path.exists():  # the run finished while we were reading its parts
                self.f = open_run(self.path, "r")
                return
            raise WorkbenchError(f"{self.path} is running and its parts could not be read ({str(e).splitlines()[0]}); try again") from None
        self.running = True

    def __enter__(self) -> "RunFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.f.close()

    @property
    def meta(self) -> dict[str, Any]:
        """Root attributes, JSON values decoded."""
        return decoded_attrs(self.f.attrs)

    @property
    def done(self) -> np.ndarray:
        """``[N]`` bool: samples whose every round is written (as of opening: reopen to refresh)."""
        return self._done_rows()[1].copy()

    def _done_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions of done samples ``[n_done]``, the done mask ``[N]``), read once per open file:
        every ``array`` call needs them, and a sample's read would otherwise reread the whole mask."""
        cached = self._done_cache
        if cached is None:
            mask = self.f["progress/done"][...].astype(bool)
            cached = self._done_cache = (np.flatnonzero(mask), mask)
        return cached

    @property
    def n_rounds(self) -> int:
        return int(self.f.attrs["n_rounds"])

    def names(self, group: str = "rounds") -> list[str]:
        """Dataset names under ``group`` (not the dimension scales that label their axes)."""
        if group not in self.f:
            return []
        return sorted(name for name, obj in self.f[group].items()
                      if not (isinstance(obj, h5py.Dataset) and h5py.h5ds.is_scale(obj.id)))

    def array(self, name: str, samples: Iterable[int] | slice | None = None) -> np.ndarray:
        """A dataset's rows for done samples only (``rounds/correct`` → ``[n_done, R]``).

        ``samples`` selects among done samples by position (default: all of them).
        """
        if name not in self.f:
            raise WorkbenchError(f"{self.path} has no dataset {name!r}")
        rows = self._done_rows()[0]
        if samples is not None:
            rows = rows[samples]
        ds = self.f[name]
        n = int(self.f.attrs["n_samples"])
        if not isinstance(ds, h5py.Dataset) or ds.ndim == 0 or ds.shape[0] != n:
            shape = ds.shape if isinstance(ds, h5py.Dataset) else "a group"
            raise WorkbenchError(f"{self.path}: {name} has shape {shape}, not one row per sample ({n}): the file is damaged")
        if rows.size == 0:
            return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
        if rows.size == ds.shape[0]:
            data = ds[...]
        else:
            data = ds[np.sort(rows)] if np.all(np.diff(rows) > 0) else ds[...][rows]
        if data.dtype == object:
            data = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v, otypes=[object])(data)
        return data

    def _per_round_names(self) -> list[str]:
        """``rounds/`` arrays of shape ``[N, R]`` (one value per sample and round)."""
        n, r = int(self.f.attrs["n_samples"]), self.n_rounds
        return [name for name in self.names("rounds") if self.f[f"rounds/{name}"].shape == (n, r)]

    def concept_scores(self) -> dict[str, np.ndarray]:
        """Per tracked probe, ``concept:{name}`` → projections ``[n_done, R]`` at the probe's best layer
        (written by ``workbench probe track``); the stereotype variant's cosine at the last layer
        (``stereotype_cos_L{layer}``)."""
        out = {}
        for name in self.names("probes"):
            group = self.f[f"probes/{name}"]
            layers = json.loads(group.attrs["layers"])
            if group.attrs.get("kind") == "probe":
                column = layers.index(int(group.attrs["best_layer"]))
                out[f"concept:{name}"] = self.array(f"probes/{name}/projection")[:, :, column]
            elif group.attrs.get("kind") == "stereotype-statement":
                out[f"stereotype_cos_L{layers[-1]}"] = self.array(f"probes/{name}/cosine")[:, :, -1]
        return out

    def to_dataframe(self) -> Any:
        """A pandas DataFrame with one row per done sample and round: ``sample`` (the global sample
        index), ``round`` (counted from 1, as the CLI and the TUI count), the task fields (``id``,
        ``category``, ``condition``, ``gold``, ``context``, ``question``), every per-round value of
        ``rounds/`` (metrics, answers, the instruction and the response) and the concept scores of
        tracked probes (``concept:{name}``, as in ``workbench info``). Needs pandas (the ``[data]``
        extra; one line naming it when missing)."""
        pd = import_optional("pandas", "RunFile.to_dataframe")

        done = self.done
        n_done, r = int(done.sum()), self.n_rounds
        columns: dict[str, Any] = {
            "sample": np.repeat(self.array("samples/index"), r),
            "round": np.tile(np.arange(1, r + 1), n_done),
        }
        for name in ("id", "category", "condition", "gold", "context", "question"):
            columns[name] = np.repeat(self.array(f"samples/{name}"), r)
        for name in self._per_round_names():
            columns[name] = self.array(f"rounds/{name}").reshape(-1)
        for name, values in self.concept_scores().items():
            columns[name] = np.asarray(values).reshape(-1)
        return pd.DataFrame(columns)

    def to_xarray(self, activations: bool = True) -> Any:
        """An xarray Dataset of the done samples, every axis named and labelled: ``sample`` (global
        index), ``round`` (counted from 1), ``option``, ``position``, ``layer`` (the model's layer
        numbers), ``d_model``. Holds the task fields of ``samples/``, every fixed-shape array of
        ``rounds/``, the tracked probes' scores (``probe_{name}_{array}``, axes ``sample, round,
        layer``; NaN at a captured layer the probe was not fitted on) and, unless
        ``activations=False``, ``activations_{hook}`` ``[sample, round, position, layer, d_model]``.
        Variable names hold no "/" (netCDF and ``ds.name`` attribute access need none). Everything
        is read into memory: for a large run open one group lazily with
        ``xarray.open_dataset(path, engine="h5netcdf", group=…)``. Needs xarray (the ``[data]`` extra)."""
        xr = import_optional("xarray", "RunFile.to_xarray")

        k = int(self.f.attrs["n_options"])
        sample = self.array("samples/index")
        coords: dict[str, Any] = {"sample": sample, "round": np.arange(1, self.n_rounds + 1),
                                  "option": np.arange(k), "position": list(POSITIONS)}
        data: dict[str, Any] = {}
        for name in self.names("samples"):
            if name == "index":
                continue
            value = self.array(f"samples/{name}")
            data[name] = (("sample", "option")[: value.ndim], value)
        for name in self.names("rounds"):
            value = self.array(f"rounds/{name}")
            dims = ["sample", "round"]
            for axis in range(2, value.ndim):
                dims.append("option" if value.shape[axis] == k and "option" in name else "bound" if name.endswith("_span") else f"{name}_dim{axis}")
            data[name] = (tuple(dims), value)
        if self.names("rounds") and any(name.endswith("_span") for name in self.names("rounds")):
            coords["bound"] = ["start", "end"]
        arrays: dict[str, Any] = {}  # on the "layer" axis: aligned on the union of their layers
        if activations:
            for hook in self.names("activations"):
                ds = self.f[f"activations/{hook}"]
                arrays[f"activations_{hook}"] = xr.DataArray(
                    self.array(f"activations/{hook}"), dims=("sample", "round", "position", "layer", "d_model"),
                    coords={"layer": json.loads(ds.attrs["layers"]), "d_model": np.arange(ds.shape[-1])})
        for name in self.names("probes"):
            group = self.f[f"probes/{name}"]
            layers = json.loads(group.attrs["layers"]) if "layers" in group.attrs else None
            for array in sorted(group.keys()):
                value = self.array(f"probes/{name}/{array}")
                key = f"probe_{name}_{array}".replace("/", "_")
                if value.ndim == 3 and layers is not None and len(layers) == value.shape[2]:
                    arrays[key] = xr.DataArray(value, dims=("sample", "round", "layer"), coords={"layer": layers})
                else:
                    data[key] = (("sample", "round", f"{key}_dim2")[: value.ndim], value)
        out = xr.Dataset(data, coords=coords, attrs={key: value if isinstance(value, (str, int, float)) else json.dumps(value)
                                                     for key, value in self.meta.items()})
        if arrays:
            aligned = xr.align(*arrays.values(), join="outer")
            out = out.assign({key: value.assign_coords(sample=sample, round=coords["round"])
                              for key, value in zip(arrays, aligned)})
        return out

    def sample_round(self, index: int, round_: int) -> dict[str, Any]:
        """Everything about one sample (file row) and round (0-based): random access, no full reads."""
        out: dict[str, Any] = {}
        for group in ("rounds", "tokens"):
            for name in self.names(group):
                ds = self.f[f"{group}/{name}"]
                if ds.ndim >= 2:
                    value = ds[index, round_]
                    out[name] = value.decode() if isinstance(value, bytes) else value
        for hook in self.names("activations"):
            out[f"activations/{hook}"] = self.f[f"activations/{hook}"][index, round_]
        return out


def _readable_parts(path: Path) -> Path | None:
    """The parts folder a reader should read, or None when the run file itself is the run."""
    if path.exists():
        return None
    for folder in (parts_dir(path), staging_dir(path)):
        if folder.is_symlink():
            raise WorkbenchError(f"{folder}: refused, a symlink where the run's parts folder should be "
                                 "(a workbench never reads or writes through one)")
        if (folder / HEADER).exists() and (folder / LAYOUT).exists():
            return folder
    return None

"""The run file: one HDF5 file per run, streamed batch by batch (layout in docs/FORMAT.md).

This module imports neither torch nor TransformerLens, so a viewer opens a run in a fraction of
a second. Writers create every dataset at its final size up front (sample axis = the dataset's
N), write a batch, flush, then mark its samples done in ``progress/done`` and flush again: a run
killed at any moment keeps every finished batch, and readers only ever look at done samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from workbench.errors import WorkbenchError

FORMAT = "self-correction-workbench-run"
SCHEMA_VERSION = 1
POSITIONS = ("last_prompt", "response_mean")

STR = h5py.string_dtype("utf-8")
VLEN_INT = h5py.vlen_dtype(np.dtype("int32"))
VLEN_FLOAT = h5py.vlen_dtype(np.dtype("float32"))

# Settings that must match for --resume to continue a file (everything that changes the numbers).
NUL_STAND_IN = "\u2400"  # HDF5 strings cannot hold NUL; text keeps "␀", token ids keep the exact output

RESUME_KEYS = ("n_samples", "n_rounds", "model_path", "model_revision", "model_dtype", "task", "seed", "batch_size",
               "activation_dtype", "hooks", "layers", "data", "protocol")


def _version() -> str:
    from workbench import __version__

    return __version__


def _create(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...] | None = None, fill: Any = None) -> h5py.Dataset:
    """A dataset whose storage is allocated at creation, so later writes change no metadata."""
    space = h5py.h5s.create_simple(shape)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if chunks is not None:
        dcpl.set_chunk(chunks)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    tid = h5py.h5t.py_create(np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype, logical=True)
    if fill is not None:
        dcpl.set_fill_value(np.array(fill, dtype=dtype))
    dsid = h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)
    return h5py.Dataset(dsid)


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


class RunWriter:
    """Creates or resumes a run file and writes batches into it. Use as a context manager."""

    def __init__(self, f: h5py.File, n_samples: int):
        self.f = f
        self.n_samples = n_samples
        self._datasets: dict[str, h5py.Dataset] = {}  # looking a dataset up by path costs more than writing a batch row

    def _dataset(self, path: str) -> h5py.Dataset:
        if path not in self._datasets:
            self._datasets[path] = self.f[path]
        return self._datasets[path]

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
    ) -> "RunWriter":
        """Create a new run file (refuses to overwrite). hook_shapes: hook → (n_layers, d_model)."""
        path = Path(path)
        if path.exists():
            raise WorkbenchError(f"{path} already exists (use --resume to continue it, or --overwrite)")
        path.parent.mkdir(parents=True, exist_ok=True)
        n = len(samples.index)
        k = max((len(o) for o in samples.options), default=0)
        f = h5py.File(path, "w")  # default superblock: no "open for write" flag left behind by a killed run
        try:
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["workbench_version"] = _version()
            f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.attrs["status"] = "running"
            f.attrs["n_samples"] = n
            f.attrs["n_rounds"] = n_rounds
            f.attrs["n_options"] = k
            f.attrs["positions"] = json.dumps(list(POSITIONS))
            for key, value in settings.items():
                f.attrs[key] = value if isinstance(value, (str, int, float, bool, np.integer, np.floating)) else json.dumps(value)
            s = f.create_group("samples")
            s.create_dataset("index", data=np.asarray(samples.index, dtype=np.int64))
            for name in ("id", "context", "question", "category", "condition", "extra"):
                texts = [str(x).replace("\0", NUL_STAND_IN) for x in getattr(samples, name)]
                s.create_dataset(name, data=np.asarray(texts, dtype=object), dtype=STR)
            opts = [[str(x).replace("\0", NUL_STAND_IN) for x in o] + [""] * (k - len(o)) for o in samples.options]
            opts = np.asarray(opts, dtype=object).reshape(n, k)
            s.create_dataset("options", data=opts, dtype=STR)
            s.create_dataset("gold", data=np.asarray(samples.gold, dtype=np.int16))
            r = f.create_group("rounds")
            for name in ("instruction", "response"):
                r.create_dataset(name, shape=(n, n_rounds), dtype=STR)
            r.create_dataset("response_token_ids", shape=(n, n_rounds), dtype=VLEN_INT)
            r.create_dataset("token_entropy", shape=(n, n_rounds), dtype=VLEN_FLOAT)
            _create(r, "prompt_span", (n, n_rounds, 2), np.int64)
            _create(r, "response_span", (n, n_rounds, 2), np.int64)
            for name in ("mean_token_entropy", "option_entropy", "chosen_confidence"):
                _create(r, name, (n, n_rounds), np.float32, fill=np.nan)
            _create(r, "option_probs", (n, n_rounds, k), np.float32, fill=np.nan)
            for name in ("parsed_answer", "option_answer", "answer"):
                _create(r, name, (n, n_rounds), np.int16, fill=-1)
            _create(r, "correct", (n, n_rounds), np.uint8)  # flags are uint8 0/1: h5ls cannot print h5py's bool enum
            f.create_group("transcripts").create_dataset("token_ids", shape=(n,), dtype=VLEN_INT)
            a = f.create_group("activations")
            for hook, (n_layers, d_model) in hook_shapes.items():
                shape = (n, n_rounds, len(POSITIONS), n_layers, d_model)
                ds = _create(a, hook, shape, np.dtype(activation_dtype), chunks=(1, *shape[1:]), fill=np.nan)
                ds.attrs["positions"] = json.dumps(list(POSITIONS))
                ds.attrs["layers"] = f.attrs.get("layers", json.dumps(list(range(n_layers))))
            _create(f.require_group("progress"), "done", (n,), np.uint8)
            f.flush()
        except BaseException:
            f.close()
            path.unlink(missing_ok=True)
            raise
        return cls(f, n)

    @classmethod
    def resume(cls, path: Path, settings: dict[str, Any]) -> "RunWriter":
        """Reopen an unfinished run for writing, after checking it was made with the same settings."""
        path = Path(path)
        if not path.exists():
            raise WorkbenchError(f"--resume: {path} does not exist")
        f = _open(path, "r+")
        try:
            for key in RESUME_KEYS:
                if key not in settings:
                    continue
                want = settings[key]
                want = want if isinstance(want, (str, int, float, bool)) else json.dumps(want)
                have = f.attrs.get(key)
                have = have.item() if isinstance(have, np.generic) else have
                if have != want:
                    detail = f" ({have} in the file, {want} now)" if len(str(have)) + len(str(want)) < 80 else ""
                    raise WorkbenchError(f"--resume: {path} was made with a different {key}{detail}")
        except BaseException:
            f.close()
            raise
        return cls(f, int(f.attrs["n_samples"]))

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()

    # --------------------------------------------------------------------- write
    def done_mask(self) -> np.ndarray:
        """``[N]`` bool: which samples are complete."""
        return self.f["progress/done"][...].astype(bool)

    def write_batch(self, start: int, arrays: dict[str, Any], activations: dict[str, np.ndarray], transcripts: list[list[int]]) -> None:
        """Write rows ``start : start + B`` of every per-round array, then mark them done.

        arrays: name → ``[B, R, ...]`` (numpy, or nested lists for the vlen datasets
        ``response_token_ids``/``token_entropy``/``instruction``/``response``). Unknown names are
        task fields and get a dataset of their own on first write.
        """
        f = self.f
        batch = len(transcripts)
        stop = start + batch
        for name, value in arrays.items():
            path = f"rounds/{name}"
            if name in ("response_token_ids", "token_entropy"):
                _write_ragged(self._dataset(path), start, value, np.int32 if name == "response_token_ids" else np.float32)
                continue
            if name in ("instruction", "response"):
                value = np.asarray([[str(x).replace("\0", NUL_STAND_IN) for x in row] for row in value], dtype=object)
            else:
                value = np.asarray(value)
                value = value.astype(np.uint8) if value.dtype == np.bool_ else value
            if path not in self._datasets and name not in f["rounds"]:
                fill = np.nan if value.dtype.kind == "f" else 0
                _create(f["rounds"], name, (self.n_samples, *value.shape[1:]), value.dtype, fill=fill)
            self._dataset(path)[start:stop] = value
        _write_ragged(self._dataset("transcripts/token_ids"), start, transcripts, np.int32)
        for hook, acts in activations.items():
            ds = self._dataset(f"activations/{hook}")
            ds[start:stop] = acts.astype(ds.dtype, copy=False)
        f.flush()
        self._dataset("progress/done")[start:stop] = 1
        f.flush()

    def finish(self) -> None:
        """Mark the run complete when every sample is done."""
        if self.done_mask().all():
            self.f.attrs["status"] = "complete"
            self.f.attrs["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.f.flush()


def _write_ragged(ds: h5py.Dataset, start: int, rows: list, dtype: Any) -> None:
    """Write nested lists of sequences (``[B][tokens]`` or ``[B][R][tokens]``) to a vlen dataset in one call."""
    two_d = ds.ndim == 2
    shape = (len(rows), ds.shape[1]) if two_d else (len(rows),)
    out = np.empty(shape, dtype=object)
    for index in np.ndindex(shape):
        out[index] = np.asarray(rows[index[0]][index[1]] if two_d else rows[index[0]], dtype=dtype)
    if not two_d and len(rows) == 1:
        ds[start] = out[0]  # h5py cannot broadcast a one-row 1-D object array
    else:
        ds[start : start + len(rows)] = out


def _open(path: Path, mode: str) -> h5py.File:
    try:
        f = h5py.File(path, mode)
    except FileNotFoundError:
        raise WorkbenchError(f"run file not found: {path}") from None
    except (OSError, RuntimeError) as e:
        msg = str(e)
        if "unable to lock file" in msg.lower():
            raise WorkbenchError(f"{path} is open for writing by another process") from None
        raise WorkbenchError(f"{path} is not a readable HDF5 file ({'truncated' if 'truncated' in msg else 'corrupt or not HDF5'})") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise WorkbenchError(f"{path} is not a workbench run file (no format={FORMAT!r} attribute)")
    version = int(f.attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        f.close()
        raise WorkbenchError(f"{path} has schema_version {version}; this workbench reads up to {SCHEMA_VERSION}")
    return f


class RunFile:
    """Read access to a run file: metadata and the arrays of its finished samples.

    ``RunFile(path)`` opens read-only; use it as a context manager or call ``close()``.
    """

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        self.f = _open(self.path, mode)

    def __enter__(self) -> "RunFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.f.close()

    @property
    def meta(self) -> dict[str, Any]:
        """Root attributes, JSON values decoded."""
        out = {}
        for key, value in self.f.attrs.items():
            value = value.item() if isinstance(value, np.generic) else value
            if isinstance(value, str) and value.startswith(("[", "{")):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            out[key] = value
        return out

    @property
    def done(self) -> np.ndarray:
        """``[N]`` bool: samples whose every round is written."""
        return self.f["progress/done"][...].astype(bool)

    @property
    def n_rounds(self) -> int:
        return int(self.f.attrs["n_rounds"])

    def names(self, group: str = "rounds") -> list[str]:
        """Dataset names under ``group``."""
        return sorted(self.f[group].keys()) if group in self.f else []

    def array(self, name: str, samples: Iterable[int] | slice | None = None) -> np.ndarray:
        """A dataset's rows for done samples only (``rounds/correct`` → ``[n_done, R]``).

        ``samples`` selects among done samples by position (default: all of them).
        """
        if name not in self.f:
            raise WorkbenchError(f"{self.path} has no dataset {name!r}")
        rows = np.flatnonzero(self.done)
        if samples is not None:
            rows = rows[samples]
        ds = self.f[name]
        if rows.size == 0:
            return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
        if rows.size == ds.shape[0]:
            data = ds[...]
        else:
            data = ds[np.sort(rows)] if np.all(np.diff(rows) > 0) else ds[...][rows]
        if data.dtype == object:
            data = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v, otypes=[object])(data)
        return data

    def sample_round(self, index: int, round_: int) -> dict[str, Any]:
        """Everything about one sample (file row) and round (0-based): random access, no full reads."""
        r = self.f["rounds"]
        out: dict[str, Any] = {}
        for name, ds in r.items():
            value = ds[index, round_]
            out[name] = value.decode() if isinstance(value, bytes) else value
        for hook, ds in self.f["activations"].items():
            out[f"activations/{hook}"] = ds[index, round_]
        return out


def replace_group(path: Path, group: str, datasets: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Write derived results (probe scores) into ``group`` of a run file, replacing any earlier
    version of it: re-running replaces, never duplicates. Values of ``attrs`` that are dicts or
    lists are stored as JSON."""
    with RunFile(path, mode="r+") as run:
        f = run.f
        if group in f:
            del f[group]
        g = f.create_group(group)
        for name, value in datasets.items():
            value = np.asarray(value)
            g.create_dataset(name, data=value, dtype=STR if value.dtype == object else value.dtype)
        for key, value in attrs.items():
            g.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
        f.flush()

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

import errno
import fcntl
import functools
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import h5py
import numpy as np

from workbench.errors import WorkbenchError

FORMAT = "self-correction-workbench-run"
SCHEMA_VERSION = 2
POSITIONS = ("last_prompt", "response_mean")

STR = h5py.string_dtype("utf-8")
VLEN_INT = h5py.vlen_dtype(np.dtype("int32"))
VLEN_FLOAT = h5py.vlen_dtype(np.dtype("float32"))

NUL_STAND_IN = "\u2400"  # HDF5 strings cannot hold NUL; text keeps "␀", token ids keep the exact output

# Settings that must match for --resume to continue a file (everything that changes the numbers).
RESUME_KEYS = ("n_samples", "n_rounds", "model_path", "model_revision", "model_dtype", "task", "seed", "batch_size",
               "activation_dtype", "hooks", "layers", "data", "protocol")

# Settings a resume may change with a warning: the batches agree to float rounding, not bit for bit.
PLACEMENT_KEYS = ("device", "device_map")


class PlacementChangedWarning(UserWarning):
    """A run resumed on another device or device map than it started on."""


# Ragged per-round arrays live in ``tokens/`` (so ``rounds/`` holds only fixed-shape arrays and strings).
TOKEN_ARRAYS = {"response_token_ids": np.int32, "token_entropy": np.float32}
INT_FILL_MINUS_ONE = ("parsed_answer", "option_answer", "answer")
# Arrays every run has, with their trailing dimensions (R rounds, K options): a running run's view
# has them even before its first batch. Task fields (e.g. the organism's) come with the batches.
STANDARD_ARRAYS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "rounds/instruction": (("R",), STR), "rounds/response": (("R",), STR),
    "rounds/prompt_span": (("R", 2), np.int64), "rounds/response_span": (("R", 2), np.int64),
    "rounds/mean_token_entropy": (("R",), np.float32), "rounds/option_probs": (("R", "K"), np.float32),
    "rounds/option_entropy": (("R",), np.float32), "rounds/parsed_answer": (("R",), np.int16),
    "rounds/option_answer": (("R",), np.int16), "rounds/answer": (("R",), np.int16),
    "rounds/chosen_confidence": (("R",), np.float32), "rounds/correct": (("R",), np.uint8),
    "tokens/response_token_ids": (("R",), VLEN_INT), "tokens/token_entropy": (("R",), VLEN_FLOAT),
    "transcripts/token_ids": ((), VLEN_INT),
}

HEADER, ACTIVATIONS, LAYOUT, ASSEMBLING = "run.h5", "activations.h5", "layout.json", "assembling.h5"
BUILT = "built.json"  # parseable exactly while activations.h5 is a consistent HDF5 file; lists the rows it holds
BUILD_ROWS = 256  # finished rows are written into activations.h5 at least this many at a time (or every COMMIT_INTERVAL_S)
COMMIT_INTERVAL_S = 1.0  # at most one durable commit (two fsyncs) per interval; every batch is finished at once
# A batch part: ``batch-{start}-{stop}.part`` is durable (fsynced, and the activations before it);
# ``batch-{start}-{stop}.{boot}.part`` is provisional: renamed into place without fsync, trusted only
# while the machine has not restarted since (``boot`` is the kernel's boot id when it was written).
BATCH_PART = re.compile(r"^batch-(\d+)-(\d+)(?:\.([0-9a-f]+))?\.part$")


def _version() -> str:
    from workbench import __version__

    return __version__


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parts_dir(path: Path) -> Path:
    """The folder a running run lives in: ``RUN.h5.parts``."""
    return path.with_name(path.name + ".parts")


def _staging_dir(path: Path) -> Path:
    """Where ``--overwrite`` builds the new run until its first batch is finished."""
    return path.with_name(path.name + ".parts.new")


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def run_exists(path: Path) -> bool:
    """Whether ``path`` holds a run: the finished file, or a running one's parts."""
    path = Path(path)
    return path.exists() or (parts_dir(path) / HEADER).exists() or (_staging_dir(path) / HEADER).exists() and not parts_dir(path).exists()


# --------------------------------------------------------------------------- durable file operations
def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(src: Path, dest: Path) -> None:
    """Atomically rename ``src`` (already fsynced) to ``dest`` and make the rename durable."""
    os.replace(src, dest)
    _fsync_path(dest.parent, directory=True)


def _write_h5_atomic(dest: Path, fill: Callable[[h5py.File], None]) -> None:
    """Write a whole HDF5 file with ``fill`` under a temporary name, fsync it, rename it to ``dest``."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with h5py.File(tmp, "w", locking=False) as f:
        fill(f)
    _fsync_path(tmp)
    _replace(tmp, dest)


def _write_text_atomic(dest: Path, text: str) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    _replace(tmp, dest)


def free_space(path: Path) -> str:
    """The space left on the file system that holds ``path`` (or its nearest existing folder), as text."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return "unknown"
    free = st.f_bavail * st.f_frsize
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    raise AssertionError


FAILED_WRITES: list[Path] = []  # run files whose write failed in this process (see cli.entry)
_ABANDONED: list[h5py.File] = []  # files left open after a failed write, never closed by this process


def _failed_write(value: Any) -> bool:
    return isinstance(value, (OSError, RuntimeError)) and "write failed" in str(value)


def _drop_failed_write_noise(unraisable: Any, previous: Any = sys.unraisablehook) -> None:
    """After a failed write, h5py's objects of that file fail again as they are freed, each printing
    a traceback (through ``sys.excepthook``) and "Exception ignored …" (through
    ``sys.unraisablehook``); drop those two (the one error line says it all), keep every other."""
    if not _failed_write(unraisable.exc_value):
        previous(unraisable)


def _drop_failed_write_traceback(kind: Any, value: Any, tb: Any, previous: Any = sys.excepthook) -> None:
    if not _failed_write(value):
        previous(kind, value, tb)


def os_errno(e: BaseException) -> int | None:
    """The operating system's error number of a failed write, also when HDF5 wraps it in its own
    report (``..., errno = 28, error message = '...', buf = ...``: the last one); None if it has none."""
    code = getattr(e, "errno", None)
    found = re.findall(r"errno = (\d+)", str(e))
    if not (isinstance(code, int) and code > 0) and found:
        code = int(found[-1])
    return code if isinstance(code, int) and code > 0 else None


def os_reason(e: BaseException) -> str:
    """The operating system's words for a failed write ("No space left on device"), also when
    HDF5 wraps them in its own report (see :func:`os_errno`)."""
    text = str(e)
    code = os_errno(e)
    if code is not None:
        return os.strerror(code)
    messages = re.findall(r"error message = '([^']*)'", text)
    return messages[-1] if messages else (text.splitlines() or [type(e).__name__])[0]


@functools.cache
def skip_hdf5_teardown() -> None:
    """After a failed write HDF5 holds a dataset it could not close, and its own exit handler
    (``H5_term_library``, run by the C library's ``exit`` after Python has finished) crashes on it:
    a script that caught the error would end with a segmentation fault. Register, once, the C
    library's ``_exit`` as an ``on_exit`` handler: handlers run last-registered first, so it runs
    before HDF5's, after Python's own teardown (its atexit functions, flushed streams), and ends
    the process with the status ``exit`` was given. Every part a run keeps is already on disk. A
    no-op off glibc."""
    import ctypes

    on_exit = libc_function("on_exit", ctypes.c_void_p, ctypes.c_void_p)
    if on_exit is None:
        return
    _exit = ctypes.cast(ctypes.CDLL(None)._exit, ctypes.c_void_p)  # called as _exit(status, arg): arg is ignored
    on_exit(_exit, None)


@contextmanager
def _write_errors(path: Path, action: str = "writing") -> Iterator[None]:
    """Turn any OSError while writing (a full disk, a file-size limit, a vanished folder) into one line."""
    previous = sys.unraisablehook, sys.excepthook
    sys.unraisablehook, sys.excepthook = _drop_failed_write_noise, _drop_failed_write_traceback
    try:
        yield
    except (OSError, RuntimeError) as e:  # h5py reports a failed write or close as OSError or RuntimeError
        if isinstance(e, RuntimeError) and "errno" not in str(e) and "write" not in str(e).lower():
            raise
        FAILED_WRITES.append(Path(path))
        skip_hdf5_teardown()
        raise WorkbenchError(f"{action} {path} failed: {os_reason(e)} ({free_space(path)} free there); "
                             "finished batches are kept: make room and continue with --resume") from None
    sys.unraisablehook, sys.excepthook = previous  # kept after a failure: the failed file's objects are freed later


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
        lock = _lock_path(Path(run_path))
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise WorkbenchError(f"{run_path} is being written by another process (pid {holder}); "
                                     "wait for it to finish, or stop it first") from None
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
    if run_exists(path) and not resume and not overwrite:
        raise WorkbenchError(f"{path} already exists (use --resume to continue it, or --overwrite)")
    if resume and overwrite:
        raise WorkbenchError("--resume and --overwrite exclude each other")
    if parent.exists() and _lock_path(path).exists():
        RunLock.acquire(path).release()


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


def _text(x: Any) -> str:
    return str(x).replace("\0", NUL_STAND_IN)


FLAT, TEXT, LENGTHS = ".flat", ".utf8", ".len"  # a ragged array in a part: values end to end, and each element's length
HVL = np.dtype([("len", np.uintp), ("p", np.uintp)])  # HDF5's hvl_t: one variable-length sequence in memory
_EMPTY_TEXT = np.zeros(1, dtype=np.uint8)  # "" as a C string


def _flat(rows: list, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Nested lists of sequences (``[B][tokens]`` or ``[B][R][tokens]``, ``shape`` = ``(B,)`` or
    ``(B, R)``) end to end: (values ``[total]``, each sequence's length ``shape``)."""
    seqs = [x for row in rows for x in row] if len(shape) == 2 else list(rows)
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    if lengths.size != math.prod(shape) or len(rows) != shape[0]:
        raise ValueError(f"ragged array of {len(rows)} rows and {lengths.size} sequences, expected shape {shape}")
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths.reshape(shape)


def _flat_text(texts: Any) -> tuple[np.ndarray, np.ndarray]:
    """Strings (any nested shape) as NUL-terminated UTF-8 end to end: (bytes ``[total]`` uint8,
    each string's length in bytes without its NUL). A NUL in a string becomes ``NUL_STAND_IN``."""
    texts = np.asarray(texts, dtype=object)
    items = [str(x) for x in texts.reshape(-1)]
    joined = "\0".join(items) + "\0"
    if joined.count("\0") != len(items):  # some string holds a NUL
        joined = "".join(_text(x) + "\0" for x in items)
    blob = np.frombuffer(joined.encode(), dtype=np.uint8)
    ends = np.flatnonzero(blob == 0)
    return blob, (np.diff(ends, prepend=-1) - 1).reshape(texts.shape)


def _ragged_memory(shape: tuple[int, ...], text: bool, pieces: list[tuple[int, int, np.ndarray, np.ndarray]],
                   first_row: int = 0) -> tuple[np.ndarray, Any, list[np.ndarray]]:
    """The in-memory image HDF5 writes a variable-length array from: ``shape`` = the rows written
    (``[rows, ...]``), ``pieces`` = ``(start row, stop row, values end to end, lengths [stop - start,
    ...])`` (:func:`_flat`, :func:`_flat_text`) with rows counted from ``first_row``; other rows are
    empty. Returns (memory: an ``hvl_t`` per sequence or a NUL-terminated ``char *`` per string,
    pointing into the pieces' flat arrays; its HDF5 memory type; the arrays that must stay alive
    until the write), so no Python object is made per element."""
    keep = []
    if text:
        memory = np.full(shape, _EMPTY_TEXT.ctypes.data, dtype=np.uintp)
        mtype = h5py.h5t.C_S1.copy()
        mtype.set_size(h5py.h5t.VARIABLE)
        mtype.set_cset(h5py.h5t.CSET_UTF8)
    else:
        memory = np.zeros(shape, dtype=HVL)
        mtype = None
    for start, stop, flat, lengths in pieces:
        flat = np.ascontiguousarray(flat)
        keep.append(flat)
        if mtype is None:
            mtype = h5py.h5t.vlen_create(h5py.h5t.py_create(flat.dtype))
        step = (lengths + 1 if text else lengths).reshape(-1)
        address = (flat.ctypes.data + (np.cumsum(step) - step) * flat.itemsize).astype(np.uintp).reshape(lengths.shape)
        if text:
            memory[start - first_row : stop - first_row] = address
        else:
            memory["len"][start - first_row : stop - first_row] = lengths
            memory["p"][start - first_row : stop - first_row] = address
    return memory, mtype, keep


def _put_ragged(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any,
                pieces: list[tuple[int, int, np.ndarray, np.ndarray]], text: bool) -> None:
    """Create the variable-length dataset ``name`` (``shape`` = ``[N, ...]``; ``dtype`` the values'
    dtype, ignored for strings) from finished batches' flat arrays (:func:`_ragged_memory`)."""
    ds = group.create_dataset(name, shape=shape, dtype=STR if text else h5py.vlen_dtype(np.dtype(dtype)))
    if math.prod(shape) and pieces:
        memory, mtype, keep = _ragged_memory(shape, text, pieces)
        ds.id.write(h5py.h5s.ALL, h5py.h5s.ALL, memory, mtype=mtype)
        del keep


def _write_ragged_rows(ds: h5py.Dataset, start: int, flat: np.ndarray, lengths: np.ndarray, text: bool) -> None:
    """Write rows ``start : start + len(lengths)`` of the variable-length dataset ``ds`` from one
    flat array and its lengths (``[rows, ...]``)."""
    if not lengths.size:
        return
    memory, mtype, keep = _ragged_memory(lengths.shape, text, [(start, start + len(lengths), flat, lengths)], start)
    fspace = ds.id.get_space()
    fspace.select_hyperslab((start,) + (0,) * (lengths.ndim - 1), lengths.shape)
    ds.id.write(h5py.h5s.create_simple(lengths.shape), fspace, memory, mtype=mtype)
    del keep


def _batch_arrays(arrays: dict[str, Any], transcripts: list[list[int]], n_rounds: int) -> dict[str, np.ndarray]:
    """One batch's arrays as a batch part stores them, keyed by their path in the run file:
    fixed-shape ones as they are (``[B, R, ...]``, flags as uint8); ragged ones (token ids,
    entropies, transcripts) as ``{path}.flat`` (values end to end) with ``{path}.len`` (``[B, R]``
    or ``[B]`` lengths); strings likewise as ``{path}.utf8`` (UTF-8 bytes) with ``{path}.len``.
    Every value is a plain numeric array, so batches merge by concatenation along axis 0."""
    batch = len(transcripts)
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if name in TOKEN_ARRAYS:
            path = f"tokens/{name}"
            out[path + FLAT], out[path + LENGTHS] = _flat(value, (batch, n_rounds), TOKEN_ARRAYS[name])
            continue
        path = f"rounds/{name}"
        value = np.asarray(value, dtype=object) if name in ("instruction", "response") else np.asarray(value)
        if value.dtype.kind in "OUS":
            out[path + TEXT], out[path + LENGTHS] = _flat_text(value)
        else:
            out[path] = value.astype(np.uint8) if value.dtype == np.bool_ else value
    out["transcripts/token_ids" + FLAT], out["transcripts/token_ids" + LENGTHS] = _flat(transcripts, (batch,), np.int32)
    return out


def _merge_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Consecutive batches' part arrays (:func:`_batch_arrays`) as one part's."""
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


PART_MAGIC = b"WBPART01"


def _write_part(dest: Path, arrays: dict[str, np.ndarray], durable: bool) -> None:
    """Write a batch part under a temporary name and rename it to ``dest``; ``durable``: fsync it
    first and the rename after. Layout: ``WBPART01``, the header's length (8 bytes, little-endian),
    a JSON header (``arrays``: ``[key, dtype, shape, offset, bytes]`` each; ``crc32`` of the data),
    then every array's bytes (C order) end to end."""
    index, blobs, offset = [], [], 0
    for key, value in arrays.items():
        value = np.asarray(value)
        blobs.append(value.tobytes())
        index.append([key, value.dtype.str, list(value.shape), offset, len(blobs[-1])])
        offset += len(blobs[-1])
    data = b"".join(blobs)
    head = json.dumps({"arrays": index, "crc32": zlib.crc32(data)}).encode()
    tmp = dest.with_name(dest.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, memoryview(PART_MAGIC + len(head).to_bytes(8, "little") + head + data), 0)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if durable:
        _replace(tmp, dest)
    else:
        os.replace(tmp, dest)


def _read_part(path: Path) -> dict[str, np.ndarray]:
    """Every array of a batch part (read-only views of one read), its checksum verified."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[8:16], "little")
    head = json.loads(raw[16 : 16 + size]) if raw[:8] == PART_MAGIC else None
    data = memoryview(raw)[16 + size :]
    if head is None or zlib.crc32(data) != head["crc32"]:
        raise OSError(errno.EIO, f"{path} is damaged (bad header or checksum)")
    return {key: np.frombuffer(data, dtype=np.dtype(dtype), count=math.prod(shape), offset=offset).reshape(shape)
            for key, dtype, shape, offset, _ in head["arrays"]}


def _fill_value(name: str, dtype: np.dtype) -> Any:
    if dtype.kind == "f":
        return np.nan
    if name in INT_FILL_MINUS_ONE:
        return -1
    return 0


# --------------------------------------------------------------------------- the parts of a run
def _fill_header(f: h5py.File, settings: dict[str, Any], samples: SampleTable, n_rounds: int, run_id: str,
                 created: str) -> None:
    """Write a run's root attributes and ``samples/`` into ``f``."""
    n = len(samples.index)
    k = max((len(o) for o in samples.options), default=0)
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["workbench_version"] = _version()
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
        _put_ragged(s, name, (n,), None, [(0, n, *_flat_text(texts))], text=True)
    opts = np.full((n, k), "", dtype=object)
    for i, o in enumerate(samples.options):
        opts[i, : len(o)] = list(o)
    _put_ragged(s, "options", (n, k), None, [(0, n, *_flat_text(opts))], text=True)
    s.create_dataset("gold", data=np.asarray(samples.gold, dtype=np.int16))


def _create_standard_arrays(f: h5py.File) -> None:
    """Create every array of ``STANDARD_ARRAYS`` at full size in ``f`` (whose root attributes are
    written), holding fill values: NaN, -1 for answers, 0, empty strings and sequences."""
    n, n_rounds, k = int(f.attrs["n_samples"]), int(f.attrs["n_rounds"]), int(f.attrs["n_options"])
    for path, (tail, dtype) in STANDARD_ARRAYS.items():
        shape = (n, *(n_rounds if d == "R" else k if d == "K" else d for d in tail))
        _create_array(f, path, shape, np.dtype(dtype))


def _create_array(f: h5py.File, path: str, shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
    """An empty dataset at ``path`` whose unwritten elements read as the array's fill value."""
    group, name = path.rsplit("/", 1)
    fill = None if dtype.kind == "O" else _fill_value(name, dtype)
    return f.require_group(group).create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill)


@dataclass(frozen=True)
class ActivationSlot:
    """Where one hook's activations ``[N, R, P, L, d]`` sit in ``activations.h5``. One chunk holds
    one sample; HDF5 allocates them in order with an index node now and then between them, so the
    rows form a few contiguous ``segments``: ``(first row, byte offset)``, each up to the next."""

    hook: str
    shape: tuple[int, ...]
    dtype: str
    segments: tuple[tuple[int, int], ...]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * np.dtype(self.dtype).itemsize

    def extents(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """``(first row, end row, byte offset of the first row)`` of each contiguous piece of rows ``[start, stop)``."""
        ends = [first for first, _ in self.segments[1:]] + [self.shape[0]]
        for (first, offset), end in zip(self.segments, ends):
            lo, hi = max(start, first), min(stop, end)
            if lo < hi:
                yield lo, hi, offset + (lo - first) * self.row_bytes


def _segments(offsets: Any, row_bytes: int) -> tuple[tuple[int, int], ...]:
    out = []
    for row, offset in enumerate(np.asarray(offsets).tolist()):
        if not out or offset != out[-1][1] + (row - out[-1][0]) * row_bytes:
            out.append((row, int(offset)))
    return tuple(out)


def _create_activations(folder: Path, shapes: dict[str, tuple[int, ...]], dtype: str, layers_json: str,
                        header: Callable[[h5py.File], None]) -> list[ActivationSlot]:
    """Create ``activations.h5``, the run file to be: the root attributes and ``samples/``
    (``header`` writes them), every standard array at full size holding fill values, every
    activation array allocated at full size, the dimension scales; record where each activation
    array's bytes are (``layout.json``) and that the file is built with no rows (``built.json``)."""
    slots: list[ActivationSlot] = []

    def fill(f: h5py.File) -> None:
        # The activations first: their bytes then sit at offsets that depend only on their shapes,
        # so a repair's fresh file (whose header is a copy) has the same layout.
        group = f.create_group("activations")
        for hook, shape in shapes.items():
            space = h5py.h5s.create_simple(shape)
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_chunk((1, *shape[1:]))
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # rows are written once; no pass over the file writing NaN
            tid = h5py.h5t.py_create(np.dtype(dtype), logical=True)
            ds = h5py.Dataset(h5py.h5d.create(group.id, hook.encode(), tid, space, dcpl=dcpl))
            ds.attrs["positions"] = json.dumps(list(POSITIONS))
            ds.attrs["layers"] = layers_json
            row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
            offsets = np.zeros(shape[0], dtype=np.int64)
            if row_bytes and shape[0]:
                def record(info: Any) -> None:
                    offsets[info.chunk_offset[0]] = info.byte_offset
                ds.id.chunk_iter(record)
            slots.append(ActivationSlot(hook, tuple(shape), dtype, _segments(offsets, row_bytes)))
        header(f)
        _create_standard_arrays(f)
        _add_dimension_scales(f)

    target = folder / ACTIVATIONS
    tmp = folder / (ACTIVATIONS + ".new")
    _write_h5_atomic(tmp, fill)
    _write_text_atomic(folder / LAYOUT, json.dumps([{"hook": s.hook, "shape": list(s.shape), "dtype": s.dtype,
                                                      "segments": [list(x) for x in s.segments]} for s in slots]))
    _write_built(folder, [], durable=True)
    _replace(tmp, target)
    return slots


def _read_built(folder: Path) -> list[tuple[int, int]] | None:
    """The rows ``[(start, stop), ...]`` whose arrays ``activations.h5`` holds in a consistent HDF5
    file, or None when it cannot be trusted (no record: a kill while HDF5 wrote it; or a record
    from before the machine restarted, whose bytes may not have reached the disk)."""
    try:
        built = json.loads((folder / BUILT).read_text())
    except (OSError, ValueError):
        return None
    if built.get("boot") is not None and built["boot"] != _boot_id():
        return None
    return [(int(a), int(b)) for a, b in built["rows"]]


def _write_built(folder: Path, rows: list[tuple[int, int]], durable: bool) -> None:
    """Record that ``activations.h5`` is consistent and holds ``rows``; ``durable``: fsynced (the
    file must be too), else valid until the machine restarts.

    A provisional record replaces an existing one in place: the new text with its first byte
    ``#`` (unparseable), then the ``{`` (a kill in between leaves a record nobody trusts)."""
    boot = None if durable else _boot_id()
    text = json.dumps({"boot": boot, "rows": [list(r) for r in rows]})
    if boot is None:
        _write_text_atomic(folder / BUILT, text)
        return
    try:
        fd = os.open(folder / BUILT, os.O_RDWR)
    except FileNotFoundError:
        tmp = folder / (BUILT + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, folder / BUILT)
        return
    try:
        data = ("#" + text[1:]).ljust(os.fstat(fd).st_size).encode()  # JSON allows the trailing spaces
        _pwrite_all(fd, memoryview(data), 0)
        _pwrite_all(fd, memoryview(b"{"), 0)
    finally:
        os.close(fd)


def _distrust_built(folder: Path) -> None:
    """Make ``built.json`` unparseable (its first byte ``#``) before HDF5 writes ``activations.h5``:
    a write into its page, where removing the file waited on the file system's journal while a
    large write was in flight (12 ms per build with 2.4 GiB of activations)."""
    try:
        fd = os.open(folder / BUILT, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        _pwrite_all(fd, memoryview(b"#"), 0)
    finally:
        os.close(fd)


def _read_layout(folder: Path) -> list[ActivationSlot]:
    return [ActivationSlot(d["hook"], tuple(d["shape"]), d["dtype"], tuple((int(r), int(o)) for r, o in d["segments"]))
            for d in json.loads((folder / LAYOUT).read_text())]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_rows(fd: int, slot: ActivationSlot, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` (``[B, R, P, L, d]``, the slot's dtype, C order) as rows ``start : start + B``."""
    for lo, hi, offset in slot.extents(start, start + len(rows)):
        _pwrite_all(fd, memoryview(rows[lo - start : hi - start]).cast("B"), offset)


@functools.cache
def libc_function(name: str, *argtypes: Any) -> Any:
    """The C library's function ``name`` with ``argtypes`` (returning int, setting errno), or None
    off Linux or where the library has none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    return fn


def _start_writeback(fd: int, slot: ActivationSlot, start: int, stop: int) -> None:
    """Ask the kernel to start writing rows ``[start, stop)`` to the disk now, without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so the disk works while the next batches
    are computed and the next commit's fsync has little left to wait for. A no-op elsewhere."""
    import ctypes

    fn = libc_function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    if fn is not None:
        for lo, hi, offset in slot.extents(start, stop):
            fn(fd, offset, (hi - lo) * slot.row_bytes, 2)  # 2 = SYNC_FILE_RANGE_WRITE


def _read_rows(fd: int, slot: ActivationSlot, start: int, stop: int) -> np.ndarray:
    out = np.empty((stop - start, *slot.shape[1:]), dtype=slot.dtype)
    for lo, hi, offset in slot.extents(start, stop):
        n = (hi - lo) * slot.row_bytes
        got = os.preadv(fd, [memoryview(out[lo - start : hi - start]).cast("B")], offset)
        if got != n:
            raise OSError(errno.EIO, f"short read of activations ({got} of {n} bytes)")
    return out


def _copy_raw(src: Path, src_slots: list[ActivationSlot], dst: Path, dst_slots: list[ActivationSlot]) -> None:
    """Copy every activation array's rows from one file to another (a rebuild, :func:`_rebuild`)."""
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        for a, b in zip(src_slots, dst_slots):
            step = max(1, (64 << 20) // max(a.row_bytes, 1))
            for start in range(0, a.shape[0], step):
                stop = min(a.shape[0], start + step)
                _write_rows(fout.fileno(), b, start, _read_rows(fin.fileno(), a, start, stop))
        fout.flush()
        os.fsync(fout.fileno())


def _boot_id() -> str | None:
    """This machine's boot id (hex; it changes whenever the machine restarts, so pages a killed
    process wrote are still in the page cache exactly while it is unchanged), or None where the
    kernel does not say (then every batch is made durable at once)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "").lower()
    except OSError:
        return None
    return boot if re.fullmatch(r"[0-9a-f]+", boot) else None


def _part_name(start: int, stop: int, boot: str | None = None) -> str:
    """A batch part's file name: durable without ``boot``, provisional with it."""
    return f"batch-{start:08d}-{stop:08d}" + (f".{boot}" if boot else "") + ".part"


def _all_batch_parts(folder: Path) -> list[tuple[int, int, str | None, Path]]:
    """Every batch part in ``folder`` as ``(start, stop, boot or None when durable, path)``."""
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = BATCH_PART.match(p.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), m.group(3), p))
    return sorted(out, key=lambda x: (x[0], x[1], x[2] or ""))


def _batch_parts(folder: Path) -> list[tuple[int, int, Path]]:
    """The finished batch parts as ``(start, stop, path)``: every durable part, and the provisional
    parts written since this machine last started that no durable part covers (those after a
    restart are ignored: their bytes may not have reached the disk). Durable parts come last, so
    where a kill left both, a durable part's rows are read last."""
    boot = _boot_id()
    parts = _all_batch_parts(folder)
    durable = [(a, b, p) for a, b, written, p in parts if written is None]
    provisional = [(a, b, p) for a, b, written, p in parts
                   if written is not None and written == boot and not any(s <= a and b <= e for s, e, _ in durable)]
    return provisional + durable


def _done_from_parts(folder: Path, n: int) -> np.ndarray:
    done = np.zeros(n, dtype=bool)
    for start, stop, _ in _batch_parts(folder):
        done[start:stop] = True
    return done


def _covered(ranges: list[tuple[int, int]], start: int, stop: int) -> bool:
    """Whether rows ``[start, stop)`` lie inside one of ``ranges``."""
    return any(a <= start and stop <= b for a, b in ranges)


def _merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` sorted, with overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def _consecutive(batches: list[tuple[int, int, Any]]) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Finished batches (``(start, stop, part arrays or a part's path)``) as runs of consecutive
    rows with their arrays joined: one write per array per run."""
    run: list[tuple[int, int, dict[str, np.ndarray]]] = []
    for start, stop, arrays in sorted(batches, key=lambda x: x[0]):
        arrays = _read_part(arrays) if isinstance(arrays, Path) else arrays
        if run and (run[-1][1] != start or run[-1][2].keys() != arrays.keys()):
            yield run[0][0], run[-1][1], _merge_batches([r[2] for r in run])
            run = []
        run.append((start, stop, arrays))
    if run:
        yield run[0][0], run[-1][1], _merge_batches([r[2] for r in run])


def _derived_parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("derived-*.h5"))


# --------------------------------------------------------------------------- building the file's groups
def _copy_header(header: h5py.File, dst: h5py.File) -> None:
    for key, value in header.attrs.items():
        dst.attrs[key] = value
    header.copy(header["samples"], dst, "samples")


def _fill_from_parts(dst: h5py.File, folder: Path, header: h5py.File) -> np.ndarray:
    """Create ``rounds/``, ``tokens/``, ``transcripts/`` and ``progress/`` in ``dst`` (the view of a
    running run) at full size holding every finished batch part's rows, fixed-shape arrays copied
    in whole-part slabs (rows not done: fill values, empty strings and sequences); add derived
    groups. Returns ``done`` ``[N]``."""
    n, n_rounds, k = int(header.attrs["n_samples"]), int(header.attrs["n_rounds"]), int(header.attrs["n_options"])
    done = np.zeros(n, dtype=bool)
    fixed: dict[str, np.ndarray] = {}
    ragged: dict[str, tuple[tuple[int, ...], Any, bool, list]] = {}  # path -> (shape, dtype, text, pieces)
    for start, stop, part in _batch_parts(folder):
        arrays = _read_part(part)
        for key, value in arrays.items():
            if key.endswith(LENGTHS):
                path = key[: -len(LENGTHS)]
                text = path + TEXT in arrays
                flat = arrays[path + (TEXT if text else FLAT)]
                ragged.setdefault(path, ((n, *value.shape[1:]), flat.dtype, text, []))[3].append((start, stop, flat, value))
            elif not key.endswith((FLAT, TEXT)):
                if key not in fixed:
                    fixed[key] = np.full((n, *value.shape[1:]), _fill_value(key.rsplit("/", 1)[-1], value.dtype), dtype=value.dtype)
                fixed[key][start:stop] = value
        done[start:stop] = True
    for path, (tail, dtype) in STANDARD_ARRAYS.items():  # the same layout before any batch is done
        if path not in fixed and path not in ragged:
            shape = (n, *(n_rounds if d == "R" else k if d == "K" else d for d in tail))
            if np.dtype(dtype).kind == "O":
                text = h5py.check_string_dtype(dtype) is not None
                ragged[path] = (shape, None if text else h5py.check_vlen_dtype(dtype), text, [])
            else:
                fixed[path] = np.full(shape, _fill_value(path.rsplit("/", 1)[-1], np.dtype(dtype)), dtype=dtype)
    for path in sorted({*fixed, *ragged}):
        group, name = path.rsplit("/", 1)
        g = dst.require_group(group)
        if path in ragged:
            shape, dtype, text, pieces = ragged[path]
            _put_ragged(g, name, shape, dtype, pieces, text)
        else:
            g.create_dataset(name, data=fixed[path])
    dst.require_group("progress").create_dataset("done", data=done.astype(np.uint8))
    _copy_derived(dst, folder)
    return done


def _copy_derived(dst: h5py.File, folder: Path) -> None:
    """Add the derived groups (``probe track`` …) written beside an unfinished run to ``dst``."""
    for derived in _derived_parts(folder):
        with h5py.File(derived, "r", locking=False) as d:
            group = d.attrs["group"]
            if group in dst:
                del dst[group]
            dst.require_group(group.rsplit("/", 1)[0] if "/" in group else "/")
            d.copy(d["data"], dst, group)


def _write_part_rows(f: h5py.File, start: int, arrays: dict[str, np.ndarray], datasets: dict[str, h5py.Dataset]) -> list[str]:
    """Write one part's rows (``arrays`` as :func:`_batch_arrays` gives them, rows ``start : start
    + B``) into the run file being built, creating at full size (fill values elsewhere) any array
    it does not have yet (a task's fields). ``datasets``: the file's datasets by path, filled as
    they are looked up (an HDF5 lookup by path costs more than a small write). Returns the paths
    of the arrays it created."""
    n = int(f.attrs["n_samples"])
    created: list[str] = []

    def dataset(path: str, shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
        if path not in datasets:
            if path not in f:
                _create_array(f, path, shape, dtype)
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
            _write_ragged_rows(ds, start, flat, value, text)
        elif len(value):
            ds = dataset(key, (n, *value.shape[1:]), value.dtype)
            ds.write_direct(np.ascontiguousarray(value), dest_sel=np.s_[start : start + len(value)])
    return created


def _activation_view(dst: h5py.File, activations_file: Path, slots: list[ActivationSlot], layers_json: str) -> None:
    """Activation datasets in ``dst`` that read the raw bytes of ``activations_file`` (HDF5 external
    storage), so a reader never parses the HDF5 metadata of a file that is being written."""
    group = dst.require_group("activations")
    for s in slots:
        name = str(activations_file.resolve())
        pieces = [(name, offset, (hi - lo) * s.row_bytes) for lo, hi, offset in s.extents(0, s.shape[0])]
        ds = group.create_dataset(s.hook, shape=s.shape, dtype=s.dtype, external=pieces or None)
        ds.attrs["positions"] = json.dumps(list(POSITIONS))
        ds.attrs["layers"] = layers_json


# --------------------------------------------------------------------------- settling a run's state
def _settle(path: Path) -> None:
    """Bring a run's files into one consistent state after a kill (the caller holds the lock):
    finish an interrupted ``--overwrite`` swap, drop parts a completed assembly left behind,
    remove unfinished temporary files, and rebuild a run file to be whose HDF5 writes a kill cut
    short (no trusted ``built.json``)."""
    parts, staging, old = parts_dir(path), _staging_dir(path), path.with_name(path.name + ".parts.old")
    if staging.exists() and not parts.exists() and not path.exists() and (staging / HEADER).exists() and _batch_parts(staging):
        _replace(staging, parts)  # killed between the --overwrite swap's renames
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
    elif (parts / ACTIVATIONS).exists() and _read_built(parts) is None:
        _rebuild(parts, parts / ACTIVATIONS)
    _make_parts_durable(parts)


def _rebuild(folder: Path, source: Path) -> None:
    """Replace ``activations.h5`` by a fresh file built from ``source``'s raw activation bytes (at
    ``layout.json``'s offsets; its HDF5 metadata is not trusted) and every finished part's rows.
    The fresh file has the same layout, so a kill at any point leaves a state this repairs again."""
    slots = _read_layout(folder)
    tmp_dir = folder / "repair"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    with h5py.File(folder / HEADER, "r", locking=False) as h:
        layers_json = h.attrs.get("layers", "[]")
        dtype = slots[0].dtype if slots else "float32"
        fresh = _create_activations(tmp_dir, {s.hook: s.shape for s in slots}, dtype, layers_json, lambda f: _copy_header(h, f))
    if fresh != slots:
        raise AssertionError(f"{folder}: a rebuilt {ACTIVATIONS} has another layout than {LAYOUT}")
    _copy_raw(source, slots, tmp_dir / ACTIVATIONS, fresh)
    rows = []
    with h5py.File(tmp_dir / ACTIVATIONS, "r+", locking=False) as f:
        created: list[str] = []
        datasets: dict[str, h5py.Dataset] = {}
        for start, stop, arrays in _consecutive([(a, b, part) for a, b, part in _batch_parts(folder)]):
            created += _write_part_rows(f, start, arrays, datasets)
            rows.append((start, stop))
        if created:
            _add_dimension_scales(f, created)
    _fsync_path(tmp_dir / ACTIVATIONS)
    (folder / BUILT).unlink(missing_ok=True)
    _replace(tmp_dir / ACTIVATIONS, folder / ACTIVATIONS)
    _write_built(folder, _merged_ranges(rows), durable=False)
    shutil.rmtree(tmp_dir)


def _make_parts_durable(folder: Path) -> None:
    """After a kill: provisional parts from before this machine's last restart are dropped (their
    rows are recomputed); those from since are made durable (the activations fsynced, then each
    part fsynced and renamed to its durable name), so a later power cut cannot lose them."""
    boot = _boot_id()
    parts = _all_batch_parts(folder)
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
    _fsync_path(folder / ACTIVATIONS)
    for start, stop, part in keep:
        _fsync_path(part)
        os.replace(part, folder / _part_name(start, stop))
    _fsync_path(folder, directory=True)


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
            with _open(path, "r") as f:
                self.n_samples, self.n_options = int(f.attrs["n_samples"]), int(f.attrs["n_options"])
            self.slots: list[ActivationSlot] = []
            self._fd = -1
            self._h5, self._datasets = None, {}
            self._committer, self._commit_future = None, None
            return
        with h5py.File(folder / HEADER, "r", locking=False) as h:
            self.n_samples, self.n_options = int(h.attrs["n_samples"]), int(h.attrs["n_options"])
            self.n_rounds = int(h.attrs["n_rounds"])
        self.slots = _read_layout(folder)
        built = _read_built(folder)
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
            (a, b, part) for a, b, part in _batch_parts(folder) if not _covered(built, a, b)]
        self._last_commit = -math.inf  # the first batch commits at once
        self._last_build = time.monotonic()  # rows are built in once BUILD_ROWS or COMMIT_INTERVAL_S have gathered
        self._boot = _boot_id()

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
        with _write_errors(path, "creating"):
            path.parent.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(path)
        try:
            with _write_errors(path, "creating"):
                _settle(path)
                exists = run_exists(path)
                if exists and not overwrite:
                    raise WorkbenchError(f"{path} already exists (use --resume to continue it, or --overwrite)")
                folder = _staging_dir(path) if exists else parts_dir(path)
                shutil.rmtree(_staging_dir(path), ignore_errors=True)
                if not exists:
                    shutil.rmtree(folder, ignore_errors=True)  # a creation that was killed before its header landed
                folder.mkdir()
                n = len(samples.index)
                shapes = {h: (n, n_rounds, len(POSITIONS), nl, d) for h, (nl, d) in hook_shapes.items()}
                layers = settings.get("layers", list(range(next(iter(hook_shapes.values()))[0] if hook_shapes else 0)))
                layers_json = layers if isinstance(layers, str) else json.dumps(layers)
                run_id, created = uuid.uuid4().hex, _now()

                def header(f: h5py.File) -> None:
                    _fill_header(f, settings, samples, n_rounds, run_id, created)

                _create_activations(folder, shapes, activation_dtype, layers_json, header)
                _write_h5_atomic(folder / HEADER, header)  # last: its existence means "the run exists"
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
            with _write_errors(path, "resuming"):
                _settle(path)
            if path.exists():
                with _open(path, "r") as f:
                    _check_settings(path, f.attrs, settings)
                    if f.attrs.get("status") != "complete":
                        raise WorkbenchError(f"{path} was written by an older workbench (schema 1) and is not "
                                             "complete; it cannot be resumed: run it again with --overwrite")
                return cls(path, None, lock)
            header = parts_dir(path) / HEADER
            if not header.exists():  # the creation was killed before the run existed
                raise WorkbenchError(f"--resume: {path} does not exist")
            with h5py.File(header, "r", locking=False) as h:
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
                _ABANDONED.append(self._h5)
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
        with _write_errors(self.path):
            self._wait_commit()  # it renames and removes parts
        return _done_from_parts(self.folder, self.n_samples)

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
        with _write_errors(self.path):
            for slot in self.slots:
                acts = np.ascontiguousarray(activations[slot.hook], dtype=slot.dtype)
                if acts.shape != (batch, *slot.shape[1:]):
                    raise ValueError(f"activations/{slot.hook}: batch shape {acts.shape}, expected {(batch, *slot.shape[1:])}")
                _write_rows(self._fd, slot, start, acts)
                if self.durable:
                    _start_writeback(self._fd, slot, start, stop)
            part = _batch_arrays(arrays, transcripts, self.n_rounds)
            self._check_shapes(part, batch)
            if self._boot is None or self.replaces_old:  # nothing can be provisional: commit now
                self._pending.append((start, stop, part))
                self.commit(wait=True)
            else:
                _write_part(self.folder / _part_name(start, stop, self._boot), part, durable=False)
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
        _distrust_built(self.folder)
        if self._h5 is None:
            self._h5 = h5py.File(self.folder / ACTIVATIONS, "r+", locking=False)
        created: list[str] = []
        for start, stop, arrays in _consecutive(self._unbuilt):
            created += _write_part_rows(self._h5, start, arrays, self._datasets)
            self._built.append((start, stop))
        if created:
            _add_dimension_scales(self._h5, created)
        self._h5.flush()
        if self._boot is None:
            os.fsync(self._fd)  # no boot id to date the record by: it must be durable
        self._built = _merged_ranges(self._built)
        _write_built(self.folder, self._built, durable=False)
        self._unbuilt = []
        self._last_build = time.monotonic()

    def commit(self, wait: bool = False) -> None:
        """Make every batch finished since the last commit durable (against a power cut too): fsync
        the activations, write the batches' other arrays as one part (fsynced, renamed into place,
        the rename fsynced), then remove their provisional parts. Those are in place already, so
        unless ``wait`` the commit runs in a thread while the caller goes on (an fsync waits for
        the disk, not the processor); one commit at a time, and its failure is raised by the next
        call that writes."""
        with _write_errors(self.path):
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
        _write_part(self.folder / _part_name(start, stop), _merge_batches([p[2] for p in pending]), durable=True)
        if self.replaces_old:
            self._take_over()
        for a, b, _ in pending if self._boot else ():
            (self.folder / _part_name(a, b, self._boot)).unlink(missing_ok=True)

    def _take_over(self) -> None:
        """``--overwrite``: the new run has a finished batch, so now (and only now) it replaces the old one."""
        parts, old = parts_dir(self.path), self.path.with_name(self.path.name + ".parts.old")
        if self.path.exists():
            self.path.unlink()
        if parts.exists():
            os.replace(parts, old)
        _replace(self.folder, parts)
        shutil.rmtree(old, ignore_errors=True)
        self.folder, self.replaces_old = parts, False

    def finish(self) -> None:
        """Finish the run file once every sample is done (otherwise commit: the parts stay): build
        the last rows in, mark it complete, fsync it (which makes the last provisional batches
        durable, so no commit precedes it) and rename it to the run's path."""
        if self._complete:
            return
        with _write_errors(self.path):
            self._wait_commit()  # it renames and removes parts in the folder read here
        if not self.done_mask().all():
            self.commit()
            return
        with _write_errors(self.path, "assembling"):
            self._build()
            _distrust_built(self.folder)
            if self._h5 is None:
                self._h5 = h5py.File(self.folder / ACTIVATIONS, "r+", locking=False)
            f = self._h5
            f.require_group("progress").create_dataset("done", data=np.ones(self.n_samples, dtype=np.uint8))
            _copy_derived(f, self.folder)
            f.attrs["status"] = "complete"
            f.attrs["finished"] = _now()
            f.close()  # on a failure, close() leaves it open (see there)
            self._h5, self._datasets = None, {}
            if self.durable:
                os.fsync(self._fd)  # every batch, provisional ones too, is now durable
                _replace(self.folder / ACTIVATIONS, self.path)
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
        warnings.warn(f"--resume: {path} started with another placement and continues with {', '.join(moved)}: "
                      "the batches from before and after agree to float rounding, not bit for bit (a greedy "
                      "near-tie can go the other way)", PlacementChangedWarning, stacklevel=3)


def _add_dimension_scales(f: h5py.File, only: Iterable[str] | None = None) -> None:
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


# --------------------------------------------------------------------------- reading
def _open(path: Path, mode: str) -> h5py.File:
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
        _check_run_attrs(path, f)
    except (KeyError, OSError, RuntimeError, ValueError, TypeError) as e:  # HDF5's own objects are damaged
        f.close()
        raise WorkbenchError(f"{path} is a damaged HDF5 file ({str(e).splitlines()[0][:120] or type(e).__name__})") from None
    except BaseException:
        f.close()
        raise
    return f


def _check_run_attrs(path: Path, f: h5py.File) -> None:
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
        with h5py.File(folder / HEADER, "r", locking=False) as header:
            _copy_header(header, view)
            _fill_from_parts(view, folder, header)
            layers_json = header.attrs.get("layers", "[]")
        raw = folder / ACTIVATIONS if (folder / ACTIVATIONS).exists() else folder / ASSEMBLING
        _activation_view(view, raw, _read_layout(folder), layers_json)
        _add_dimension_scales(view)
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
            self.f = _open(self.path, "r")
            if "merged_from" in self.f.attrs:  # a merged data-parallel run: refuse it when its shard files are gone
                from workbench.store.merge import check_virtual_sources

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
                self.f = _open(self.path, "r")
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

    def to_dataframe(self) -> Any:
        """A pandas DataFrame with one row per done sample and round: ``sample`` (the global sample
        index), ``round`` (0-based), the task fields (``id``, ``category``, ``condition``, ``gold``,
        ``context``, ``question``), every per-round value of ``rounds/`` (metrics, answers, the
        instruction and the response) and the concept scores of tracked probes (``concept:{name}``,
        as in ``workbench info``). Needs pandas."""
        import pandas as pd

        from workbench.analysis.summary import concept_scores

        done = self.done
        n_done, r = int(done.sum()), self.n_rounds
        columns: dict[str, Any] = {
            "sample": np.repeat(self.array("samples/index"), r),
            "round": np.tile(np.arange(r), n_done),
        }
        for name in ("id", "category", "condition", "gold", "context", "question"):
            columns[name] = np.repeat(self.array(f"samples/{name}"), r)
        for name in self._per_round_names():
            columns[name] = self.array(f"rounds/{name}").reshape(-1)
        for name, values in concept_scores(self).items():
            columns[name] = np.asarray(values).reshape(-1)
        return pd.DataFrame(columns)

    def to_xarray(self, activations: bool = True) -> Any:
        """An xarray Dataset of the done samples, every axis named and labelled: ``sample`` (global
        index), ``round`` (0-based), ``option``, ``position``, ``layer``, ``d_model``. Holds the
        task fields of ``samples/``, every fixed-shape array of ``rounds/``, the tracked probes'
        scores (``probes/{name}/{array}``, axes ``sample, round, {name}_layer``) and, unless
        ``activations=False``, ``activations/{hook}``. Everything is read into memory: for a large
        run open one group lazily with ``xarray.open_dataset(path, engine="h5netcdf", group=…)``.
        Needs xarray."""
        import xarray as xr

        k = int(self.f.attrs["n_options"])
        coords: dict[str, Any] = {"sample": self.array("samples/index"), "round": np.arange(self.n_rounds),
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
        if activations:
            for hook in self.names("activations"):
                ds = self.f[f"activations/{hook}"]
                coords["layer"] = json.loads(ds.attrs["layers"])
                coords["d_model"] = np.arange(ds.shape[-1])
                data[f"activations/{hook}"] = (("sample", "round", "position", "layer", "d_model"), self.array(f"activations/{hook}"))
        for name in self.names("probes"):
            group = self.f[f"probes/{name}"]
            layers = json.loads(group.attrs["layers"]) if "layers" in group.attrs else None
            for array in sorted(group.keys()):
                value = self.array(f"probes/{name}/{array}")
                dims = ("sample", "round", f"{name}_layer")[: value.ndim]
                data[f"probes/{name}/{array}"] = (dims, value)
                if value.ndim == 3 and layers is not None and len(layers) == value.shape[2]:
                    coords[f"{name}_layer"] = layers
        return xr.Dataset(data, coords=coords, attrs={key: value if isinstance(value, (str, int, float)) else json.dumps(value)
                                                      for key, value in self.meta.items()})

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
    for folder in (parts_dir(path), _staging_dir(path)):
        if (folder / HEADER).exists() and (folder / LAYOUT).exists():
            return folder
    return None


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
        with _write_errors(path):
            _settle(path)
            if path.exists():
                tmp = path.with_name(path.name + ".derived.tmp")
                tmp.unlink(missing_ok=True)
                shutil.copyfile(path, tmp)
                with h5py.File(tmp, "r+", locking=False) as f:
                    _check_run_attrs(path, f)
                    write_group(f, group)
                _fsync_path(tmp)
                _replace(tmp, path)
            elif (parts_dir(path) / HEADER).exists():
                def fill(f: h5py.File) -> None:
                    f.attrs["group"] = group
                    write_group(f, "data")
                _write_h5_atomic(parts_dir(path) / f"derived-{group.replace('/', '__')}.h5", fill)
            else:
                raise WorkbenchError(f"run file not found: {path}")
    finally:
        lock.release(remove=path.exists())

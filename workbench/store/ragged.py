"""Ragged arrays (per-round token ids, entropies, texts) as flat values plus lengths: how a batch's rows are
flattened for a part file, and written into HDF5 variable-length datasets without a Python object per row."""

from __future__ import annotations

import itertools
import math
from typing import Any

import h5py
import numpy as np

from workbench.store.format import NUL_STAND_IN, STR, TOKEN_ARRAYS

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


def flat_text(texts: Any) -> tuple[np.ndarray, np.ndarray]:
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
    ...])`` (:func:`_flat`, :func:`flat_text`) with rows counted from ``first_row``; other rows are
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


def put_ragged(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any,
                pieces: list[tuple[int, int, np.ndarray, np.ndarray]], text: bool) -> None:
    """Create the variable-length dataset ``name`` (``shape`` = ``[N, ...]``; ``dtype`` the values'
    dtype, ignored for strings) from finished batches' flat arrays (:func:`_ragged_memory`)."""
    ds = group.create_dataset(name, shape=shape, dtype=STR if text else h5py.vlen_dtype(np.dtype(dtype)))
    if math.prod(shape) and pieces:
        memory, mtype, keep = _ragged_memory(shape, text, pieces)
        ds.id.write(h5py.h5s.ALL, h5py.h5s.ALL, memory, mtype=mtype)
        del keep


def write_ragged_rows(ds: h5py.Dataset, start: int, flat: np.ndarray, lengths: np.ndarray, text: bool) -> None:
    """Write rows ``start : start + len(lengths)`` of the variable-length dataset ``ds`` from one
    flat array and its lengths (``[rows, ...]``)."""
    if not lengths.size:
        return
    memory, mtype, keep = _ragged_memory(lengths.shape, text, [(start, start + len(lengths), flat, lengths)], start)
    fspace = ds.id.get_space()
    fspace.select_hyperslab((start,) + (0,) * (lengths.ndim - 1), lengths.shape)
    ds.id.write(h5py.h5s.create_simple(lengths.shape), fspace, memory, mtype=mtype)
    del keep


def flatten_batch(arrays: dict[str, Any], transcripts: list[list[int]], n_rounds: int) -> dict[str, np.ndarray]:
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
            out[path + TEXT], out[path + LENGTHS] = flat_text(value)
        else:
            out[path] = value.astype(np.uint8) if value.dtype == np.bool_ else value
    out["transcripts/token_ids" + FLAT], out["transcripts/token_ids" + LENGTHS] = _flat(transcripts, (batch,), np.int32)
    return out


def concat_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Consecutive batches' part arrays (:func:`flatten_batch`) as one part's."""
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

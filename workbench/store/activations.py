"""The activations file to be (``RUN.h5.parts/activations.h5``): created once at full size, each batch's
activations written with plain ``pwrite`` at the byte offsets recorded in ``layout.json`` (never through HDF5),
and ``built.json``, which parses exactly while the file is a consistent HDF5 file."""

from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from workbench.store.durability import boot_id, libc_function, replace_durably, write_h5_atomic, write_text_atomic
from workbench.store.format import ACTIVATIONS, BUILT, LAYOUT, POSITIONS
from workbench.store.header import add_dimension_scales, create_standard_arrays

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


def segments(offsets: Any, row_bytes: int) -> tuple[tuple[int, int], ...]:
    out = []
    for row, offset in enumerate(np.asarray(offsets).tolist()):
        if not out or offset != out[-1][1] + (row - out[-1][0]) * row_bytes:
            out.append((row, int(offset)))
    return tuple(out)


def create_activations(folder: Path, shapes: dict[str, tuple[int, ...]], dtype: str, layers_json: str,
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
            slots.append(ActivationSlot(hook, tuple(shape), dtype, segments(offsets, row_bytes)))
        header(f)
        create_standard_arrays(f)
        add_dimension_scales(f)

    target = folder / ACTIVATIONS
    tmp = folder / (ACTIVATIONS + ".new")
    write_h5_atomic(tmp, fill)
    write_text_atomic(folder / LAYOUT, json.dumps([{"hook": s.hook, "shape": list(s.shape), "dtype": s.dtype,
                                                      "segments": [list(x) for x in s.segments]} for s in slots]))
    write_built(folder, [], durable=True)
    replace_durably(tmp, target)
    return slots


def read_built(folder: Path) -> list[tuple[int, int]] | None:
    """The rows ``[(start, stop), ...]`` whose arrays ``activations.h5`` holds in a consistent HDF5
    file, or None when it cannot be trusted (no record: a kill while HDF5 wrote it; or a record
    from before the machine restarted, whose bytes may not have reached the disk)."""
    try:
        built = json.loads((folder / BUILT).read_text())
    except (OSError, ValueError):
        return None
    if built.get("boot") is not None and built["boot"] != boot_id():
        return None
    return [(int(a), int(b)) for a, b in built["rows"]]


def write_built(folder: Path, rows: list[tuple[int, int]], durable: bool) -> None:
    """Record that ``activations.h5`` is consistent and holds ``rows``; ``durable``: fsynced (the
    file must be too), else valid until the machine restarts.

    A provisional record replaces an existing one in place: the new text with its first byte
    ``#`` (unparseable), then the ``{`` (a kill in between leaves a record nobody trusts)."""
    boot = None if durable else boot_id()
    text = json.dumps({"boot": boot, "rows": [list(r) for r in rows]})
    if boot is None:
        write_text_atomic(folder / BUILT, text)
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
        pwrite_all(fd, memoryview(data), 0)
        pwrite_all(fd, memoryview(b"{"), 0)
    finally:
        os.close(fd)


def distrust_built(folder: Path) -> None:
    """Make ``built.json`` unparseable (its first byte ``#``) before HDF5 writes ``activations.h5``:
    a write into its page, where removing the file waited on the file system's journal while a
    large write was in flight (12 ms per build with 2.4 GiB of activations)."""
    try:
        fd = os.open(folder / BUILT, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        pwrite_all(fd, memoryview(b"#"), 0)
    finally:
        os.close(fd)


def read_layout(folder: Path) -> list[ActivationSlot]:
    return [ActivationSlot(d["hook"], tuple(d["shape"]), d["dtype"], tuple((int(r), int(o)) for r, o in d["segments"]))
            for d in json.loads((folder / LAYOUT).read_text())]


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_slot_rows(fd: int, slot: ActivationSlot, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` (``[B, R, P, L, d]``, the slot's dtype, C order) as rows ``start : start + B``."""
    for lo, hi, offset in slot.extents(start, start + len(rows)):
        pwrite_all(fd, memoryview(rows[lo - start : hi - start]).cast("B"), offset)


def start_writeback(fd: int, slot: ActivationSlot, start: int, stop: int) -> None:
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


def copy_raw(src: Path, src_slots: list[ActivationSlot], dst: Path, dst_slots: list[ActivationSlot]) -> None:
    """Copy every activation array's rows from one file to another (a rebuild, :func:`_rebuild`)."""
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        for a, b in zip(src_slots, dst_slots):
            step = max(1, (64 << 20) // max(a.row_bytes, 1))
            for start in range(0, a.shape[0], step):
                stop = min(a.shape[0], start + step)
                write_slot_rows(fout.fileno(), b, start, _read_rows(fin.fileno(), a, start, stop))
        fout.flush()
        os.fsync(fout.fileno())


def activation_view(dst: h5py.File, activations_file: Path, slots: list[ActivationSlot], layers_json: str) -> None:
    """Activation datasets in ``dst`` that read the raw bytes of ``activations_file`` (HDF5 external
    storage), so a reader never parses the HDF5 metadata of a file that is being written."""
    group = dst.require_group("activations")
    for s in slots:
        name = str(activations_file.resolve())
        pieces = [(name, offset, (hi - lo) * s.row_bytes) for lo, hi, offset in s.extents(0, s.shape[0])]
        ds = group.create_dataset(s.hook, shape=s.shape, dtype=s.dtype, external=pieces or None)
        ds.attrs["positions"] = json.dumps(list(POSITIONS))
        ds.attrs["layers"] = layers_json

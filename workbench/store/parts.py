"""Part files: ``batch-{start}-{stop}[.{boot}].part``, one per finished batch (or consecutive batches), the
record of what is finished. A small header (magic ``WBPART01``) and the batch's flat arrays; written under a
temporary name and renamed into place, so a part that exists is whole (docs/FORMAT.md, "Crash safety")."""

from __future__ import annotations

import errno
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from workbench.store.activations import pwrite_all
from workbench.store.durability import boot_id, replace_durably
from workbench.store.format import BATCH_PART
from workbench.store.ragged import concat_batches
from workbench.store.trust import open_nofollow

PART_MAGIC = b"WBPART01"


def write_part(dest: Path, arrays: dict[str, np.ndarray], durable: bool) -> None:
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
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, memoryview(PART_MAGIC + len(head).to_bytes(8, "little") + head + data), 0)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if durable:
        replace_durably(tmp, dest)
    else:
        os.replace(tmp, dest)


def read_part(path: Path) -> dict[str, np.ndarray]:
    """Every array of a batch part (read-only views of one read), its checksum verified."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[8:16], "little")
    head = json.loads(raw[16 : 16 + size]) if raw[:8] == PART_MAGIC else None
    data = memoryview(raw)[16 + size :]
    if head is None or zlib.crc32(data) != head["crc32"]:
        raise OSError(errno.EIO, f"{path} is damaged (bad header or checksum)")
    return {key: np.frombuffer(data, dtype=np.dtype(dtype), count=math.prod(shape), offset=offset).reshape(shape)
            for key, dtype, shape, offset, _ in head["arrays"]}


def part_name(start: int, stop: int, boot: str | None = None) -> str:
    """A batch part's file name: durable without ``boot``, provisional with it."""
    return f"batch-{start:08d}-{stop:08d}" + (f".{boot}" if boot else "") + ".part"


def all_batch_parts(folder: Path) -> list[tuple[int, int, str | None, Path]]:
    """Every batch part in ``folder`` as ``(start, stop, boot or None when durable, path)``."""
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = BATCH_PART.match(p.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), m.group(3), p))
    return sorted(out, key=lambda x: (x[0], x[1], x[2] or ""))


def batch_parts(folder: Path) -> list[tuple[int, int, Path]]:
    """The finished batch parts as ``(start, stop, path)``: every durable part, and the provisional
    parts written since this machine last started that no durable part covers (those after a
    restart are ignored: their bytes may not have reached the disk). Durable parts come last, so
    where a kill left both, a durable part's rows are read last."""
    boot = boot_id()
    parts = all_batch_parts(folder)
    durable = [(a, b, p) for a, b, written, p in parts if written is None]
    provisional = [(a, b, p) for a, b, written, p in parts
                   if written is not None and written == boot and not any(s <= a and b <= e for s, e, _ in durable)]
    return provisional + durable


def done_from_parts(folder: Path, n: int) -> np.ndarray:
    done = np.zeros(n, dtype=bool)
    for start, stop, _ in batch_parts(folder):
        done[start:stop] = True
    return done


def covered(ranges: list[tuple[int, int]], start: int, stop: int) -> bool:
    """Whether rows ``[start, stop)`` lie inside one of ``ranges``."""
    return any(a <= start and stop <= b for a, b in ranges)


def merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` sorted, with overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def consecutive(batches: list[tuple[int, int, Any]]) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Finished batches (``(start, stop, part arrays or a part's path)``) as runs of consecutive
    rows with their arrays joined: one write per array per run."""
    run: list[tuple[int, int, dict[str, np.ndarray]]] = []
    for start, stop, arrays in sorted(batches, key=lambda x: x[0]):
        arrays = read_part(arrays) if isinstance(arrays, Path) else arrays
        if run and (run[-1][1] != start or run[-1][2].keys() != arrays.keys()):
            yield run[0][0], run[-1][1], concat_batches([r[2] for r in run])
            run = []
        run.append((start, stop, arrays))
    if run:
        yield run[0][0], run[-1][1], concat_batches([r[2] for r in run])


def derived_parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("derived-*.h5"))

"""The activation cache file: every token's activations for chosen hooks, one HDF5 file (docs/CACHE.md).

Token-major and ragged: each hook is one dataset ``[n_tokens, ...]`` chunked along tokens, the
samples delimited by ``tokens/offsets[n_samples + 1]``, and each token labelled with its sample,
round, role, transcript position, token id and token string. This module imports neither torch
nor TransformerLens (``workbench info`` reads a cache file without them); :func:`load_activation_cache`
imports torch only when called.

A cache file is created once with every dataset allocated at full size and everything but the
activations written (:func:`create_cache_file`); the activation rows are then written with plain
``pwrite`` into the allocated chunks (:func:`write_rows`), so HDF5 never rewrites the file's
metadata while data is in it. The file is renamed onto its final name only when every row is
there, so a reader never sees a half-written cache: :func:`write_cache_file` fsyncs it first;
:mod:`workbench.cache.writer` does this resumably for ``workbench export``, fsyncing only with
``--fsync``. Token strings are one UTF-8 byte array with offsets (schema 2; schema 1's
variable-length strings are still read).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np

from workbench.errors import WorkbenchError
from workbench.store.activations import ActivationSlot, segments, write_slot_rows
from workbench.store.durability import atomic_replace, libc_function
from workbench.store.reader import decoded_attrs
from workbench.printable import visible
from workbench.store.trust import check_contained, refuse_special_file

FORMAT = "self-correction-workbench-cache"
SCHEMA_VERSION = 2  # 2: token strings as UTF-8 bytes + offsets (1: a variable-length string dataset, still read)
ROLES = ("prompt", "response", "template", "unlabelled", "image")  # image: a VLM run's image tokens (appended: indices stay)
CHUNK_BYTES = 1 << 20  # about 1 MiB of one hook per chunk
NUL_STAND_IN = "\u2400"  # how schema 1 stored NUL (HDF5 strings cannot hold it); schema 2 keeps it
# TransformerLens hooks laid out [batch, head, query_pos, key_pos]; every other hook is [batch, pos, ...]
ATTENTION_MAP_SUFFIXES = ("attn.hook_pattern", "attn.hook_attn_scores")


@dataclass(frozen=True)
class TokenTable:
    """Per-token labels of ``T`` tokens in ``S`` samples (the ``tokens/`` group)."""

    offsets: np.ndarray  # [S + 1] int64: sample i's tokens are rows offsets[i]:offsets[i + 1]
    sample: np.ndarray  # [T] int32: the sample (run-file row; batch index for a saved cache)
    round: np.ndarray  # [T] int16: 0-based round, -1 when there is none
    role: np.ndarray  # [T] uint8: index into ROLES
    position: np.ndarray  # [T] int32: position in the sample's transcript
    token_id: np.ndarray  # [T] int32 (-1 when unknown)
    token_str: list[str]  # [T] each token decoded alone (TransformerLens' to_str_tokens)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])


@dataclass(frozen=True)
class HookLayout:
    """How one hook's TransformerLens value maps onto rows of tokens.

    TransformerLens gives ``[batch, pos, *rest]``, or ``[batch, head, query_pos, key_pos]`` for
    attention patterns and scores; the file stores ``[T, *per_token]`` with the (query) position
    axis first, so ``per_token`` is ``rest``, or ``(head, key_pos)`` with ``key_pos`` padded with
    zeros to the file's longest transcript."""

    name: str
    per_token: tuple[int, ...]
    dtype: str  # "float32" or "float16"

    @property
    def is_attention_map(self) -> bool:
        return is_attention_map(self.name)


def is_attention_map(name: str) -> bool:
    """Whether TransformerLens lays the hook out ``[batch, head, query_pos, key_pos]``."""
    return name.endswith(ATTENTION_MAP_SUFFIXES)


def token_major(name: str, value: np.ndarray) -> np.ndarray:
    """A TransformerLens value ``[batch, pos, *rest]`` (``[batch, head, q, k]`` for attention maps)
    → ``[batch, pos, *per_token]``."""
    return np.swapaxes(value, 1, 2) if is_attention_map(name) else value


def _chunk_rows(per_token: tuple[int, ...], itemsize: int, n_tokens: int) -> int:
    row = itemsize * int(np.prod(per_token, dtype=np.int64))
    return max(1, min(n_tokens, CHUNK_BYTES // max(1, row)))


def utf8_with_offsets(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 byte array and where each starts: (bytes ``[B]`` uint8, offsets
    ``[len(strings) + 1]`` int64); string ``i`` is ``bytes[offsets[i] : offsets[i + 1]]``.

    One encode of the text joined by NULs: where no string holds a NUL, the NUL bytes are the
    boundaries (UTF-8 has no 0 byte inside a character), so no Python call is made per string."""
    n = len(strings)
    if not n:
        return np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64)
    data = np.frombuffer("\0".join(strings).encode("utf-8"), dtype=np.uint8)
    nul = np.flatnonzero(data == 0)
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = 0
    if len(nul) == n - 1:
        offsets[1:n] = nul - np.arange(n - 1)  # each boundary less the NULs before it
        offsets[n] = len(data) - (n - 1)
        keep = np.ones(len(data), dtype=bool)
        keep[nul] = False
        return data[keep], offsets
    np.cumsum([len(s.encode("utf-8")) for s in strings], out=offsets[1:])  # some string holds a NUL
    return np.frombuffer("".join(strings).encode("utf-8"), dtype=np.uint8), offsets


def read_token_strings(tokens: h5py.Group, rows: Sequence[np.ndarray]) -> list[list[str]]:
    """The token strings of each array of token rows in ``rows``, from a cache file's ``tokens/``
    group (either schema): ``[len(rows)][len(rows[i])]``."""
    if "token_str" in tokens:  # schema 1: a variable-length string dataset
        strings = tokens["token_str"][...]
        return [[s.decode() if isinstance(s, bytes) else s for s in strings[p]] for p in rows]
    text = tokens["token_str_utf8"][...].tobytes()
    offsets = tokens["token_str_offsets"][...].tolist()
    return [[text[offsets[j] : offsets[j + 1]].decode("utf-8") for j in p.tolist()] for p in rows]


def preallocate(path: Path) -> None:
    """Reserve the disk blocks of the whole (sparse) file at ``path`` now, as ``numpy.save`` does
    before it writes (Linux ``fallocate``): rows written later go into allocated blocks, which is
    faster than filling holes (about a third on this project's ext4), and a disk too small for the
    file fails now (``OSError`` ENOSPC), before any batch is computed. Where the call or the file
    system cannot, nothing: the writes allocate."""
    fallocate = libc_function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if fallocate is None:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        if fallocate(fd, 0, 0, os.fstat(fd).st_size) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _attr(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, np.integer, np.floating)) else json.dumps(value)


_VLEN_UTF8 = h5py.string_dtype("utf-8")


def _put_attr(oid: Any, name: str, value: Any) -> None:
    """Write a scalar attribute on the object with low-level id ``oid``, typed as ``obj.attrs[name]
    = value`` types it (str: variable-length UTF-8; int: int64; float: float64; bool), through
    h5py's low-level API: a third of the time, and a cache file's creation writes about 25 of them."""
    data = np.array(value, dtype=_VLEN_UTF8) if isinstance(value, str) else np.asarray(value)
    attr = h5py.h5a.create(oid, name.encode(), h5py.h5t.py_create(data.dtype, logical=True), h5py.h5s.create(h5py.h5s.SCALAR))
    attr.write(data)


def _put_dataset(group: h5py.Group, name: str, data: np.ndarray) -> h5py.h5d.DatasetID:
    """Write ``data`` as a contiguous dataset (as ``group.create_dataset(name, data=data)`` does,
    through the low-level API) and return its id."""
    data = np.ascontiguousarray(data)
    ds = h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(data.dtype), h5py.h5s.create_simple(data.shape))
    if data.size:
        ds.write(h5py.h5s.ALL, h5py.h5s.ALL, data)
    return ds


def create_cache_file(
    path: Path,
    attrs: dict[str, Any],
    tokens: TokenTable,
    layouts: Sequence[HookLayout],
    samples: np.ndarray,
    sample_index: np.ndarray | None = None,
    status: str = "complete",
) -> list[ActivationSlot]:
    """Create a cache file at ``path`` with its attributes, ``samples/`` and ``tokens/`` written and
    every ``activations/`` dataset allocated at full size but not written; returns where each
    hook's rows lie in the file, in ``layouts`` order.

    The activations are then written with :func:`write_rows` (plain ``pwrite`` into the allocated
    chunks), so the file's HDF5 metadata is never written again. The file's disk blocks are
    reserved now (:func:`preallocate`): a disk too small for it fails here. ``path`` is written in
    place and not fsynced: create it under a temporary name (the callers do). ``attrs`` are the
    root attributes (dicts and lists stored as JSON); ``samples`` ``[S]`` each sample's run-file row
    (a sample may have no tokens); ``sample_index`` ``[S]`` its stable global index (default: the row)."""
    n = tokens.n_tokens
    slots: list[ActivationSlot] = []
    rows = np.asarray(samples, dtype=np.int64)
    text, text_offsets = utf8_with_offsets(tokens.token_str)
    root = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "status": status,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **{key: _attr(value) for key, value in attrs.items()},
            "n_samples": len(tokens.offsets) - 1, "n_tokens": n, "hooks": json.dumps([h.name for h in layouts])}
    labels = {
        "offsets": np.asarray(tokens.offsets, dtype=np.int64),
        "sample": np.asarray(tokens.sample, dtype=np.int32),
        "round": np.asarray(tokens.round, dtype=np.int16),
        "role": np.asarray(tokens.role, dtype=np.uint8),
        "position": np.asarray(tokens.position, dtype=np.int32),
        "token_id": np.asarray(tokens.token_id, dtype=np.int32),
        "token_str_utf8": text,
        "token_str_offsets": text_offsets,
    }

    def fill(f: h5py.File) -> None:
        for key, value in root.items():
            _put_attr(f.id, key, value)
        s = f.create_group("samples")
        _put_dataset(s, "sample", rows)
        _put_dataset(s, "index", rows if sample_index is None else np.asarray(sample_index, dtype=np.int64))
        t = f.create_group("tokens")
        for name, values in labels.items():
            dsid = _put_dataset(t, name, values)
            if name == "role":
                _put_attr(dsid, "labels", json.dumps(list(ROLES)))
        a = f.create_group("activations")
        for h in layouts:
            dsid, slot = _allocated_dataset(a, h, n)
            _put_attr(dsid, "axes", json.dumps(["token", *(("head", "key_pos") if h.is_attention_map else
                                                           [f"dim{i}" for i in range(len(h.per_token))])]))
            _put_attr(dsid, "layout", "batch head query_pos key_pos" if h.is_attention_map else "batch pos ...")
            slots.append(slot)

    with h5py.File(path, "w", locking=False) as f:
        fill(f)
    preallocate(path)
    return slots


def _allocated_dataset(group: h5py.Group, h: HookLayout, n: int) -> tuple[Any, ActivationSlot]:
    """``[n, *per_token]`` chunked along tokens (about ``CHUNK_BYTES`` a chunk), every chunk
    allocated now and none written (no fill values: each row is written exactly once) → (its
    low-level dataset id, where its rows lie)."""
    dtype = np.dtype(h.dtype)
    shape = (n, *h.per_token)
    if not n or not all(shape):
        return group.create_dataset(h.name, shape=shape, dtype=dtype).id, ActivationSlot(h.name, shape, str(dtype), ())
    rows = _chunk_rows(h.per_token, dtype.itemsize, n)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((rows, *h.per_token))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    tid = h5py.h5t.py_create(dtype, logical=True)
    dsid = h5py.h5d.create(group.id, h.name.encode(), tid, h5py.h5s.create_simple(shape), dcpl=dcpl)
    row_bytes = int(np.prod(h.per_token, dtype=np.int64)) * dtype.itemsize
    return dsid, ActivationSlot(h.name, shape, str(dtype), _chunk_segments(dsid, n, rows, row_bytes))


def _chunk_segments(dsid: Any, n: int, rows: int, row_bytes: int) -> tuple[tuple[int, int], ...]:
    """The ``(first row, byte offset)`` runs of consecutive chunks of an allocated dataset ``[n, ...]``
    chunked ``rows`` rows at a time (low-level id ``dsid``)."""
    offsets = np.zeros(-(-n // rows), dtype=np.int64)

    def record(info: Any) -> None:
        offsets[info.chunk_offset[0] // rows] = info.byte_offset

    dsid.chunk_iter(record)
    return tuple((chunk * rows, offset) for chunk, offset in segments(offsets, rows * row_bytes))


def activation_slot(ds: h5py.Dataset) -> ActivationSlot:
    """Where the rows of an allocated, uncompressed dataset ``[n, ...]`` lie in its file: HDF5
    allocates the chunks in order with an index node now and then between them, so the rows form
    a few contiguous segments (:class:`workbench.store.writer.ActivationSlot`)."""
    name, shape, dtype = ds.name.rsplit("/", 1)[-1], tuple(int(x) for x in ds.shape), ds.dtype
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if not shape[0] or not row_bytes:
        return ActivationSlot(name, shape, str(dtype), ())
    if ds.chunks is None:
        return ActivationSlot(name, shape, str(dtype), ((0, int(ds.id.get_offset())),))
    return ActivationSlot(name, shape, str(dtype), _chunk_segments(ds.id, shape[0], ds.chunks[0], row_bytes))


def write_rows(fd: int, slots: Sequence[ActivationSlot], start: int, arrays: dict[str, np.ndarray]) -> int:
    """pwrite ``{hook: [n, *per_token]}`` as token rows ``start : start + n`` of a file made by
    :func:`create_cache_file` (open as ``fd``); every slot's hook must be there. Returns ``n``."""
    n = None
    for slot in slots:
        value = np.ascontiguousarray(arrays[slot.hook], dtype=slot.dtype)
        if value.shape[1:] != slot.shape[1:] or (n is not None and len(value) != n) or start + len(value) > slot.shape[0]:
            raise ValueError(f"{slot.hook}: rows {start}:{start + len(value)} of shape {value.shape[1:]} do not fit {slot.shape}")
        n = len(value)
        write_slot_rows(fd, slot, start, value)
    return n or 0


def write_cache_file(
    path: Path,
    attrs: dict[str, Any],
    tokens: TokenTable,
    layouts: Sequence[HookLayout],
    blocks: Iterable[tuple[int, dict[str, np.ndarray]]],
    samples: np.ndarray,
    sample_index: np.ndarray | None = None,
) -> Path:
    """Write a whole cache file atomically (``PATH.tmp``, fsync, rename) and return ``path``.

    ``blocks`` yields ``(first_token_row, {hook: [n, *per_token]})`` covering every token row once,
    in any order; the other arguments are :func:`create_cache_file`'s."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    slots = create_cache_file(tmp, attrs, tokens, layouts, samples, sample_index)
    written = 0
    try:
        with open(tmp, "r+b") as fh:
            for start, arrays in blocks:
                written += write_rows(fh.fileno(), slots, start, arrays)
        if layouts and written != tokens.n_tokens:
            raise AssertionError(f"cache blocks covered {written} of {tokens.n_tokens} token rows")
        atomic_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- reading


def is_cache_file(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file with this module's ``format`` attribute."""
    try:
        refuse_special_file(path)
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except (OSError, RuntimeError, WorkbenchError):
        return False


def recorded_run(path: Path) -> tuple[str | None, Path | None]:
    """The run a cache file was exported from: the path it records (``run_file``; None for a cache
    ``save_activation_cache`` wrote) and that file when it is there — the path as recorded, else
    the same name beside the cache (the two were moved together) — or None."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        recorded = f.attrs.get("run_file")
    if recorded is None:
        return None, None
    recorded = recorded.decode() if isinstance(recorded, bytes) else str(recorded)
    for candidate in (Path(recorded), path.parent / Path(recorded).name):
        if candidate.is_file() and candidate.resolve() != path.resolve():
            return recorded, candidate
    return recorded, None


def open_cache_file(path: Path) -> h5py.File:
    """Open a cache file read-only, refusing anything else with one line."""
    path = Path(path)
    refuse_special_file(path)
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise WorkbenchError(f"cache file not found: {path}") from None
    except (OSError, RuntimeError):
        raise WorkbenchError(f"{path} is not a readable HDF5 file") from None
    try:
        check_contained(f, path)
    except BaseException:
        f.close()
        raise
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise WorkbenchError(f"{path} is not a workbench cache file (no format={FORMAT!r} attribute)")
    if int(f.attrs.get("schema_version", -1)) > SCHEMA_VERSION:
        f.close()
        raise WorkbenchError(f"{path} has cache schema_version {f.attrs['schema_version']}; this workbench reads up to {SCHEMA_VERSION}")
    if f.attrs.get("status", "complete") != "complete":
        f.close()
        raise WorkbenchError(f"{path} is an unfinished export (its activations are not all written); "
                             "finish it with the same `workbench export … --resume`")
    return f


def cache_summary(path: Path) -> dict[str, Any]:
    """What ``workbench info`` shows about a cache file: attributes (JSON decoded; the selection's
    rounds counted from 1, as the CLI takes them — the file stores them 0-based), tokens per role,
    and each hook's shape and dtype."""
    with open_cache_file(path) as f:
        meta = decoded_attrs(f.attrs)
        roles = np.bincount(f["tokens/role"][...], minlength=len(ROLES))
        hooks = {name: {"shape": list(ds.shape), "dtype": str(ds.dtype), "mib": round(ds.size * ds.dtype.itemsize / 2**20, 2)}
                 for name, ds in f["activations"].items()}
    selection = meta.get("selection")
    if isinstance(selection, dict) and isinstance(selection.get("rounds"), list):  # stored 0-based; shown from 1
        meta["selection"] = {**selection, "rounds": [int(r) + 1 for r in selection["rounds"]]}
    return {"path": str(path), "meta": meta, "tokens_per_role": {r: int(c) for r, c in zip(ROLES, roles) if c},
            "hooks": {h: hooks[h] for h in meta.get("hooks", hooks)}}


def print_cache_info(path: Path, as_json: bool = False) -> None:
    """Print :func:`cache_summary` as a few plain lines, or as JSON."""
    s = cache_summary(path)
    if as_json:
        print(json.dumps(s, indent=2, default=str))
        return
    m = s["meta"]

    def show(line: str) -> None:  # every field comes from the file: its control characters shown, not obeyed
        print(visible(line, newlines=False))

    show(f"{s['path']}  cache schema {m.get('schema_version')}  model={m.get('model_name', '?')}  "
          f"samples={m.get('n_samples')}  tokens={m.get('n_tokens')}  dtype={m.get('activation_dtype')}")
    if "run_file" in m:
        show(f"from run {m['run_file']} (digest {m.get('run_digest', '?')[:16]})  selection {json.dumps(m.get('selection'))}")
    if m.get("dtype_note"):
        show(m["dtype_note"])
    show("tokens per role: " + ", ".join(f"{r} {c}" for r, c in s["tokens_per_role"].items()))
    width = max((len(h) for h in s["hooks"]), default=0)
    for name, h in s["hooks"].items():
        show(f"  {name:<{width}}  {h['shape']}  {h['dtype']}  {h['mib']} MiB")


class _LazyTensors(dict):
    """A dict of hook → tensor whose tensors are read from the file on first access."""

    def __init__(self, loaders: dict[str, Any]):
        super().__init__({k: None for k in loaders})
        self._loaders = loaders

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if value is None:
            value = self._loaders[key]()
            super().__setitem__(key, value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self) -> list[Any]:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]


@dataclass(frozen=True)
class ModelConfig:
    """The part of a TransformerLens ``model.cfg`` that ``ActivationCache`` methods such as
    ``accumulated_resid``, ``stack_activation`` and negative layer indices read, filled from the
    model's Hugging Face ``config.json`` (:func:`model_config`)."""

    model_name: str
    n_layers: int
    d_model: int
    n_heads: int | None = None
    d_head: int | None = None
    d_mlp: int | None = None
    d_vocab: int | None = None
    n_ctx: int | None = None
    normalization_type: str | None = None  # "RMS" or "LN"
    attn_only: bool = False
    final_rms: bool = False


class ConfigOnlyModel:
    """What a loaded cache hands its ``ActivationCache`` as ``model`` when none is given: the
    model's :class:`ModelConfig` as ``cfg`` and nothing else. A method that needs more (weights:
    ``apply_ln=True``, ``logit_attrs``, ``compute_head_results``…) gets one line naming ``model=``."""

    def __init__(self, cfg: ModelConfig | None, why: str) -> None:
        self._cfg, self._why = cfg, why

    @property
    def cfg(self) -> ModelConfig:
        if self._cfg is None:
            raise WorkbenchError(f"this needs the model's config, and {self._why}: pass "
                                 "load_activation_cache(..., model=load_model(NAME_OR_PATH)) (or a TransformerBridge)")
        return self._cfg

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_cfg", "_why"):
            raise AttributeError(name)
        raise WorkbenchError(f"ActivationCache needs the model itself for this (model.{name}), not only its config: "
                             "pass load_activation_cache(..., model=load_model(NAME_OR_PATH)) (or a TransformerBridge)")


def _hf_config_file(model_path: str, revision: str = "") -> Path | None:
    """The ``config.json`` of a model folder, or of a hub name already in the local Hugging Face
    cache (nothing is downloaded); None when neither is there."""
    if not model_path:
        return None
    folder = Path(model_path)
    if folder.is_dir():
        return folder / "config.json" if (folder / "config.json").is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_path, "config.json", revision=revision or None)
    except Exception:  # not a hub name (a folder that is gone), or no hub library
        return None
    return Path(found) if isinstance(found, str) else None


def model_config(meta: dict[str, Any]) -> tuple[ModelConfig | None, str]:
    """The :class:`ModelConfig` of the model a cache records (its ``model_path``: a folder, or a hub
    name in the local Hugging Face cache), and "" — or None and why not (one phrase)."""
    model_path, name = str(meta.get("model_path", "") or ""), str(meta.get("model_name", "") or "")
    config_file = _hf_config_file(model_path, str(meta.get("model_revision", "") or ""))
    if config_file is None:
        where = f"{name or 'its model'}'s config.json is not at {model_path!r}" if model_path else "the cache records no model path"
        return None, where
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{config_file} does not read ({type(e).__name__})"
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw  # vision-language models

    def first(*keys: str) -> Any:
        return next((text[k] for k in keys if isinstance(text.get(k), int)), None)

    n_layers = first("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    d_model = first("hidden_size", "n_embd", "d_model")
    if n_layers is None or d_model is None:
        return None, f"{config_file} names no layer count or width"
    n_heads = first("num_attention_heads", "n_head", "num_heads")
    d_head = first("head_dim") or (d_model // n_heads if n_heads else None)
    norm = "RMS" if "rms_norm_eps" in text else "LN" if any(k in text for k in ("layer_norm_eps", "layer_norm_epsilon")) else None
    return ModelConfig(model_name=name or model_path, n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
                       d_mlp=first("intermediate_size", "n_inner", "ffn_dim"), d_vocab=first("vocab_size"),
                       n_ctx=first("max_position_embeddings", "n_positions", "n_ctx"), normalization_type=norm,
                       final_rms=norm == "RMS"), ""


@dataclass(frozen=True)
class LoadedCache:
    """What :func:`load_activation_cache` gives back: ``B`` samples padded to ``P`` positions.

    It indexes like the TransformerLens ``ActivationCache`` it holds (``c["resid_post", 3]``,
    ``c["blocks.3.hook_resid_post"]``, ``c.accumulated_resid()``, ``c.stack_activation(…)``, …):
    each hook is TransformerLens-shaped (``[B, P, *rest]``; ``[B, head, P, key_pos]`` for attention
    maps) and read from disk on first access; positions past a sample's own tokens are 0.
    """

    cache: Any  # transformer_lens.ActivationCache
    token_ids: Any  # [B, P] int64 torch tensor, -1 in padding
    sample: Any  # [B] int64: each row's sample (run-file row)
    round: Any  # [B, P] int16 torch tensor: the token's round counted from 1; 0 for a token of no round; -1 in padding
    role: Any  # [B, P] uint8 torch tensor: index into ROLES (255 in padding)
    position: Any  # [B, P] int32: position in the transcript, -1 in padding
    mask: Any  # [B, P] bool: real tokens
    token_str: list[list[str]]  # [B][n_i]
    meta: dict[str, Any]

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES

    def __getitem__(self, key: Any) -> Any:
        """``self.cache[key]``: a hook's tensor by name or TransformerLens shorthand (``("resid_post", 3)``)."""
        return self.cache[key]

    def __contains__(self, key: Any) -> bool:
        return key in self.cache.cache_dict

    def __iter__(self) -> Any:
        return iter(self.cache)

    def __len__(self) -> int:
        return len(self.cache)

    def __getattr__(self, name: str) -> Any:
        """Every other ``ActivationCache`` attribute (``accumulated_resid``, ``stack_activation``,
        ``keys``, ``model``…), from the cache held."""
        if name.startswith("__") or name == "cache":
            raise AttributeError(name)
        return getattr(self.cache, name)


def _select(values: Sequence[int] | slice | None, all_values: np.ndarray) -> np.ndarray:
    if values is None:
        return np.ones(len(all_values), dtype=bool)
    if isinstance(values, slice):
        lo = -np.inf if values.start is None else values.start
        hi = np.inf if values.stop is None else values.stop
        return (all_values >= lo) & (all_values < hi)
    return np.isin(all_values, np.asarray(list(values)))


def load_activation_cache(
    path: str | Path,
    hooks: Sequence[str] | None = None,
    samples: Sequence[int] | slice | None = None,
    rounds: Sequence[int] | None = None,
    roles: Sequence[str] | None = None,
    model: Any = None,
    device: str = "cpu",
) -> LoadedCache:
    """A cache file as a TransformerLens ``ActivationCache`` (lazy: each hook is read on first access).

    ``hooks`` (default all), ``samples`` (run-file rows, as in ``tokens/sample``), ``rounds``
    (counted from 1, as in the CLI and the TUI) and ``roles`` (names from ``ROLES``) select tokens;
    the selected tokens of each sample form one row, right-padded to the longest. ``model`` (a
    ``LoadedModel`` or a ``TransformerBridge``) is handed to the ``ActivationCache`` for its methods
    that need the model; without it the cache gets the model's config (:func:`model_config`, from
    the ``config.json`` at the model path the cache records), enough for ``accumulated_resid``,
    ``stack_activation`` and negative layers; what needs more says so in one line. See
    :class:`LoadedCache` for shapes."""
    import torch
    from transformer_lens import ActivationCache

    if rounds is not None:
        rounds = list(rounds)
        bad = [r for r in rounds if not isinstance(r, (int, np.integer)) or r < 1]
        if bad:
            raise WorkbenchError(f"rounds={rounds}: rounds are counted from 1 (round 1 is the first), got {bad[0]!r}")
    f = open_cache_file(Path(path))
    meta = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    available = list(f["activations"].keys())
    hooks = list(hooks) if hooks is not None else json.loads(f.attrs.get("hooks", json.dumps(available)))
    merged = json.loads(f.attrs.get("hook_aliases", "{}"))  # an alias exported once, under its canonical name
    dataset = {h: h if h in available else merged.get(h, h) for h in hooks}
    missing = [h for h in hooks if dataset[h] not in available]
    if missing:
        f.close()
        raise WorkbenchError(f"{path} has no hook {missing[0]!r} (it has: {', '.join(available)})")
    bad_roles = [r for r in roles or () if r not in ROLES]
    if bad_roles:
        f.close()
        raise WorkbenchError(f"unknown role {bad_roles[0]!r} (roles: {', '.join(ROLES)})")
    t = f["tokens"]
    offsets = t["offsets"][...]
    sample_of_row = f["samples/sample"][...]
    round_all, role_all = t["round"][...], t["role"][...]
    keep = _select(None if rounds is None else [int(r) - 1 for r in rounds], round_all.astype(np.int64))  # the file counts from 0
    if roles is not None:
        keep &= np.isin(role_all, [ROLES.index(r) for r in roles])
    picked, kept = [], []  # per sample with any selected token: its token rows; its file row
    for i in np.flatnonzero(_select(samples, sample_of_row)):
        rows = np.arange(offsets[i], offsets[i + 1])[keep[offsets[i] : offsets[i + 1]]]
        if len(rows):
            picked.append(rows)
            kept.append(i)
    batch = len(picked)
    width = max((len(p) for p in picked), default=0)
    flat = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    b_idx = np.repeat(np.arange(batch), [len(p) for p in picked])
    p_idx = np.concatenate([np.arange(len(p)) for p in picked]) if picked else np.zeros(0, dtype=np.int64)

    def padded(values: np.ndarray, fill: Any, dtype: Any) -> Any:
        out = np.full((batch, width), fill, dtype=dtype)
        out[b_idx, p_idx] = values[flat]
        return torch.from_numpy(out)

    token_ids = padded(t["token_id"][...].astype(np.int64), -1, np.int64)
    token_str = read_token_strings(t, picked)

    def loader(name: str) -> Any:
        def load() -> Any:
            ds = f["activations"][dataset[name]]
            out = np.zeros((batch, width, *ds.shape[1:]), dtype=ds.dtype)
            for i, p in enumerate(picked):  # each sample's tokens are one contiguous read, masked after
                lo, hi = int(p[0]), int(p[-1]) + 1
                out[i, : len(p)] = ds[lo:hi][p - lo]
            value = torch.from_numpy(out)
            return (value.transpose(1, 2) if is_attention_map(name) else value).to(device)
        return load

    if model is None:
        model = ConfigOnlyModel(*model_config(meta))
    else:
        model = getattr(model, "bridge", model)  # a LoadedModel: its TransformerBridge
    cache = ActivationCache(_LazyTensors({h: loader(h) for h in hooks}), model, has_batch_dim=True)
    return LoadedCache(
        cache=cache,
        token_ids=token_ids,
        sample=torch.from_numpy(sample_of_row[np.asarray(kept, dtype=np.int64)].astype(np.int64)),
        round=padded((round_all.astype(np.int32) + 1).astype(np.int16), -1, np.int16),  # from 1; no round (-1 in the file) → 0
        role=padded(role_all, 255, np.uint8),
        position=padded(t["position"][...], -1, np.int32),
        mask=padded(np.ones(len(round_all), dtype=bool), False, bool),
        token_str=token_str,
        meta=meta,
    )


def save_activation_cache(
    cache: Any,
    path: str | Path,
    tokens: Any = None,
    model: Any = None,
    dtype: str | None = None,
    token_str: Sequence[Sequence[str]] | None = None,
) -> Path:
    """Save a TransformerLens ``ActivationCache`` (or a dict hook → tensor) as a cache file; returns its path.

    Every value is ``[batch, pos, *rest]`` (``[batch, head, pos, pos]`` for attention maps), all
    with the same batch and pos; ``tokens`` ``[batch, pos]`` are their token ids (optional).
    float32 and float16 are stored as they are (bit for bit); bfloat16 as float32, or as ``dtype``.
    ``model`` (a ``LoadedModel``, a ``TransformerBridge``, or None) adds the model to the metadata;
    with a tokenizer it also gives each token's string."""
    import torch

    items = list(cache.items())
    if not items:
        raise WorkbenchError("save_activation_cache: the cache is empty")
    batched = getattr(cache, "has_batch_dim", True)
    values: dict[str, np.ndarray] = {}
    for name, value in items:
        value = value.detach()
        if not value.is_floating_point():
            raise WorkbenchError(f"save_activation_cache: {name} holds {value.dtype} values, not activations")
        value = value if batched else value[None]
        if value.dtype == torch.bfloat16 or dtype is not None:
            value = value.to(getattr(torch, dtype or "float32"))
        values[name] = token_major(name, value.cpu().numpy())
    batch, pos = next(iter(values.values())).shape[:2]
    for name, value in values.items():
        if value.shape[:2] != (batch, pos) or (is_attention_map(name) and value.shape[-1] != pos):
            raise WorkbenchError(f"save_activation_cache: {name} is not [batch={batch}, pos={pos}, ...] like the first hook")
    ids = np.full((batch, pos), -1, dtype=np.int64) if tokens is None else np.asarray(
        tokens.cpu() if hasattr(tokens, "cpu") else tokens, dtype=np.int64).reshape(batch, pos)
    tokenizer = getattr(model, "tokenizer", None)
    if token_str is None:
        token_str = [[tokenizer.decode([int(i)]) if tokenizer is not None and i >= 0 else "" for i in row] for row in ids]
    n = batch * pos
    table = TokenTable(
        offsets=np.arange(batch + 1, dtype=np.int64) * pos,
        sample=np.repeat(np.arange(batch, dtype=np.int32), pos),
        round=np.full(n, -1, dtype=np.int16),
        role=np.full(n, ROLES.index("unlabelled"), dtype=np.uint8),
        position=np.tile(np.arange(pos, dtype=np.int32), batch),
        token_id=ids.reshape(-1).astype(np.int32),
        token_str=[s for row in token_str for s in row],
    )
    layouts = [HookLayout(name, tuple(v.shape[2:]), str(v.dtype)) for name, v in values.items()]
    attrs: dict[str, Any] = {"source": "save_activation_cache", "activation_dtype": ",".join(sorted({h.dtype for h in layouts}))}
    if hasattr(model, "metadata"):
        attrs.update(model.metadata())
    elif model is not None and hasattr(model, "cfg"):
        attrs["model_name"] = str(getattr(model.cfg, "model_name", ""))
    from workbench.version import __version__

    attrs["workbench_version"] = __version__
    blocks = ((i * pos, {name: v[i] for name, v in values.items()}) for i in range(batch))
    return write_cache_file(Path(path), attrs, table, layouts, blocks, samples=np.arange(batch))

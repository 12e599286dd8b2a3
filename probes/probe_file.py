"""The probe file: a fitted concept direction per layer and everything needed to refuse misuse.

HDF5, readable with plain h5py. Root attributes: ``format`` = ``self-correction-workbench-probe``,
``schema_version``, ``model_name``, ``model_path``, ``model_revision``, ``d_model``, ``n_layers``,
``hook``, ``position`` (``last``/``mean``), ``method``, ``contrast`` (JSON: name, n, n_positive,
n_pairs, digest), ``test_fraction``, ``seed``, ``best_layer``, ``created``. Datasets (``L`` fitted layers):
``layers [L]``, ``directions [L, d_model]`` (unit norm, positives project higher), ``thresholds [L]``,
``train_accuracy [L]``, ``test_accuracy [L]``, ``test_auroc [L]``, ``test_margin [L]``, for contrasts with a
continuous ground truth ``test_target_spearman [L]``, and for ``ridge`` ``alpha [L]`` (the penalty chosen
per layer). Files written since ``ridge`` existed also carry ``best_layer_by`` (``test_accuracy``, or
``test_target_spearman`` for a regression probe fitted to a target) and ``fitted_to`` (``label`` or
``target``); files written since ``--adapter`` existed carry ``adapter_sha256`` (the sha256 of the LoRA
adapter merged into the model it was fitted on, ``""`` for none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from workbench.errors import WorkbenchError
from workbench.store.durability import write_h5_atomic
from workbench.store.trust import check_contained, refuse_special_file, refuse_symlinks

FORMAT = "self-correction-workbench-probe"
SCHEMA_VERSION = 1
ARRAYS = ("layers", "directions", "thresholds", "train_accuracy", "test_accuracy", "test_auroc")


@dataclass(frozen=True)
class Probe:
    """A probe file's contents. Arrays are per fitted layer (``[L]``, directions ``[L, d_model]``)."""

    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def best_layer(self) -> int:
        """The model layer (not the row) with the best held-out accuracy."""
        return int(self.meta["best_layer"])

    @property
    def name(self) -> str:
        return self.path.stem


def check_probe_out(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, a ``--out`` that is a symlink, an existing file without ``overwrite``,
    or (even with it) an existing file that is not a probe file (a run file, a cache…). Raises
    WorkbenchError with one line."""
    path = Path(path)
    refuse_symlinks(path)
    if not path.exists():
        return
    if not overwrite:
        raise WorkbenchError(f"--out {path} already exists (use --overwrite to replace it)")
    try:
        with h5py.File(path, "r") as f:
            is_probe = f.attrs.get("format") == FORMAT
    except (OSError, RuntimeError):
        is_probe = False
    if not is_probe:
        raise WorkbenchError(f"--out {path} exists and is not a probe file: refusing to replace it, even with --overwrite")


def save_probe(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write a probe file (replacing one there: written beside it, then renamed over it, so a
    symlink at ``path`` is replaced, never written through). ``meta`` becomes root attributes
    (dicts/lists as JSON). Returns ``path``."""
    missing = [a for a in ARRAYS if a not in arrays]
    if missing:
        raise ValueError(f"probe arrays missing: {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_h5_atomic(path, lambda f: _fill_probe(f, meta, arrays))
    return path


def _fill_probe(f: h5py.File, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for key, value in meta.items():
        f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
    for name, value in arrays.items():
        f.create_dataset(name, data=np.asarray(value))


REQUIRED_ATTRS = ("model_name", "model_path", "d_model", "hook", "position", "method", "best_layer")


def load_probe(path: Path) -> Probe:
    """Read a probe file, refusing anything that is not one: a foreign or damaged file, an
    attribute whose JSON does not parse, a missing attribute or array, arrays whose lengths
    disagree, or a ``best_layer`` that is not among the fitted layers."""
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"probe file not found: {path}")
    if path.is_dir():
        raise WorkbenchError(f"{path} is a folder, not a probe file")
    refuse_special_file(path)
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise WorkbenchError(f"{path} is not a readable HDF5 file") from None
    try:
        with f:
            check_contained(f, path)
            if not (isinstance(f.attrs.get("format"), str) and f.attrs["format"] == FORMAT):
                raise WorkbenchError(f"{path} is not a probe file (no format={FORMAT!r} attribute)")
            meta = {}
            for key, value in f.attrs.items():
                value = value.item() if isinstance(value, np.generic) else value
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                if isinstance(value, str) and value.startswith(("[", "{")):
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError:
                        raise WorkbenchError(f"{path}: attribute {key!r} is not valid JSON") from None
                meta[key] = value
            arrays = {name: f[name][...] for name in f.keys() if isinstance(f[name], h5py.Dataset)}
    except (OSError, RuntimeError, KeyError) as e:
        raise WorkbenchError(f"{path}: damaged probe file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    _check(path, meta, arrays)
    return Probe(path, meta, arrays)


def _check(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    missing = [k for k in REQUIRED_ATTRS if k not in meta] + [a for a in ARRAYS if a not in arrays]
    if missing:
        raise WorkbenchError(f"{path}: not a complete probe file (missing {', '.join(missing)})")
    for key in ("model_name", "model_path", "hook", "position", "method"):
        if not isinstance(meta[key], str):
            raise WorkbenchError(f"{path}: attribute {key!r} must be a string")
    if meta["position"] not in ("last", "mean"):
        raise WorkbenchError(f"{path}: position must be last or mean, not {meta['position']!r}")
    for key in ("d_model", "best_layer"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], (int, np.integer)):
            raise WorkbenchError(f"{path}: attribute {key!r} must be an integer")
    layers = arrays["layers"]
    if layers.ndim != 1 or layers.size == 0 or layers.dtype.kind not in "iu":
        raise WorkbenchError(f"{path}: layers must be a non-empty list of layer numbers")
    n = len(layers)
    if arrays["directions"].shape != (n, int(meta["d_model"])) or arrays["directions"].dtype.kind != "f":
        raise WorkbenchError(f"{path}: directions must be [{n} layers, d_model {meta['d_model']}] floats, "
                             f"not {list(arrays['directions'].shape)}")
    bad = [int(layer) for layer, row in zip(layers, arrays["directions"]) if not np.all(np.isfinite(row)) or not np.any(row)]
    if bad:
        raise WorkbenchError(f"{path}: the direction of layer {bad[0]} is not finite or is all zeros (a failed fit, or a damaged "
                             "file): its scores would be NaN; fit the probe again")
    for name in (*ARRAYS[2:], "test_target_spearman", "test_margin", "alpha"):
        if name in arrays and (arrays[name].shape != (n,) or arrays[name].dtype.kind not in "fiu"):
            raise WorkbenchError(f"{path}: {name} must be [{n}] numbers, one per layer")
    if int(meta["best_layer"]) not in {int(x) for x in layers}:
        raise WorkbenchError(f"{path}: best_layer {meta['best_layer']} is not among its layers {[int(x) for x in layers]}")


def tie_break(acc: np.ndarray, auroc: np.ndarray, margin: np.ndarray | None, best: int) -> str:
    """How ``best`` (a row) won: ``""`` when its held-out accuracy is the highest alone, else
    ``"auroc"`` or ``"margin"`` (what broke the tie) or ``"index"`` (everything tied)."""
    acc, auroc = np.asarray(acc), np.asarray(auroc)
    tied = np.flatnonzero(acc == acc[best])
    if len(tied) == 1:
        return ""
    tied = tied[auroc[tied] == auroc[best]]
    if len(tied) == 1:
        return "auroc"
    if margin is not None and (np.asarray(margin)[tied] == np.asarray(margin)[best]).sum() == 1:
        return "margin"
    return "index"

"""The probe file: a fitted concept direction per layer and everything needed to refuse misuse.

HDF5, readable with plain h5py. Root attributes: ``format`` = ``self-correction-workbench-probe``,
``schema_version``, ``model_name``, ``model_path``, ``model_revision``, ``d_model``, ``n_layers``,
``hook``, ``position`` (``last``/``mean``), ``method``, ``contrast`` (JSON: name, n, n_positive,
n_pairs, digest), ``test_fraction``, ``seed``, ``best_layer``, ``created``. Datasets (``L`` fitted layers):
``layers [L]``, ``directions [L, d_model]`` (unit norm, positives project higher), ``thresholds [L]``,
``train_accuracy [L]``, ``test_accuracy [L]``, ``test_auroc [L]``, and for contrasts with a
continuous ground truth ``test_target_spearman [L]``.
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


def save_probe(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write a probe file (overwrites). ``meta`` becomes root attributes (dicts/lists as JSON)."""
    missing = [a for a in ARRAYS if a not in arrays]
    if missing:
        raise ValueError(f"probe arrays missing: {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for key, value in meta.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
        for name, value in arrays.items():
            f.create_dataset(name, data=np.asarray(value))
    return path


def load_probe(path: Path) -> Probe:
    """Read a probe file, refusing anything that is not one."""
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"probe file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise WorkbenchError(f"{path} is not a readable HDF5 file") from None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise WorkbenchError(f"{path} is not a probe file (no format={FORMAT!r} attribute)")
        meta = {}
        for key, value in f.attrs.items():
            value = value.item() if isinstance(value, np.generic) else value
            if isinstance(value, str) and value.startswith(("[", "{")):
                value = json.loads(value)
            meta[key] = value
        arrays = {name: f[name][...] for name in f.keys()}
    return Probe(path, meta, arrays)

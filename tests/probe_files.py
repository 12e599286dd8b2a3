"""A small, valid probe file for the tests that read one (no model needed)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def write_probe(path: Path, n_layers: int = 3, d_model: int = 4, **changes) -> Path:
    """Write a probe file of ``n_layers`` unit directions; ``changes`` replace attributes or arrays
    by name, and a ``None`` change leaves that attribute or array out. Layers 0 and 1 tie on
    held-out accuracy and AUROC; layer 1 has the larger margin, so it is the best layer."""
    from probes.probe_file import save_probe

    meta = {"model_name": "organism", "model_path": "x", "model_revision": "", "d_model": d_model, "n_layers": n_layers,
            "hook": "hook_resid_post", "position": "last", "method": "diffmean",
            "contrast": {"name": "c", "n": 8, "n_positive": 4, "n_pairs": 0, "digest": "d"},
            "test_fraction": 0.25, "seed": 0, "best_layer": 1}
    accuracy = np.r_[1.0, 1.0, np.full(n_layers - 2, 0.5)]
    arrays = {"layers": np.arange(n_layers), "directions": np.eye(n_layers, d_model, dtype=np.float32),
              "thresholds": np.zeros(n_layers), "train_accuracy": np.ones(n_layers), "test_accuracy": accuracy,
              "test_auroc": accuracy.copy(), "test_margin": np.r_[0.5, 2.0, np.full(n_layers - 2, 0.1)]}
    meta.update({k: v for k, v in changes.items() if k in meta and v is not None})
    arrays.update({k: v for k, v in changes.items() if k in arrays and v is not None})
    save_probe(path, meta, arrays)
    with h5py.File(path, "a") as f:
        for k in [k for k, v in changes.items() if v is None]:
            if k in f:
                del f[k]
            else:
                del f.attrs[k]
    return path

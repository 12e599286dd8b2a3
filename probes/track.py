"""Tracking a probe through a run: concept scores for every sample, round and layer, into the run file.

Scores go to ``probes/{name}/cosine`` and ``probes/{name}/projection`` ``[N, R, L]`` (NaN for
samples not yet done), with the probe's method, hook, positions, layers and best layer as
attributes. The probe's ``last`` position reads the run's ``last_prompt`` state, ``mean`` its
``response_mean``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from probes.evaluate import cosine_scores, projection_scores
from probes.probe_file import Probe
from workbench.errors import WorkbenchError
from workbench.store.format import POSITIONS
from workbench.store.groups import replace_group
from workbench.store.reader import RunFile

RUN_POSITION = {"last": "last_prompt", "mean": "response_mean"}
CHUNK = 256  # samples read at once: memory stays flat however large the run


def check_compatible(run: RunFile, probe: Probe) -> tuple[int, list[int]]:
    """Refuse a probe from another model, width or hook; returns (position index, run layer rows)."""
    meta = run.meta
    same_model = probe.meta["model_name"] == meta.get("model_name") == "organism" or probe.meta["model_path"] == meta.get("model_path")
    if not same_model:
        raise WorkbenchError(f"{probe.path.name} was fitted on {probe.meta['model_name']}, but {run.path.name} ran {meta.get('model_name')}")
    if int(probe.meta["d_model"]) != int(meta.get("d_model", -1)):
        raise WorkbenchError(f"{probe.path.name} has width {probe.meta['d_model']}, {run.path.name} has d_model {meta.get('d_model')}")
    hook = probe.meta["hook"]
    if f"activations/{hook}" not in run.f:
        raise WorkbenchError(f"{run.path.name} did not capture {hook} (captured: {', '.join(run.names('activations'))})")
    run_layers = json.loads(run.f[f"activations/{hook}"].attrs["layers"])
    missing = [int(l) for l in probe.arrays["layers"] if int(l) not in run_layers]
    if missing:
        raise WorkbenchError(f"{run.path.name} did not capture layer {missing[0]} that {probe.path.name} needs")
    position = POSITIONS.index(RUN_POSITION[probe.meta["position"]])
    return position, [run_layers.index(int(l)) for l in probe.arrays["layers"]]


def track(run_path: Path, probe: Probe, name: str | None = None) -> dict[str, np.ndarray]:
    """Score every done (sample, round, layer) of ``run_path`` with ``probe``; write and return
    ``{"cosine": [N, R, L], "projection": [N, R, L]}``."""
    name = name or probe.name
    with RunFile(run_path) as run:
        position, rows = check_compatible(run, probe)
        ds = run.f[f"activations/{probe.meta['hook']}"]
        n, rounds = ds.shape[:2]
        done = run.done
        cosine = np.full((n, rounds, len(rows)), np.nan, dtype=np.float32)
        projection = np.full_like(cosine, np.nan)
        directions = probe.arrays["directions"]
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            if not done[start:stop].any():
                continue
            acts = ds[start:stop, :, position][:, :, rows]  # [chunk, R, L, d]
            cosine[start:stop] = cosine_scores(acts, directions).numpy()
            projection[start:stop] = projection_scores(acts, directions).numpy()
        cosine[~done] = np.nan
        projection[~done] = np.nan
    lost = done[:, None] & np.isnan(projection).any(axis=2)  # [N, R]: done rounds whose activations are not finite
    if lost.any():
        first = np.argwhere(lost)[0]
        warnings.warn(f"{run_path}: {int(lost.sum())} of {int(done.sum()) * rounds} (sample, round) activations are not finite "
                      f"(first: row {first[0]}, round {first[1] + 1}): their concept scores are NaN and every summary leaves them out")
    attrs = {
        "kind": "probe", "method": probe.meta["method"], "hook": probe.meta["hook"], "position": probe.meta["position"],
        "run_position": RUN_POSITION[probe.meta["position"]], "layers": [int(l) for l in probe.arrays["layers"]],
        "best_layer": probe.best_layer, "probe_file": str(probe.path), "contrast": probe.meta["contrast"],
        "test_accuracy": [float(a) for a in probe.arrays["test_accuracy"]],
    }
    replace_group(run_path, f"probes/{name}", {"cosine": cosine, "projection": projection}, attrs)
    return {"cosine": cosine, "projection": projection}

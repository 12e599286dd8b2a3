"""Replay the writer calls of a finished run: ``RunWriter.create`` (or ``resume``), one
``write_batch`` per batch with that run's own arrays, ``finish`` — the same calls ``workbench run``
makes, without loading a model, so a fault injector can kill it at any write in well under a second.
Prints ``wrote START STOP`` once each ``write_batch`` has returned (those batches must survive a kill).

    python tests/fault/replay.py REFERENCE.h5 OUT.h5 [--resume] [--pause-after N] [--no-fsync]
    python tests/fault/replay.py --track OUT.h5      # replace_group, as `workbench probe track` does

A WorkbenchError prints one line and exits 2, as the CLI does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from workbench.store import failed_writes  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.store.format import run_exists
from workbench.store.groups import replace_group
from workbench.store.header import SampleTable
from workbench.store.writer import RunWriter  # noqa: E402

NOT_SETTINGS = {"format", "schema_version", "workbench_version", "created", "finished", "status", "run_id",
                "n_options", "positions"}


def _arrays(group: h5py.Group) -> dict[str, h5py.Dataset]:
    """A group's datasets, without the dimension scales that label their axes."""
    return {name: ds for name, ds in group.items() if not h5py.h5ds.is_scale(ds.id)}


def _texts(ds: h5py.Dataset) -> list:
    return ds.asstr()[...].tolist()


def _settings(ref: h5py.File) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in ref.attrs.items() if k not in NOT_SETTINGS}


def create_like(ref: h5py.File, out: Path, overwrite: bool = False, durable: bool = True) -> RunWriter:
    """``RunWriter.create`` for a run with the reference run's settings, samples and hooks."""
    s = ref["samples"]
    samples = SampleTable(index=s["index"][...].tolist(), id=_texts(s["id"]), context=_texts(s["context"]),
                          question=_texts(s["question"]), options=[tuple(o) for o in _texts(s["options"])],
                          gold=s["gold"][...].tolist(), category=_texts(s["category"]),
                          condition=_texts(s["condition"]), extra=_texts(s["extra"]))
    hooks = {h: ds.shape[3:] for h, ds in _arrays(ref["activations"]).items()}
    dtype = str(next(iter(_arrays(ref["activations"]).values())).dtype)
    return RunWriter.create(out, _settings(ref), samples, int(ref.attrs["n_rounds"]), hooks, dtype, overwrite=overwrite,
                            durable=durable)


def replay(reference: Path, out: Path, resume: bool, pause_after: int | None, overwrite: bool = False,
           durable: bool = True) -> None:
    with h5py.File(reference, "r") as ref:
        n, batch_size = int(ref.attrs["n_samples"]), int(ref.attrs["batch_size"])
        if resume and run_exists(out):  # as workbench run does: --resume on nothing starts the run
            writer = RunWriter.resume(out, _settings(ref), durable=durable)
        else:
            writer = create_like(ref, out, overwrite, durable)
        with writer:
            done = writer.done_mask()
            written = 0
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                if done[start:stop].all():
                    continue
                arrays = {}
                for name, ds in _arrays(ref["rounds"]).items():
                    arrays[name] = _texts(ds)[start:stop] if h5py.check_string_dtype(ds.dtype) else ds[start:stop]
                for name, ds in _arrays(ref["tokens"]).items():
                    arrays[name] = [[v.tolist() for v in row] for row in ds[start:stop]]
                acts = {h: ds[start:stop] for h, ds in _arrays(ref["activations"]).items()}
                transcripts = [v.tolist() for v in ref["transcripts/token_ids"][start:stop]]
                writer.write_batch(start, arrays, acts, transcripts)
                print(f"wrote {start} {stop}", flush=True)  # a pipe, not a file: the kill shim does not count it
                written += 1
                if pause_after is not None and written == pause_after:
                    print("paused", flush=True)
                    time.sleep(3600)
            writer.finish()


def track(out: Path) -> None:
    """A derived group as `probe track` writes it: scores [N, R, 2] and attributes."""
    with h5py.File(out, "r") as f:
        n, rounds = int(f.attrs["n_samples"]), int(f.attrs["n_rounds"])
    scores = np.arange(n * rounds * 2, dtype=np.float32).reshape(n, rounds, 2)
    replace_group(out, "probes/fault", {"cosine": scores, "projection": -scores}, {"kind": "probe", "layers": [0, 1], "best_layer": 1})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("paths", nargs="+")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--track", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--pause-after", type=int)
    p.add_argument("--no-fsync", action="store_true", help="write as workbench run --no-fsync does")
    a = p.parse_args()
    try:
        if a.track:
            track(Path(a.paths[0]))
        else:
            replay(Path(a.paths[0]), Path(a.paths[1]), a.resume, a.pause_after, a.overwrite, durable=not a.no_fsync)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if failed_writes.FAILED_WRITES:  # as the workbench executable does (cli.entry): no teardown after a failed write
            os._exit(2)
        sys.exit(2)
    print(json.dumps({"ok": True}))


if __name__ == "__main__":
    main()

"""Merge benchmarks (DESIGN §8), side by side in one process on the same bytes:

1. the cost of merging: ``workbench merge`` (virtual datasets) and ``merge --copy``, each as a share
   of the time it took to write the shards (through ``RunWriter``, as ``workbench run`` writes them);
2. reading a merged file: every activation row, and one (sample, round) at random, from the virtual
   merged file and from its ``--copy``, against the same reads from a single-process run file of
   the same rows (the order of the three rotates between repeats);
3. the merged files' sizes.

The shards are synthetic run files written by ``benchmarks/bench_store.py``'s writer (every
per-round array, tokens, transcripts), each then given its ``shard`` plan. Each measure is the
median of ``--repeats`` runs.

    python benchmarks/bench_merge.py           # 4 shards, 2000 samples × 5 rounds × 2 × 8 layers × 512
    python benchmarks/bench_merge.py --quick

Prints a table and writes ``benchmarks/results/merge.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_store import write_run  # noqa: E402

from workbench.store.merge import merge_run  # noqa: E402
from workbench.store.shard import plan_rows, shard_path  # noqa: E402
from workbench.store.reader import RunFile  # noqa: E402


# the sizes bench_store.py measures the writer at, split into shards
SIZES = {"samples": 2000, "shards": 4, "rounds": 5, "layers": 8, "d-model": 512, "batch-size": 16, "reads": 200, "repeats": 3}


def write_shards(run: Path, acts: np.ndarray, batch_size: int, count: int) -> float:
    """The ``count`` shards of ``acts`` as run files with their plan; returns the seconds writing them took."""
    rows = plan_rows(len(acts), batch_size, count)
    seconds = 0.0
    for k, (start, stop) in enumerate(rows):
        path = shard_path(run, k, count)
        written, assembled = write_run(path, acts[start:stop], batch_size)
        seconds += written + assembled
        plan = {"index": k, "count": count, "batch_size": batch_size, "n_samples": len(acts), "fingerprint": "bench",
                "rows": [list(r) for r in rows]}
        with h5py.File(path, "a") as f:
            f.attrs["shard"] = json.dumps(plan)
            f["samples/index"][...] = np.arange(start, stop)
    return seconds


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_all(path: Path) -> None:
    with RunFile(path) as run:
        run.array("activations/hook_resid_post")


def read_random(path: Path, picks: np.ndarray, rounds: np.ndarray) -> None:
    with RunFile(path) as run:
        for i, r in zip(picks, rounds):
            run.sample_round(int(i), int(r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in SIZES.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merge.json"))
    a = p.parse_args()
    if a.quick:
        a.samples, a.layers, a.d_model, a.repeats, a.reads = 256, 4, 128, 2, 50
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((a.samples, a.rounds, 2, a.layers, a.d_model), dtype=np.float32)
    picks, rounds = rng.integers(0, a.samples, a.reads), rng.integers(0, a.rounds, a.reads)
    runs: dict[str, list[float]] = {k: [] for k in ("write shards", "merge", "merge --copy", "read all: single", "read all: virtual",
                                                   "read all: copy", "random: single", "random: virtual", "random: copy")}
    sizes: dict[str, int] = {}
    for repeat in range(a.repeats):
        with tempfile.TemporaryDirectory(dir=ROOT / "artifacts") as tmp:
            single, virtual = Path(tmp) / "single.h5", Path(tmp) / "virtual" / "m.h5"
            write_run(single, acts, a.batch_size)
            runs["write shards"].append(write_shards(virtual, acts, a.batch_size, a.shards))
            runs["merge"].append(timed(lambda: merge_run(virtual)))
            copied = Path(tmp) / "copy" / "m.h5"
            copied.parent.mkdir()
            os.rename(virtual.with_name("m.h5.shards"), copied.with_name("m.h5.shards"))
            runs["merge --copy"].append(timed(lambda: merge_run(copied, copy=True)))
            os.rename(copied.with_name("m.h5.shards"), virtual.with_name("m.h5.shards"))
            files = [("single", single), ("virtual", virtual), ("copy", copied)]
            for name, path in files[repeat % 3:] + files[: repeat % 3]:  # each file read first in turn
                runs[f"read all: {name}"].append(timed(lambda: read_all(path)))
                runs[f"random: {name}"].append(timed(lambda: read_random(path, picks, rounds)))
                sizes[name] = path.stat().st_size
    med = {k: statistics.median(v) for k, v in runs.items()}
    res = {
        "config": vars(a), "seconds": med, "bytes": sizes, "activation_bytes": acts.nbytes,
        "merge_share": med["merge"] / med["write shards"], "copy_share": med["merge --copy"] / med["write shards"],
        "read_all_virtual_ratio": med["read all: virtual"] / med["read all: single"],
        "read_all_copy_ratio": med["read all: copy"] / med["read all: single"],
        "random_virtual_ratio": med["random: virtual"] / med["random: single"],
        "random_copy_ratio": med["random: copy"] / med["random: single"],
    }
    print(f"{a.shards} shards, {a.samples} samples × {a.rounds} rounds × 2 × {a.layers} layers × {a.d_model} "
          f"({acts.nbytes / 2**20:.0f} MiB of activations), median of {a.repeats}")
    print(f"{'measure':44} {'value':>10}")
    rows = [("writing the shards (RunWriter)", f"{med['write shards']:.2f} s"),
            ("merge (virtual datasets)", f"{med['merge']:.2f} s"),
            ("  ÷ writing the shards", f"{res['merge_share']:.3f}"),
            ("merge --copy", f"{med['merge --copy']:.2f} s"),
            ("  ÷ writing the shards", f"{res['copy_share']:.3f}"),
            ("read every activation: virtual ÷ single file", f"{res['read_all_virtual_ratio']:.2f}"),
            ("read every activation: copy ÷ single file", f"{res['read_all_copy_ratio']:.2f}"),
            (f"{a.reads} random (sample, round): virtual ÷ single", f"{res['random_virtual_ratio']:.2f}"),
            (f"{a.reads} random (sample, round): copy ÷ single", f"{res['random_copy_ratio']:.2f}"),
            ("size: virtual merged file", f"{sizes['virtual'] / 2**20:.1f} MiB"),
            ("size: --copy merged file", f"{sizes['copy'] / 2**20:.1f} MiB"),
            ("size: single-process run file", f"{sizes['single'] / 2**20:.1f} MiB")]
    for name, value in rows:
        print(f"{name:44} {value:>10}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

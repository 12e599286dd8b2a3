"""Run-file benchmarks (DESIGN §8), side by side in one process on the same bytes:

1. write throughput: activations written batch by batch through ``RunWriter`` (chunked, early
   allocation, flush per batch) ÷ one ``numpy.save`` of the same array;
2. random access: reading one (sample, round) from the run file, against loading the ``.npy``
   file and indexing it (what a viewer would otherwise do).

    python benchmarks/bench_store.py                 # 2000 samples × 5 rounds × 2 × 8 layers × 512
    python benchmarks/bench_store.py --quick

Prints a table and writes ``benchmarks/results/store.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.store import RunFile, RunWriter, SampleTable  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reads", type=int, default=200)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store.json"))
    a = p.parse_args()
    if a.quick:
        a.samples, a.d_model = 200, 128
    n, r = a.samples, a.rounds
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((n, r, 2, a.layers, a.d_model), dtype=np.float32)
    samples = SampleTable(index=list(range(n)), id=[str(i) for i in range(n)], context=[""] * n, question=[""] * n,
                          options=[("a", "b", "c")] * n, gold=[0] * n, category=[""] * n, condition=[""] * n, extra=["{}"] * n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        np.save(tmp / "acts.npy", acts)
        npy_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        writer = RunWriter.create(tmp / "run.h5", {"layers": list(range(a.layers))}, samples, r,
                                  {"hook_resid_post": (a.layers, a.d_model)})
        with writer:
            for start in range(0, n, a.batch_size):
                stop = min(n, start + a.batch_size)
                writer.write_batch(start, {}, {"hook_resid_post": acts[start:stop]}, [[1, 2, 3]] * (stop - start))
            writer.finish()
        h5_s = time.perf_counter() - t0

        picks = rng.integers(0, n, a.reads), rng.integers(0, r, a.reads)
        with RunFile(tmp / "run.h5") as run:
            ds = run.f["activations/hook_resid_post"]
            t0 = time.perf_counter()
            for i, t in zip(*picks):
                got = ds[i, t]
            h5_read = (time.perf_counter() - t0) / a.reads
            assert np.array_equal(got, acts[picks[0][-1], picks[1][-1]])
        t0 = time.perf_counter()
        for i, t in zip(*picks[:1], picks[1][:1]):
            np.load(tmp / "acts.npy")[i, t]
        npy_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        mm = np.load(tmp / "acts.npy", mmap_mode="r")
        for i, t in zip(*picks):
            np.asarray(mm[i, t])
        mmap_read = (time.perf_counter() - t0) / a.reads
    gib = acts.nbytes / 2**30
    res = {"shape": list(acts.shape), "gib": gib, "npy_save_s": npy_s, "h5_streamed_write_s": h5_s,
           "write_ratio_h5_over_npy": h5_s / npy_s, "h5_write_gib_per_s": gib / h5_s, "npy_write_gib_per_s": gib / npy_s,
           "h5_read_one_ms": h5_read * 1e3, "npy_load_then_index_ms": npy_read * 1e3, "npy_mmap_read_one_ms": mmap_read * 1e3}
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run file: activations {tuple(acts.shape)} float32, {gib:.2f} GiB, batches of {a.batch_size}")
    for c in ("measure", "value"):
        table.add_column(c)
    table.add_row("numpy.save, one call (s)", f"{npy_s:.2f}  ({gib / npy_s:.2f} GiB/s)")
    table.add_row("run file, streamed per batch + flush (s)", f"{h5_s:.2f}  ({gib / h5_s:.2f} GiB/s)")
    table.add_row("write time ratio run file ÷ numpy.save", f"{h5_s / npy_s:.2f}")
    table.add_row("read one (sample, round) from the run file", f"{h5_read * 1e3:.3f} ms")
    table.add_row("np.load whole .npy then index", f"{npy_read * 1e3:.1f} ms")
    table.add_row("np.load(mmap) one (sample, round)", f"{mmap_read * 1e3:.3f} ms")
    Console().print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

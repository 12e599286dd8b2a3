"""Run-file benchmarks (DESIGN §8), side by side in one process on the same bytes:

1. write throughput: a run written batch by batch through ``RunWriter`` (each batch's activations
   pwritten into the preallocated activations file, its other arrays as a part file renamed into
   place, so every batch is finished when ``write_batch`` returns; at most once a second an
   fsynced commit), against one ``numpy.save`` of the same activations (and against
   ``numpy.save`` followed by one fsync);
2. the final assembly (``RunWriter.finish``: the last batches' rows built into the run file to
   be, which is marked complete, fsynced and renamed) as a share of the run's write time (the
   creation and every ``write_batch``, the rows built in as the batches finish included); and the
   whole durable run (write + assembly) against ``numpy.save`` + fsync;
3. random access: reading one (sample, round) from the run file, against loading the ``.npy``
   file and indexing it (what a viewer would otherwise do).

Each measure is the median of ``--repeats`` runs, interleaved, each started after an (untimed)
``os.sync`` and a touch of fresh memory (:func:`fair_io.settle`), so that none waits for the dirty
pages the one before left and all get pages the guest holds (this VM hands freed pages back to
its host: see ``benchmarks/fair_io.py``).

    python benchmarks/bench_store.py                 # 2000 samples × 5 rounds × 2 × 8 layers × 512
    python benchmarks/bench_store.py --quick

Prints a table and writes ``benchmarks/results/store.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fair_io import free_page_reporting, settle  # noqa: E402
from workbench.store.header import SampleTable
from workbench.store.reader import RunFile
from workbench.store.writer import RunWriter  # noqa: E402


def write_run(path: Path, acts: np.ndarray, batch_size: int, durable: bool = True) -> tuple[float, float]:
    """Write a run like ``workbench run`` does (every per-round array, tokens, transcripts;
    ``durable`` False as with ``--no-fsync``); returns (seconds creating and writing every batch,
    seconds assembling)."""
    n, r = acts.shape[:2]
    rng = np.random.default_rng(1)
    samples = SampleTable(index=list(range(n)), id=[str(i) for i in range(n)], context=["a context sentence"] * n,
                          question=["who did it ?"] * n, options=[("a", "b", "c")] * n, gold=[0] * n,
                          category=[""] * n, condition=["ambig"] * n, extra=["{}"] * n)
    batches = []  # the writer's input, made before the clock starts (the benchmark times the writer, not the RNG)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        b = stop - start
        ids = [[rng.integers(0, 1000, 12).tolist() for _ in range(r)] for _ in range(b)]
        arrays = {
            "instruction": [["review your previous answer"] * r] * b, "response": [["(a) the one"] * r] * b,
            "response_token_ids": ids, "token_entropy": [[np.ones(13, np.float32)] * r] * b,
            "prompt_span": np.zeros((b, r, 2), np.int64), "response_span": np.zeros((b, r, 2), np.int64),
            "mean_token_entropy": np.ones((b, r), np.float32), "option_probs": np.full((b, r, 3), 1 / 3, np.float32),
            "option_entropy": np.ones((b, r), np.float32), "parsed_answer": np.zeros((b, r), np.int16),
            "option_answer": np.zeros((b, r), np.int16), "answer": np.zeros((b, r), np.int16),
            "chosen_confidence": np.ones((b, r), np.float32), "correct": np.ones((b, r), np.uint8),
        }
        batches.append((start, arrays, [list(range(40 * r))] * b))
    t0 = time.perf_counter()
    writer = RunWriter.create(path, {"layers": list(range(acts.shape[3])), "batch_size": batch_size}, samples, r,
                              {"hook_resid_post": acts.shape[3:]}, durable=durable)
    with writer:
        for start, arrays, transcripts in batches:
            writer.write_batch(start, arrays, {"hook_resid_post": acts[start : start + len(transcripts)]}, transcripts)
        written = time.perf_counter() - t0
        t1 = time.perf_counter()
        writer.finish()
        assembled = time.perf_counter() - t1
    return written, assembled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reads", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store.json"))
    a = p.parse_args()
    if a.quick:
        a.samples, a.d_model, a.repeats = 200, 128, 1
    n, r = a.samples, a.rounds
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((n, r, 2, a.layers, a.d_model), dtype=np.float32)
    runs: dict[str, list[float]] = {k: [] for k in ("npy", "npy_sync", "write", "assembly", "write_nofsync", "assembly_nofsync")}
    with tempfile.TemporaryDirectory(dir=ROOT / "artifacts") as tmp:
        tmp = Path(tmp)
        for i in range(a.repeats):
            for old in [*tmp.glob("*.npy"), *tmp.glob("*.h5")]:  # their page cache goes back to the host: see fair_io
                if old.name not in ("acts0.npy", "run0.h5"):
                    old.unlink()
            settle(acts.nbytes)
            t0 = time.perf_counter()
            np.save(tmp / f"acts{i}.npy", acts)
            runs["npy"].append(time.perf_counter() - t0)
            settle(acts.nbytes)
            t0 = time.perf_counter()
            with open(tmp / f"sync{i}.npy", "wb") as fh:
                np.save(fh, acts)
                fh.flush()
                os.fsync(fh.fileno())
            runs["npy_sync"].append(time.perf_counter() - t0)
            for suffix, durable in (("", True), ("_nofsync", False)):
                settle(acts.nbytes)
                w, s = write_run(tmp / f"run{i}{suffix}.h5", acts, a.batch_size, durable)
                runs["write" + suffix].append(w)
                runs["assembly" + suffix].append(s)
        med = {k: float(np.median(v)) for k, v in runs.items()}
        npy_s, npy_sync_s, h5_s, asm_s = med["npy"], med["npy_sync"], med["write"], med["assembly"]

        picks = rng.integers(0, n, a.reads), rng.integers(0, r, a.reads)
        with RunFile(tmp / "run0.h5") as run:
            ds = run.f["activations/hook_resid_post"]
            assert np.array_equal(ds[...], acts)
            t0 = time.perf_counter()
            for i, t in zip(*picks):
                got = ds[i, t]
            h5_read = (time.perf_counter() - t0) / a.reads
            assert np.array_equal(got, acts[picks[0][-1], picks[1][-1]])
        t0 = time.perf_counter()
        np.load(tmp / "acts0.npy")[picks[0][0], picks[1][0]]
        npy_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        mm = np.load(tmp / "acts0.npy", mmap_mode="r")
        for i, t in zip(*picks):
            np.asarray(mm[i, t])
        mmap_read = (time.perf_counter() - t0) / a.reads
    gib = acts.nbytes / 2**30
    res = {"shape": list(acts.shape), "gib": gib, "batch_size": a.batch_size, "repeats": a.repeats,
           "npy_save_s": npy_s, "npy_save_fsync_s": npy_sync_s, "run_write_s": h5_s, "assembly_s": asm_s,
           "run_write_nofsync_s": med["write_nofsync"], "assembly_nofsync_s": med["assembly_nofsync"],
           "write_throughput_ratio_run_over_npy": npy_s / h5_s,
           "write_throughput_ratio_run_over_npy_fsync": npy_sync_s / h5_s,
           "write_throughput_ratio_nofsync_run_over_npy": npy_s / med["write_nofsync"],
           "assembly_share_of_write": asm_s / h5_s,
           "assembly_share_of_write_nofsync": med["assembly_nofsync"] / med["write_nofsync"],
           "durable_ratio_npy_fsync_over_write_plus_assembly": npy_sync_s / float(np.median(np.add(runs["write"], runs["assembly"]))),
           "per_repeat": runs, "load_average": os.getloadavg()[0], "free_page_reporting": free_page_reporting(),
           "h5_read_one_ms": h5_read * 1e3, "npy_load_then_index_ms": npy_read * 1e3, "npy_mmap_read_one_ms": mmap_read * 1e3}
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run file: activations {tuple(acts.shape)} float32, {gib:.2f} GiB, batches of {a.batch_size}, "
                        f"median of {a.repeats}")
    for c in ("measure", "value"):
        table.add_column(c)
    nf_s, nf_asm = med["write_nofsync"], med["assembly_nofsync"]
    table.add_row("numpy.save, one call (s)", f"{npy_s:.2f}  ({gib / npy_s:.2f} GiB/s)")
    table.add_row("numpy.save + fsync (s)", f"{npy_sync_s:.2f}  ({gib / npy_sync_s:.2f} GiB/s)")
    table.add_row("run, streamed: every batch finished at once, fsync ≤ 1/s (s)", f"{h5_s:.2f}  ({gib / h5_s:.2f} GiB/s)")
    table.add_row("run --no-fsync, streamed (s)", f"{nf_s:.2f}  ({gib / nf_s:.2f} GiB/s)")
    table.add_row("write throughput ratio run --no-fsync ÷ numpy.save", f"{npy_s / nf_s:.2f}")
    table.add_row("write throughput ratio run ÷ (numpy.save + fsync)", f"{npy_sync_s / h5_s:.2f}")
    table.add_row("write throughput ratio run ÷ numpy.save", f"{npy_s / h5_s:.2f}")
    table.add_row("final assembly, run / --no-fsync (s)", f"{asm_s:.3f} / {nf_asm:.3f}")
    table.add_row("assembly ÷ the run's write time, run / --no-fsync", f"{asm_s / h5_s:.3f} / {nf_asm / nf_s:.3f}")
    table.add_row("(numpy.save + fsync) ÷ (run write + assembly), both durable", f"{res['durable_ratio_npy_fsync_over_write_plus_assembly']:.2f}")
    table.add_row("per repeat: write / assembly / --no-fsync write / numpy.save (s)",
                  "  ".join(f"{w:.2f}/{x:.2f}/{y:.2f}/{v:.2f}" for w, x, y, v in
                            zip(runs["write"], runs["assembly"], runs["write_nofsync"], runs["npy"])))
    table.add_row("read one (sample, round) from the run file", f"{h5_read * 1e3:.3f} ms")
    table.add_row("np.load whole .npy then index", f"{npy_read * 1e3:.1f} ms")
    table.add_row("np.load(mmap) one (sample, round)", f"{mmap_read * 1e3:.3f} ms")
    Console().print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

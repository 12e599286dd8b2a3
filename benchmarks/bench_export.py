"""Export benchmarks (DESIGN §8), side by side in one process on the same tokens and bytes:

1. write throughput: the export's whole writing path (the cache file created up front with its
   token labels and every dataset allocated, each batch's rows written into place and committed
   as the export commits them, the finish: fsync and rename) ÷ one ``numpy.save`` of the same
   array (and ÷ ``numpy.save`` + fsync); at 62 MiB, 625 MiB and 3 GiB in one invocation, each size
   ``--write-repeats`` times interleaved on fresh files, medians;
2. whole export time (``export_run``: checking the hooks, token labels, creating the file, the
   forward passes, writing, the finish; the model already loaded) ÷ one plain Hugging Face forward
   over the same batches with ``output_hidden_states=True`` and no writing, paired batch by batch;
   the median of the repeats;
3. peak memory (VmHWM) of a fresh process exporting 200 and 2000 samples (it must stay flat).

The run is a real organism run (``--base-samples`` samples) whose rows are tiled to the sizes
needed, so the transcripts are real and the sizes cheap to reach.

    python benchmarks/bench_export.py            # organism, 6 rounds, every layer's hook_resid_post
    python benchmarks/bench_export.py --quick

Prints a table and writes ``benchmarks/results/export.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.cache_file import HookLayout, TokenTable, create_cache_file, fsync_path  # noqa: E402
from workbench.cache_writer import PartialCache  # noqa: E402

HOOKS = ["blocks.*.hook_resid_post"]


def tile_run(src: Path, dst: Path, n: int) -> Path:
    """A run file with ``n`` samples: the rows of ``src`` repeated (same layout, every row done)."""
    with h5py.File(src, "r") as s, h5py.File(dst, "w") as d:
        n_src = int(s.attrs["n_samples"])
        rows = np.arange(n) % n_src
        for k, v in s.attrs.items():
            d.attrs[k] = v
        d.attrs["n_samples"] = n

        def copy(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Group):
                d.require_group(name)
            elif obj.shape and obj.shape[0] == n_src:
                data = obj[...][rows]
                if name == "samples/index":
                    data = np.arange(n)
                d.create_dataset(name, data=data, dtype=obj.dtype)
            else:
                d.create_dataset(name, data=obj[...], dtype=obj.dtype)

        s.visititems(copy)
    return dst


def _synthetic(n_hooks: int, n_tokens: int, d: int) -> np.ndarray:
    """float32 activations ``[hooks, tokens, d]``: a random block tiled (the bytes' values do not
    matter to an uncompressed write, and drawing gigabytes of normals would dominate the benchmark)."""
    block = np.random.default_rng(0).standard_normal((1, min(n_tokens, 4096), d), dtype=np.float32)
    acts = np.empty((n_hooks, n_tokens, d), dtype=np.float32)
    for lo in range(0, n_tokens, block.shape[1]):
        hi = min(n_tokens, lo + block.shape[1])
        acts[:, lo:hi] = block[:, : hi - lo]
    return acts


def export_write(tmp: Path, acts: np.ndarray, batch_tokens: int) -> dict:
    """The export's whole writing path on ``acts`` ``[hooks, tokens, d]``: the cache file created in
    ``OUT.parts`` (token labels, allocation), each batch's rows written into place and committed as
    the export does (fsync + done marker at most every COMMIT_INTERVAL_S), the finish (status,
    fsync, rename). Returns seconds: total and the creation alone."""
    n_hooks, n_tokens, d = acts.shape
    names = [f"blocks.{i}.hook_resid_post" for i in range(n_hooks)]
    sizes = [min(batch_tokens, n_tokens - s) for s in range(0, n_tokens, batch_tokens)]
    tokens = TokenTable(offsets=np.concatenate([[0], np.cumsum(sizes)]), sample=np.repeat(np.arange(len(sizes)), sizes).astype(np.int32),
                        round=np.zeros(n_tokens, np.int16), role=np.zeros(n_tokens, np.uint8), position=np.zeros(n_tokens, np.int32),
                        token_id=np.zeros(n_tokens, np.int32), token_str=[""] * n_tokens)
    layouts = [HookLayout(n, (d,), "float32") for n in names]
    parts = tmp / "c.h5.parts"
    t0 = time.perf_counter()
    parts.mkdir()
    with PartialCache.open(parts, sizes, lambda path: create_cache_file(path, {}, tokens, layouts, np.arange(len(sizes)),
                                                                          status="running")) as cache:
        created = time.perf_counter() - t0
        start = 0
        for k, size in enumerate(sizes):
            cache.write(k, {name: acts[i, start : start + size] for i, name in enumerate(names)})
            start += size
        cache.finish(tmp / "c.h5")
    return {"total": time.perf_counter() - t0, "create": created}


def bench_writes(tmp: Path, n_tokens: int, d: int, n_hooks: int, batch_tokens: int, repeats: int) -> dict:
    """``numpy.save`` (with and without an fsync) and the export's writing of the same bytes,
    interleaved ``repeats`` times on fresh files, each after an (untimed) ``os.sync`` so none is
    slowed by the dirty pages of the one before; medians."""
    acts = _synthetic(n_hooks, n_tokens, d)
    runs: dict[str, list[float]] = {"numpy_save_s": [], "numpy_save_fsync_s": [], "export_write_s": [], "export_create_s": []}
    for _ in range(repeats):
        for f in tmp.glob("acts*.npy"):
            f.unlink()
        (tmp / "c.h5").unlink(missing_ok=True)
        os.sync()  # each write below starts with no dirty pages left by the one before (untimed)
        t0 = time.perf_counter()
        np.save(tmp / "acts.npy", acts)
        runs["numpy_save_s"].append(time.perf_counter() - t0)
        os.sync()
        w = export_write(tmp, acts, batch_tokens)
        runs["export_write_s"].append(w["total"])
        runs["export_create_s"].append(w["create"])
        os.sync()
        t0 = time.perf_counter()
        np.save(tmp / "acts2.npy", acts)
        fsync_path(tmp / "acts2.npy")
        runs["numpy_save_fsync_s"].append(time.perf_counter() - t0)
    for f in [*tmp.glob("acts*.npy"), tmp / "c.h5"]:
        f.unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = [n / e for n, e in zip(runs["numpy_save_s"], runs["export_write_s"])]
    return {"bytes": acts.nbytes, "tokens": n_tokens, "repeats": repeats, "runs": runs, **med,
            "ratio_vs_numpy_save": med["numpy_save_s"] / med["export_write_s"],
            "ratio_vs_numpy_save_range": [min(ratios), max(ratios)],
            "ratio_vs_numpy_save_fsync": med["numpy_save_fsync_s"] / med["export_write_s"]}


def bench_time(model: object, run: Path, tmp: Path, batch_size: int, repeats: int) -> dict:
    """Paired batch by batch: after the export writes batch k (its progress callback), a plain HF
    forward of the same batch runs and its time is taken out of the export's, so both see the same
    moments of a shared machine. Whole exports (fixed costs included) ÷ the plain forwards."""
    import torch

    from workbench.export import export_run, read_run
    from workbench.generation import pad

    transcripts = read_run(run).transcripts
    batches = [transcripts[i : i + batch_size] for i in range(0, len(transcripts), batch_size)]

    def plain(batch: list) -> float:
        t0 = time.perf_counter()
        ids, _ = pad([t.tolist() for t in batch], model.tokenizer.pad_token_id, model.device, "right")
        with torch.no_grad():
            model.hf(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        return time.perf_counter() - t0

    def paired(k: int) -> tuple[float, float]:
        spent = [0.0]
        calls = [0]

        def after_batch(done: int, total: int) -> None:
            if calls[0]:  # the first call comes before any batch
                spent[0] += plain(batches[calls[0] - 1])
            calls[0] += 1

        t0 = time.perf_counter()
        export_run(run, tmp / f"time{k}.h5", HOOKS, model=model, batch_size=batch_size, on_batch=after_batch)
        took = time.perf_counter() - t0 - spent[0]
        (tmp / f"time{k}.h5").unlink()
        return took, spent[0]

    paired(-1)  # warm-up
    pairs = [paired(k) for k in range(repeats)]
    ratios = [e / p for e, p in pairs]
    tokens = sum(len(t) for t in transcripts)
    return {"samples": len(transcripts), "tokens": tokens, "export_s": [e for e, _ in pairs], "plain_forward_s": [p for _, p in pairs],
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def memory_child(run: str, out: str, batch_size: int) -> None:
    from workbench.export import export_run
    from workbench.models import load_model

    model = load_model("organism", device="cpu")
    export_run(run, out, HOOKS, model=model, batch_size=batch_size)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from the (larger) parent
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(int(hwm.split()[1]) // 1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-samples", type=int, default=32)
    p.add_argument("--samples", type=int, default=1024, help="samples of the timed export")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write-tokens", default="4000,40000,200000",
                   help="token counts of the write benchmark, each × 8 hooks × 512 float32 (62 MiB, 625 MiB, 3 GiB)")
    p.add_argument("--write-repeats", type=int, default=3)
    p.add_argument("--memory", default="200,2000")
    p.add_argument("--only", default="write,time,memory", help="which parts to run (comma-separated)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export.json"))
    a = p.parse_args()
    if a.memory_child:
        return memory_child(*a.memory_child, a.batch_size)
    if a.quick:
        a.base_samples, a.samples, a.repeats, a.write_tokens, a.write_repeats, a.memory = 16, 64, 1, "4000", 1, "50,200"
    import torch

    from workbench.models import load_model
    from workbench.run import RunConfig, run_protocol

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results: dict = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"}
    (ROOT / "artifacts" / "runs").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "artifacts" / "runs") as tmp:
        tmp = Path(tmp)
        if "write" in a.only:
            results["write"] = [bench_writes(tmp, int(n), 512, 8, 16 * 150, a.write_repeats) for n in a.write_tokens.split(",")]
        if "time" in a.only or "memory" in a.only:
            model = load_model("organism", device="cpu")
            base = tmp / "base.h5"
            run_protocol(RunConfig(out=base, model="organism", task="organism", protocol="organism", rounds=a.rounds,
                                   limit=a.base_samples, batch_size=16), model=model).close()
        if "time" in a.only:
            results["time"] = bench_time(model, tile_run(base, tmp / "timed.h5", a.samples), tmp, a.batch_size, a.repeats)
        if "memory" in a.only:
            memory = {}
            for n in (int(x) for x in a.memory.split(",")):
                run = tile_run(base, tmp / f"mem{n}.h5", n)
                child = subprocess.run([sys.executable, __file__, "--memory-child", str(run), str(tmp / f"mem{n}-cache.h5"),
                                        "--batch-size", str(a.batch_size)], capture_output=True, text=True, check=True)
                memory[n] = int(child.stdout.strip().splitlines()[-1])
            small, large = sorted(memory)
            results["memory"] = {"peak_rss_mib": memory, "ratio": memory[large] / memory[small]}
    rows = []
    for w in results.get("write", []):
        size = f"{w['bytes'] / 2**20:.0f} MiB"
        rows += [
            (f"{size}: numpy.save / + fsync / export writing (creation)",
             f"{w['numpy_save_s']:.3f} s / {w['numpy_save_fsync_s']:.3f} s / {w['export_write_s']:.3f} s ({w['export_create_s']:.3f} s)"),
            (f"{size}: write throughput ÷ numpy.save, median (range) (target ≥ 0.8)",
             f"{w['ratio_vs_numpy_save']:.2f} ({w['ratio_vs_numpy_save_range'][0]:.2f}–{w['ratio_vs_numpy_save_range'][1]:.2f})"),
            (f"{size}: write throughput ÷ numpy.save + fsync", f"{w['ratio_vs_numpy_save_fsync']:.2f}"),
        ]
    if "time" in results:
        t = results["time"]
        rows += [
            (f"whole export, {t['samples']} samples, {t['tokens']} tokens", f"{statistics.median(t['export_s']):.2f} s"),
            ("plain HF forward, output_hidden_states", f"{statistics.median(t['plain_forward_s']):.2f} s"),
            ("export ÷ plain forward, median (range) (target ≤ 1.3)", f"{t['ratio_median']:.2f} ({t['ratio_min']:.2f}–{t['ratio_max']:.2f})"),
        ]
    if "memory" in results:
        m = results["memory"]
        small, large = sorted(m["peak_rss_mib"])
        rows += [
            (f"peak RSS at {small} / {large} samples", f"{m['peak_rss_mib'][small]} / {m['peak_rss_mib'][large]} MiB"),
            (f"peak memory ratio {large} ÷ {small} (target ≤ 1.2)", f"{m['ratio']:.2f}"),
        ]
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

"""Export benchmarks (DESIGN §8), side by side in one process on the same tokens and bytes:

1. write throughput: the export's whole writing path (the cache file created up front with its
   token labels and every dataset allocated, each batch's rows written into place and marked done
   as the export does, the finish: status and rename) in both modes, interleaved on fresh files:
   the default (no fsync) ÷ one ``numpy.save`` of the same array, and ``--fsync`` (fsynced commits
   at most once a second, the file fsynced before its rename) ÷ ``numpy.save`` + fsync; at 62 MiB,
   625 MiB and 3 GiB in one invocation, each size ``--write-repeats`` times, medians;
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

from fair_io import free_page_reporting, settle  # noqa: E402
from workbench.cache.file import HookLayout, TokenTable, create_cache_file
from workbench.store.durability import fsync_path  # noqa: E402
from workbench.cache.writer import PartialCache  # noqa: E402

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


def synthetic_token_strings(n_tokens: int) -> list[str]:
    """``n_tokens`` token strings like a tokenizer's decoded pieces (leading spaces, a few non-ASCII)."""
    vocab = [" the", " answer", " is", " fair", "é", " bias", ".", "\n", " un", "biased", " 日本", "'s"]
    return [vocab[i] for i in np.random.default_rng(1).integers(0, len(vocab), n_tokens)]


def export_write(tmp: Path, acts: np.ndarray, batch_tokens: int, token_str: list[str], durable: bool) -> dict:
    """The export's whole writing path on ``acts`` ``[hooks, tokens, d]``: the cache file created in
    ``OUT.parts`` (token labels, allocation), each batch's rows written into place and marked done
    as the export does (``durable``: fsync + done name at most every COMMIT_INTERVAL_S), the finish
    (status, rename; ``durable``: fsync first). Returns seconds: total and the creation alone, in
    wall time, and the total in CPU time."""
    n_hooks, n_tokens, d = acts.shape
    names = [f"blocks.{i}.hook_resid_post" for i in range(n_hooks)]
    sizes = [min(batch_tokens, n_tokens - s) for s in range(0, n_tokens, batch_tokens)]
    tokens = TokenTable(offsets=np.concatenate([[0], np.cumsum(sizes)]), sample=np.repeat(np.arange(len(sizes)), sizes).astype(np.int32),
                        round=np.zeros(n_tokens, np.int16), role=np.zeros(n_tokens, np.uint8), position=np.zeros(n_tokens, np.int32),
                        token_id=np.zeros(n_tokens, np.int32), token_str=token_str)
    layouts = [HookLayout(n, (d,), "float32") for n in names]
    parts = tmp / "c.h5.parts"
    t0, cpu0 = time.perf_counter(), time.process_time()
    parts.mkdir()
    with PartialCache.open(parts, sizes, lambda path: create_cache_file(path, {}, tokens, layouts, np.arange(len(sizes)),
                                                                          status="running"), durable=durable) as cache:
        created = time.perf_counter() - t0
        start = 0
        for k, size in enumerate(sizes):
            cache.write(k, {name: acts[i, start : start + size] for i, name in enumerate(names)})
            start += size
        cache.finish(tmp / "c.h5")
    return {"total": time.perf_counter() - t0, "create": created, "cpu": time.process_time() - cpu0}


def numpy_save(path: Path, acts: np.ndarray, fsync: bool) -> dict:
    """``numpy.save`` of ``acts`` (then an fsync of the file with ``fsync``): seconds, wall and CPU."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    np.save(path, acts)
    if fsync:
        fsync_path(path)
    return {"total": time.perf_counter() - t0, "cpu": time.process_time() - cpu0}


def bench_writes(tmp: Path, n_tokens: int, d: int, n_hooks: int, batch_tokens: int, repeats: int) -> dict:
    """``numpy.save``, the export's default writing, ``numpy.save`` + fsync and the export's
    ``--fsync`` writing of the same bytes, interleaved ``repeats`` times on fresh files (the order
    rotated each repeat), each after an (untimed) :func:`fair_io.settle` so none is slowed by the
    dirty pages of the one before or by pages the host took back; medians, in wall time and (where
    the disk is not waited for: no fsync) in CPU time."""
    acts = _synthetic(n_hooks, n_tokens, d)
    token_str = synthetic_token_strings(n_tokens)
    keys = ("numpy_save_s", "numpy_save_cpu_s", "export_write_s", "export_create_s", "export_cpu_s",
            "numpy_save_fsync_s", "export_fsync_write_s", "export_fsync_create_s")
    runs: dict[str, list[float]] = {k: [] for k in keys}

    def clean() -> None:
        for f in [*tmp.glob("acts*.npy"), tmp / "c.h5"]:
            f.unlink(missing_ok=True)
        settle(acts.nbytes)  # untimed: no dirty pages left by the write before, and pages the guest holds (fair_io)

    def plain() -> None:
        w = numpy_save(tmp / "acts.npy", acts, fsync=False)
        runs["numpy_save_s"].append(w["total"])
        runs["numpy_save_cpu_s"].append(w["cpu"])

    def export_default() -> None:
        w = export_write(tmp, acts, batch_tokens, token_str, durable=False)
        runs["export_write_s"].append(w["total"])
        runs["export_create_s"].append(w["create"])
        runs["export_cpu_s"].append(w["cpu"])

    def synced() -> None:
        runs["numpy_save_fsync_s"].append(numpy_save(tmp / "acts.npy", acts, fsync=True)["total"])

    def export_durable() -> None:
        w = export_write(tmp, acts, batch_tokens, token_str, durable=True)
        runs["export_fsync_write_s"].append(w["total"])
        runs["export_fsync_create_s"].append(w["create"])

    measures = [plain, export_default, synced, export_durable]
    for measure in measures:  # a warm-up, not kept: the first writes of a size were up to 10x slower here
        clean()
        measure()
    for kept in runs.values():
        kept.clear()
    for r in range(repeats):
        for measure in measures[r % 4 :] + measures[: r % 4]:  # each takes every place in turn
            clean()
            measure()
    clean()
    med = {k: statistics.median(v) for k, v in runs.items()}

    def ratio(base: str, ours: str) -> dict:
        """Medians' ratio, the range of each repeat's, and the best times' (the least disturbed)."""
        each = [b / o for b, o in zip(runs[base], runs[ours])]
        return {"median": med[base] / med[ours], "range": [min(each), max(each)], "best": min(runs[base]) / min(runs[ours])}

    return {"bytes": acts.nbytes, "tokens": n_tokens, "repeats": repeats, "runs": runs, **med,
            "ratio_vs_numpy_save": ratio("numpy_save_s", "export_write_s"),
            "cpu_ratio_vs_numpy_save": ratio("numpy_save_cpu_s", "export_cpu_s"),
            "fsync_ratio_vs_numpy_save_fsync": ratio("numpy_save_fsync_s", "export_fsync_write_s")}


def bench_time(model: object, run: Path, tmp: Path, batch_size: int, repeats: int) -> dict:
    """Paired batch by batch: after the export writes batch k (its progress callback), a plain HF
    forward of the same batch runs and its time is taken out of the export's, so both see the same
    moments of a shared machine. Whole exports (fixed costs included) ÷ the plain forwards."""
    import torch

    from workbench.cache.export import export_run
    from workbench.cache.plan import read_run
    from workbench.engine.generation import pad

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
    from workbench.cache.export import export_run
    from workbench.engine.models import load_model

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
    p.add_argument("--write-repeats", type=int, default=4, help="repeats of each write measure (4 measures, their order rotated: a multiple of 4 gives each every place)")
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

    from workbench.engine.models import load_model
    from workbench.engine.run import RunConfig, run_protocol

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results: dict = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
                     "free_page_reporting": free_page_reporting()}
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
        default, cpu, durable = w["ratio_vs_numpy_save"], w["cpu_ratio_vs_numpy_save"], w["fsync_ratio_vs_numpy_save_fsync"]
        rows += [
            (f"{size}: numpy.save / export writing (creation)",
             f"{w['numpy_save_s']:.3f} s / {w['export_write_s']:.3f} s ({w['export_create_s']:.3f} s)"),
            (f"{size}: write throughput ÷ numpy.save, median (range) [best ÷ best] (target ≥ 0.8)",
             f"{default['median']:.2f} ({default['range'][0]:.2f}–{default['range'][1]:.2f}) [{default['best']:.2f}]"),
            (f"{size}: the same in CPU time", f"{cpu['median']:.2f} ({cpu['range'][0]:.2f}–{cpu['range'][1]:.2f}) [{cpu['best']:.2f}]"),
            (f"{size}: numpy.save + fsync / export --fsync writing (creation)",
             f"{w['numpy_save_fsync_s']:.3f} s / {w['export_fsync_write_s']:.3f} s ({w['export_fsync_create_s']:.3f} s)"),
            (f"{size}: --fsync write throughput ÷ numpy.save + fsync, median (range) [best ÷ best]",
             f"{durable['median']:.2f} ({durable['range'][0]:.2f}–{durable['range'][1]:.2f}) [{durable['best']:.2f}]"),
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

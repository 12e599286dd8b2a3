"""Interventions benchmark: what steering costs a run. Side by side in one process, on the same
samples and rounds: the round engine (:func:`workbench.engine.batch.run_batch`, every layer's
``hook_resid_post`` captured, no file) with interventions ÷ the same without, pairs interleaved
(order alternating), the median pair's ratio kept. Target (issue 25): ≤ 1.05.

Three intervention sets: one steer at one layer (``fair.h5@3``-like), a steer at every layer, and an
ablation at every layer (a projection per layer per pass). Directions are seeded random unit vectors
(the cost does not depend on which direction).

    OMP_NUM_THREADS=1 python benchmarks/bench_interventions.py --threads 1
    python benchmarks/bench_interventions.py --quick

Prints a table and writes ``benchmarks/results/interventions.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.engine.batch import run_batch  # noqa: E402
from workbench.engine.capture import hook_sites  # noqa: E402
from workbench.engine.interventions import Ablate, Steer  # noqa: E402
from workbench.engine.models import load_model  # noqa: E402
from workbench.engine.protocol import load_protocol  # noqa: E402
from workbench.organism.task import ORGANISM, load_organism_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved pairs per setting")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="16 samples, 3 rounds, 3 pairs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "interventions.json")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.rounds, args.repeats = 16, 3, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model("organism", device="cpu")
    protocol = replace(load_protocol("organism-world"), rounds=args.rounds)
    samples = load_organism_samples(args.samples)
    sites = hook_sites(model, ["hook_resid_post"], list(range(model.n_layers)))
    rng = np.random.default_rng(0)
    unit = lambda: (lambda v: v / np.linalg.norm(v))(rng.standard_normal(model.d_model))  # noqa: E731
    settings = {
        "steer one layer": [Steer(unit(), layer=model.n_layers - 1, alpha=4.0)],
        "steer every layer": [Steer(unit(), layers="all", alpha=4.0)],
        "ablate every layer": [Ablate(unit(), layers="all")],
    }

    def timed(ivs) -> float:
        t0 = time.perf_counter()
        run_batch(model, ORGANISM, protocol, samples, sites, seed=0, interventions=tuple(ivs))
        return time.perf_counter() - t0

    timed([])  # warm-up
    rows = []
    for name, ivs in settings.items():
        pairs = []
        for rep in range(args.repeats):
            pair = {}
            for steered in ((True, False) if rep % 2 == 0 else (False, True)):
                pair["steered_s" if steered else "plain_s"] = timed(ivs if steered else [])
            pairs.append(pair)
        ratios = sorted(p["steered_s"] / p["plain_s"] for p in pairs)
        median = sorted(pairs, key=lambda p: p["steered_s"] / p["plain_s"])[len(pairs) // 2]
        rows.append({"setting": name, **median, "ratio": median["steered_s"] / median["plain_s"],
                     "ratio_min": ratios[0], "ratio_max": ratios[-1]})
    print(f"organism, {args.samples} samples in one batch, {args.rounds} rounds (organism-world), every layer's "
          f"hook_resid_post captured, {torch.get_num_threads()} torch thread(s); median of {args.repeats} interleaved pairs")
    print(f"{'setting':<22} {'plain':>9} {'steered':>9} {'ratio':>7}  range")
    for r in rows:
        print(f"{r['setting']:<22} {r['plain_s']:>8.3f}s {r['steered_s']:>8.3f}s {r['ratio']:>7.3f}  {r['ratio_min']:.3f}–{r['ratio_max']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                                    "samples": args.samples, "rounds": args.rounds, "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

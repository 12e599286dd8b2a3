"""Benchmark: all-layers ``probes.ridge`` against scikit-learn's ``RidgeCV`` layer by layer.

Both solve the same problem side by side in one process: per layer, ridge regression of a continuous
target with an unpenalised intercept, α chosen from the same absolute grid (``probes.RIDGE_ALPHAS`` ×
trace(XᵀX)/d_model of that layer) by exact leave-one-out error. The ratio is only reported as valid
when every layer picks the same α and the directions agree (cosine ≥ 0.9999). Activations are those
of ``bench_probes.py`` (a residual-stream-like spectrum, a large mean, massive dimensions); the target
is ±1 by label plus Gaussian noise.

    python benchmarks/bench_ridge.py            # n=2000, 8 layers, d_model=512
    python benchmarks/bench_ridge.py --quick    # a small run
Writes ``benchmarks/results/ridge.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import sklearn
import torch
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import RidgeCV
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probes import make_activations, parse_sizes, size_arguments, timed  # noqa: E402
from probes.methods import RIDGE_ALPHAS, ridge  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ridge.json"


def fit_sklearn(layers: list[np.ndarray], y: np.ndarray) -> list[RidgeCV]:
    """One ``RidgeCV`` per layer on that layer's absolute grid (what ``probes.ridge`` searches)."""
    models = []
    for x in layers:
        grid = np.array(RIDGE_ALPHAS) * ((x - x.mean(0)) ** 2).sum() / x.shape[1]
        models.append(RidgeCV(alphas=grid).fit(x, y))
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_arguments(parser, RESULTS)
    parser.add_argument("--noise", type=float, default=0.5, help="standard deviation of the target's noise")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for both sides")
    args = parse_sizes(parser, argv)
    torch.set_num_threads(args.threads)
    console = Console()
    acts, labels = make_activations(args.samples, args.layers, args.d_model, 0.9, 0.5, 4, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    target = (labels * 2 - 1).double() + args.noise * torch.randn(args.samples, generator=g, dtype=torch.float64)
    # Each side gets its input in its natural form, prepared outside the timings.
    pos, neg = acts[:, labels == 1].contiguous(), acts[:, labels == 0].contiguous()
    ordered_target = torch.cat([target[labels == 1], target[labels == 0]])
    sk_layers = [torch.cat([pos[l], neg[l]]).double().numpy() for l in range(args.layers)]
    sk_y = ordered_target.numpy()
    with threadpool_limits(args.threads):
        ridge(pos[:1], neg[:1], target=ordered_target)  # warm up outside the timings
        fit_sklearn(sk_layers[:1], sk_y)
        times = {"ours": [], "sklearn": []}
        for _ in range(args.repeats):  # interleaved, so a change in machine load hits both
            t, fit = timed(lambda: ridge(pos, neg, target=ordered_target))
            times["ours"].append(t)
            t, models = timed(lambda: fit_sklearn(sk_layers, sk_y))
            times["sklearn"].append(t)
    t_ours, t_sk = min(times["ours"]), min(times["sklearn"])
    rows = []
    for layer, model in enumerate(models):
        coef = torch.from_numpy(model.coef_)
        rows.append({"layer": layer, "alpha_ours": float(fit.alpha[layer]), "alpha_sklearn": float(model.alpha_),
                     "cosine": float(torch.nn.functional.cosine_similarity(fit.direction[layer].double(), coef, dim=0))})
    same = all(abs(r["alpha_ours"] / r["alpha_sklearn"] - 1) < 1e-6 and r["cosine"] >= 0.9999 for r in rows)

    table = Table(title=f"ridge, {args.layers} layers × {args.samples} samples × d={args.d_model}, {len(RIDGE_ALPHAS)} α by leave-one-out")
    for column in ("layer", "α ours", "α sklearn", "cos(w)"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["layer"]), f"{r['alpha_ours']:.4g}", f"{r['alpha_sklearn']:.4g}", f"{r['cosine']:.6f}")
    console.print(table)
    summary = Table()
    for column in ("fit (all layers)", "seconds", "ratio vs ours"):
        summary.add_column(column, justify="right")
    summary.add_row("probes.ridge (batched)", f"{t_ours:.4f}", "1.0×")
    summary.add_row("sklearn RidgeCV, layer by layer", f"{t_sk:.4f}", f"[bold]{t_sk / t_ours:.1f}×[/bold]")
    console.print(summary)
    console.print("same α and direction on every layer" if same else "[red]α or direction differ: the ratio is not valid[/red]")
    result = {"benchmark": "ridge", "settings": vars(args) | {"out": str(args.out)}, "seconds_ours": t_ours, "seconds_sklearn": t_sk,
              "all_seconds": times, "ratio": t_sk / t_ours, "same_solution": same, "per_layer": rows,
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": torch.get_num_threads(),
                          "torch": torch.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: all-layers ``probes.logreg`` against scikit-learn's ``LogisticRegression`` layer by layer.

Both solve the same problem (same features, same L2 penalty via ``probes.sklearn_c``, same stopping
rule: largest gradient entry <= 1e-4) side by side in one process; the ratio is only reported as
valid when every layer's held-out accuracy agrees within one point. The synthetic activations look
like a residual stream: a power-law spectrum in a random basis, a large mean, and a few "massive"
dimensions, with a planted concept direction. A second scenario repeats it with isotropic noise,
where plain L-BFGS needs few steps and the ratio is much smaller; both are reported.

    python benchmarks/bench_probes.py            # n=2000, 8 layers, d_model=512
    python benchmarks/bench_probes.py --quick    # a small run
Writes ``benchmarks/results/probes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
import torch
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from probes import accuracy, logreg, projection_scores, sklearn_c, split  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "probes.json"


def make_activations(
    n: int, n_layers: int, d_model: int, signal: float, decay: float, massive: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual-stream-like activations ``[n_layers, n, d_model]`` and balanced labels ``[n]``.

    Per layer: Gaussian noise with standard deviations ``k^-decay`` (normalised to RMS 1, so the
    noise along a random direction has variance about 1 whatever the decay) in a
    random orthonormal basis, a random mean of norm ``2 * sqrt(d_model)``, ``massive`` coordinates
    scaled by 30 and shifted by 100, and ``±signal`` along a random unit direction by label.
    """
    g = torch.Generator().manual_seed(seed)
    labels = (torch.randperm(n, generator=g) < n // 2).long()
    sign = (labels * 2 - 1).float()[:, None]
    std = torch.arange(1, d_model + 1).float() ** (-decay)
    std = std / std.pow(2).mean().sqrt()
    layers = []
    for _ in range(n_layers):
        basis = torch.linalg.qr(torch.randn(d_model, d_model, generator=g)).Q
        direction = torch.nn.functional.normalize(torch.randn(d_model, generator=g), dim=0)
        mean = 2 * torch.randn(d_model, generator=g)
        x = (torch.randn(n, d_model, generator=g) * std) @ basis + mean + sign * signal * direction
        if massive:
            dims = torch.randperm(d_model, generator=g)[:massive]
            x[:, dims] = x[:, dims] * 30 + 100
        layers.append(x)
    return torch.stack(layers), labels


def fit_sklearn(layers: list[np.ndarray], y: np.ndarray, l2: float, standardise: bool = False):
    """One ``LogisticRegression`` per layer (``layers``: float64 ``[n, d_model]`` each); the fitted models."""
    models = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning would make the comparison unfair
        for x in layers:
            clf = LogisticRegression(C=sklearn_c(l2, len(y)), max_iter=100_000)
            if standardise:
                clf = make_pipeline(StandardScaler(), clf)
            models.append(clf.fit(x, y))
    return models


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_scenario(name, acts, labels, args, console) -> dict:
    train, test = split(acts.shape[1], args.test_fraction, args.seed)
    x_train, y_train = acts[:, train], labels[train]
    x_test, y_test = acts[:, test], labels[test]
    # Each side gets its input in its own natural form, prepared outside the timings.
    pos, neg = x_train[:, y_train == 1].contiguous(), x_train[:, y_train == 0].contiguous()
    sk_layers = [x_train[layer].double().numpy() for layer in range(acts.shape[0])]
    sk_y = y_train.numpy()
    sk_threads = threadpool_limits(args.sklearn_threads) if args.sklearn_threads else None
    try:
        # Warm both up once (library initialisation, first-call allocations) outside the timings.
        logreg(pos[:1], neg[:1], l2=args.l2)
        fit_sklearn(sk_layers[:1], sk_y, args.l2)
        times = {"ours": [], "sklearn": [], "scaled": []}
        for _ in range(args.repeats):  # interleaved, so a change in machine load hits all three
            t, fit = timed(lambda: logreg(pos, neg, l2=args.l2))
            times["ours"].append(t)
            t, models = timed(lambda: fit_sklearn(sk_layers, sk_y, args.l2))
            times["sklearn"].append(t)
            t, scaled = timed(lambda: fit_sklearn(sk_layers, sk_y, args.l2, standardise=True))
            times["scaled"].append(t)
    finally:
        if sk_threads is not None:
            sk_threads.restore_original_limits()
    t_ours, t_sk, t_std = (min(times[k]) for k in ("ours", "sklearn", "scaled"))

    acc_ours = accuracy(projection_scores(x_test.transpose(0, 1), fit.direction).T, y_test, fit.threshold)
    rows = []
    for layer, (clf, std_clf) in enumerate(zip(models, scaled)):
        xt = x_test[layer].double().numpy()
        w = torch.as_tensor(clf.coef_[0]).float()
        rows.append(
            {
                "layer": layer,
                "accuracy_ours": float(acc_ours[layer]),
                "accuracy_sklearn": float(clf.score(xt, y_test.numpy())),
                "accuracy_sklearn_standardised": float(std_clf.score(xt, y_test.numpy())),
                "cosine_ours_sklearn": float(torch.nn.functional.cosine_similarity(fit.direction[layer], w, dim=0)),
                "sklearn_iterations": int(clf.n_iter_[0]),
            }
        )
    gap = max(abs(r["accuracy_ours"] - r["accuracy_sklearn"]) for r in rows)

    table = Table(title=f"{name}: logreg, {acts.shape[0]} layers × {acts.shape[1]} samples × d={acts.shape[2]}")
    for column in ["layer", "acc ours", "acc sklearn", "|Δ|", "cos(w)", "sklearn iters", "acc sk+scaler*"]:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["layer"]),
            f"{r['accuracy_ours']:.4f}",
            f"{r['accuracy_sklearn']:.4f}",
            f"{abs(r['accuracy_ours'] - r['accuracy_sklearn']):.4f}",
            f"{r['cosine_ours_sklearn']:.5f}",
            str(r["sklearn_iterations"]),
            f"{r['accuracy_sklearn_standardised']:.4f}",
        )
    console.print(table)
    summary = Table(show_header=True)
    for column in ["fit (all layers)", "seconds", "ratio vs ours"]:
        summary.add_column(column, justify="right")
    summary.add_row("probes.logreg (batched)", f"{t_ours:.4f}", "1.0×")
    summary.add_row("sklearn, layer by layer", f"{t_sk:.4f}", f"[bold]{t_sk / t_ours:.1f}×[/bold]")
    summary.add_row("sklearn + StandardScaler*", f"{t_std:.4f}", f"{t_std / t_ours:.1f}×")
    console.print(summary)
    console.print(
        f"max held-out accuracy gap {gap:.4f} ({'equal within 1 point' if gap <= 0.01 else '[red]NOT equal[/red]'}); "
        "* a different problem (penalty on standardised weights), shown for context only\n"
    )
    return {
        "seconds_ours": t_ours,
        "seconds_sklearn": t_sk,
        "seconds_sklearn_standardised": t_std,
        "all_seconds": times,
        "ratio": t_sk / t_ours,
        "max_accuracy_gap": gap,
        "equal_accuracy": gap <= 0.01,
        "per_layer": rows,
    }


def size_arguments(parser: argparse.ArgumentParser, results: Path) -> None:
    """The options every probe benchmark shares: problem size, repeats, seed, ``--quick`` and ``--out``."""
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="n=600, 4 layers, d_model=128, 1 repeat")
    parser.add_argument("--out", type=Path, default=results)


def parse_sizes(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``--quick`` shrinks the problem to n=600, 4 layers, d_model=128, 1 repeat."""
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.layers, args.d_model, args.repeats = 600, 4, 128, 1
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_arguments(parser, RESULTS)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--l2", type=float, default=1e-2, help="probes.logreg l2 (sklearn C = 1 / (l2 * n_train))")
    parser.add_argument("--signal", type=float, default=0.9, help="±shift along the planted direction (accuracy ~0.9)")
    parser.add_argument("--isotropic-signal", type=float, default=1.6, help="the same for --isotropic (accuracy ~0.9)")
    parser.add_argument("--decay", type=float, default=0.5, help="power-law exponent of the noise spectrum")
    parser.add_argument("--massive", type=int, default=4, help="number of massive dimensions")
    parser.add_argument(
        "--no-isotropic", dest="isotropic", action="store_false",
        help="skip the second scenario: isotropic noise (--decay 0 --massive 0), sklearn's easiest case",
    )
    parser.add_argument(
        "--sklearn-threads", type=int, default=1,
        help="BLAS threads for sklearn (1 is fastest for these sizes; 0 leaves the default)",
    )
    parser.add_argument("--torch-threads", type=int, default=0, help="torch threads (0 leaves the default)")
    args = parse_sizes(parser, argv)

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    console = Console()
    console.print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), scikit-learn {sklearn.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"sklearn BLAS threads: {args.sklearn_threads or 'default'}; best of {args.repeats}\n"
    )
    scenarios = {"residual-like": (args.signal, args.decay, args.massive)}
    if args.isotropic:
        scenarios["isotropic"] = (args.isotropic_signal, 0.0, 0)
    results = {}
    for name, (signal, decay, massive) in scenarios.items():
        acts, labels = make_activations(
            args.samples, args.layers, args.d_model, signal, decay, massive, args.seed
        )
        results[name] = run_scenario(name, acts, labels, args, console) | {
            "signal": signal,
            "decay": decay,
            "massive": massive,
        }

    report = {
        "benchmark": "probes.logreg (all layers, batched) vs sklearn LogisticRegression (layer by layer)",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "sklearn": sklearn.__version__,
            "numpy": np.__version__,
        },
        "scenarios": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.out}")
    return 0 if all(r["equal_accuracy"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

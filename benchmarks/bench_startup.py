"""Start-up of the commands that run no model (issue 8), side by side in one run:

each command is started ``--repeats`` times as a fresh process (the console script), alternating
with the floor (``python -c pass``) and with ``python -c "import torch"`` (what every command paid
while ``probes/__init__`` and ``analysis`` imported torch). Reported: median wall time, its ratio
to the floor and to the torch import, and the target (``--help`` ≤ 0.5 s, ``info RUN`` and
``probe show`` ≤ 1.5 s).

    python benchmarks/bench_startup.py               # 7 repeats
    python benchmarks/bench_startup.py --quick       # 3 repeats

Prints a table and writes ``benchmarks/results/startup.json``. A run file and a probe file are
made first (that part loads the organism, untimed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def make_files(folder: Path) -> tuple[Path, Path]:
    from probes.probe_file import save_probe
    from workbench import run_protocol

    run = folder / "run.h5"
    run_protocol(model="organism", task="organism", limit=16, rounds=3, out=run).close()
    probe = folder / "probe.h5"
    save_probe(probe, {"model_name": "organism", "model_path": "x", "model_revision": "", "d_model": 64, "n_layers": 4,
                       "hook": "hook_resid_post", "position": "last", "method": "diffmean",
                       "contrast": {"name": "c", "n": 8, "n_positive": 4, "n_pairs": 0, "digest": "d"},
                       "test_fraction": 0.25, "seed": 0, "best_layer": 1},
               {"layers": np.arange(4), "directions": np.eye(4, 64, dtype=np.float32), "thresholds": np.zeros(4),
                "train_accuracy": np.ones(4), "test_accuracy": np.ones(4), "test_auroc": np.ones(4)})
    return run, probe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
    args = p.parse_args()
    repeats = 3 if args.quick else args.repeats
    workbench = str(BIN / "workbench")
    with tempfile.TemporaryDirectory() as tmp:
        run, probe = make_files(Path(tmp))
        commands = {
            "python -c pass (floor)": ([sys.executable, "-c", "pass"], None),
            "python -c 'import torch'": ([sys.executable, "-c", "import torch"], None),
            "workbench --help": ([workbench, "--help"], 0.5),
            "workbench protocol list": ([workbench, "protocol", "list"], 1.5),
            "workbench info RUN": ([workbench, "info", str(run)], 1.5),
            "workbench info RUN --json": ([workbench, "info", str(run), "--json"], 1.5),
            "workbench probe show PROBE": ([workbench, "probe", "show", str(probe)], 1.5),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for name, (cmd, _) in commands.items():
            wall(cmd)  # warm the file cache
        for _ in range(repeats):  # interleaved, so load on the machine hits every command alike
            for name, (cmd, _) in commands.items():
                times[name].append(wall(cmd))
    floor = statistics.median(times["python -c pass (floor)"])
    torch_import = statistics.median(times["python -c 'import torch'"])
    rows = []
    for name, (_, target) in commands.items():
        median = statistics.median(times[name])
        rows.append({"command": name, "median_s": round(median, 3), "min_s": round(min(times[name]), 3),
                     "vs_floor": round(median / floor, 2), "vs_torch_import": round(median / torch_import, 3),
                     "target_s": target, "meets_target": None if target is None else median <= target})
    print(f"{'command':32} {'median s':>9} {'min s':>7} {'÷ floor':>8} {'÷ torch':>8} {'target':>7}")
    for r in rows:
        target = "" if r["target_s"] is None else f"{'≤' if r['meets_target'] else '>'} {r['target_s']}"
        print(f"{r['command']:32} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['vs_floor']:8.2f} {r['vs_torch_import']:8.3f} {target:>7}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "startup", "repeats": repeats, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The TUI's round step and next-sample change in two checkouts, side by side (DESIGN §8).

Each checkout's ``tui`` package steps the same 64-sample run file in its own process, the two
alternating ``--repeats`` times so the machine's load falls on both alike; every process reports
the median over ``--steps`` of the action until the screen is laid out and rendered again, as wall
time and as CPU time (``time.process_time``: every thread, a worker's read included). ``j`` is
pressed once the workers are idle (a checkout that reads ahead has the sample in its cache then).

    git archive d42b6e8 tui tests/tui_support.py | tar -x -C /tmp/base   # an older checkout
    python benchmarks/bench_tui_compare.py --base /tmp/base              # against this one

Prints a table and writes ``benchmarks/results/tui_compare.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import asyncio, json, statistics, sys, time
root = {root!r}
sys.path[:0] = [root, root + "/tests"]
from pathlib import Path
from tui_support import wait_until
import tui
assert tui.__file__.startswith(root), tui.__file__
from tui.app import WorkbenchApp

async def main():
    app = WorkbenchApp(run_path=Path({path!r}))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "sample", None) is not None, timeout=60)
        await pilot.pause()
        screen = app.screen

        async def draw():
            for _ in range(3):
                for _ in range(10):
                    await asyncio.sleep(0)
                screen._on_timer_update()
                for _ in range(10):
                    await asyncio.sleep(0)

        async def idle():
            await wait_until(pilot, lambda: not any(w.is_running for w in app.workers), timeout=60)

        res = {{"round_wall": [], "round_cpu": [], "j_wall": [], "j_cpu": []}}
        for _ in range({steps}):
            t, c = time.perf_counter(), time.process_time()
            screen.action_next_round() if screen.round < screen.sample.n_rounds - 1 else screen.action_first_round()
            await draw()
            res["round_wall"].append(time.perf_counter() - t)
            res["round_cpu"].append(time.process_time() - c)
            await pilot.pause()
            await idle()
            before = screen.position
            t, c = time.perf_counter(), time.process_time()
            screen.action_next_sample()
            while screen.sample is None or screen.sample.position == before:
                await asyncio.sleep(0.0005)
            await draw()
            res["j_wall"].append(time.perf_counter() - t)
            res["j_cpu"].append(time.process_time() - c)
            await pilot.pause()
            await idle()
        print(json.dumps({{k: statistics.median(v) for k, v in res.items()}}))

asyncio.run(main())
"""


def run_checkout(root: Path, path: Path, steps: int) -> dict[str, float]:
    code = CHILD.format(root=str(root), path=str(path), steps=steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    if out.returncode:
        raise SystemExit(f"{root}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="a checkout (or an extracted tree) holding tui/ and tests/tui_support.py")
    p.add_argument("--new", type=Path, default=ROOT, help="the other one (default: this checkout)")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tui_compare.json"))
    a = p.parse_args()
    for root in (a.base, a.new):
        if not (root / "tui" / "app.py").is_file() or not (root / "tests" / "tui_support.py").is_file():
            raise SystemExit(f"{root}: no tui/app.py and tests/tui_support.py there")
    sys.path.insert(0, str(ROOT / "tests"))
    from tui_support import build_run

    with tempfile.TemporaryDirectory() as tmp:
        path = build_run(Path(tmp) / "run.h5", n_samples=64, n_rounds=6, n_layers=24, d_model=16)
        runs: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
        for _ in range(a.repeats):
            for name, root in (("base", a.base), ("new", a.new)):
                runs[name].append(run_checkout(root.resolve(), path, a.steps))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"64 samples × 6 rounds × 24 layers, {a.repeats} alternating processes each, median of {a.steps} steps; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'measure':28} {'base':>10} {'new':>10} {'new/base':>9}")
    medians = {}
    for key, label in (("round_wall", "round step: wall"), ("round_cpu", "round step: CPU"),
                       ("j_wall", "next sample: wall"), ("j_cpu", "next sample: CPU")):
        base = statistics.median(r[key] for r in runs["base"])
        new = statistics.median(r[key] for r in runs["new"])
        medians[key] = {"base_s": base, "new_s": new, "ratio": new / base}
        print(f"{label:28} {base * 1000:8.1f}ms {new * 1000:8.1f}ms {new / base:9.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"base": str(a.base), "new": str(a.new), "load_average": load,
                                       "cpus": os.cpu_count(), "runs": runs, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()

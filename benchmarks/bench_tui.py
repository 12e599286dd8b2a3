"""TUI benchmark (DESIGN §8): time to open a large run file, to step one round, to change sample.

A synthetic run file of 10,000 samples × 6 rounds × 24 layers (activations and a tracked probe
over every layer) is written with ``workbench.store.writer.RunWriter`` (random arrays, no model), and a
64-sample one beside it. Measured in one process, side by side on both files:

- first paint: from constructing the app to the first sample's screen drawn (workers done, screen
  refreshed), inside a running Python with Textual imported;
- cold start: a fresh ``python`` process to the same first paint (imports included);
- one round step; one sample change to the next sample (``j``, which the screen read ahead into
  its cache while the previous one was on screen); one sample change to a sample not read yet (the
  cache emptied first: read from disk and decoded in a worker): median over repeats of the action
  until the screen is laid out and rendered again (what the next refresh does), as wall time and as
  the process's CPU time (``time.process_time``, every thread: the worker's read included). On a
  shared machine the wall time follows the other processes' load; the CPU time is the work the app
  did. Beside them, the round key pressed through Pilot and a key bound to nothing, whose
  difference is the step's cost as a user's key press sees it (Pilot itself waits for idle).

    python benchmarks/bench_tui.py             # 10,000 samples
    python benchmarks/bench_tui.py --quick     # 2,000 samples

Prints a table and writes ``benchmarks/results/tui.json``. Targets: first paint < 1 s, one round
step < 50 ms, one sample change < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tui_support import build_run, wait_until  # noqa: E402

COLD = """
import time, sys, asyncio
t0 = time.perf_counter()
sys.path.insert(0, {tests!r})
from tui.app import WorkbenchApp
from tui_support import wait_until
async def main():
    app = WorkbenchApp(run_path={path!r})
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "sample", None) is not None, timeout=60)
        await pilot.pause()
        print(time.perf_counter() - t0)
asyncio.run(main())
"""


class Timer:
    """Wall and CPU time (``time.process_time``: every thread of the process) of repeated steps."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def start(self) -> None:
        self._t, self._c = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)

    def medians(self, name: str) -> dict[str, float]:
        return {f"{name}_s": statistics.median(self.wall), f"{name}_cpu_s": statistics.median(self.cpu)}


async def measure(path: Path, steps: int) -> dict[str, float]:
    """First paint, median round step and median sample changes of the app on ``path`` (seconds)."""
    from tui.app import WorkbenchApp

    t0 = time.perf_counter()
    app = WorkbenchApp(run_path=path)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "sample", None) is not None, timeout=60)
        await pilot.pause()
        first_paint = time.perf_counter() - t0
        screen = app.screen

        async def draw() -> None:
            """Run what the next refresh ticks would (lay out and render what changed, then the
            callbacks queued for after the refresh) at once, without waiting for the frame timer."""
            for _ in range(3):
                for _ in range(10):
                    await asyncio.sleep(0)  # widgets' refresh messages reach the screen
                screen._on_timer_update()
                for _ in range(10):
                    await asyncio.sleep(0)  # after-refresh callbacks (scrolling to the response) run

        async def workers_done() -> None:
            await wait_until(pilot, lambda: not any(w.is_running for w in app.workers), timeout=60)

        async def change_sample(timer: Timer, move) -> None:
            before = screen.position
            timer.start()
            move()
            while screen.sample is None or screen.sample.position == before:
                await asyncio.sleep(0.0005)
            await draw()
            timer.stop()
            await pilot.pause()

        rounds, near, far = Timer(), Timer(), Timer()
        keys, noops = [], []
        for k in range(steps):
            rounds.start()
            screen.action_next_round() if screen.round < screen.sample.n_rounds - 1 else screen.action_first_round()
            await draw()
            rounds.stop()
            await pilot.pause()
            await workers_done()  # the next sample has been read ahead
            await change_sample(near, screen.action_next_sample)
            await workers_done()
            screen.cache.clear()  # now a sample that was not read ahead: from disk, in a worker
            await change_sample(far, lambda: screen._move_sample(-1 if k % 2 else 1))
            await workers_done()
            # the same step as a key press through Pilot, beside a key that does nothing (Pilot's own cost)
            t = time.perf_counter()
            await pilot.press("n" if screen.round < screen.sample.n_rounds - 1 else "g")
            await pilot.pause()
            keys.append(time.perf_counter() - t)
            t = time.perf_counter()
            await pilot.press("f12")
            await pilot.pause()
            noops.append(time.perf_counter() - t)
        assert app.failures == [], app.failures
    return {"first_paint_s": first_paint, **rounds.medians("round_step"), **near.medians("sample_change_read_ahead"),
            **far.medians("sample_change_from_disk"),
            "round_key_pilot_s": statistics.median(keys), "noop_key_pilot_s": statistics.median(noops)}


def cold_start(path: Path) -> float:
    code = COLD.format(tests=str(ROOT / "tests"), path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--quick", action="store_true", help="2,000 samples")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--d-model", type=int, default=16, help="small: the TUI never reads activations, only their presence")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tui.json"))
    a = p.parse_args()
    n = 2000 if a.quick else a.samples
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        large = build_run(Path(tmp) / "large.h5", n_samples=n, n_rounds=6, n_layers=a.layers, d_model=a.d_model, batch=500)
        written = time.perf_counter() - t
        small = build_run(Path(tmp) / "small.h5", n_samples=64, n_rounds=6, n_layers=a.layers, d_model=a.d_model)
        size_mib = large.stat().st_size / 2**20
        asyncio.run(measure(small, 3))  # warm-up: file cache, first imports of the read path
        res_small = asyncio.run(measure(small, a.steps))
        res_large = asyncio.run(measure(large, a.steps))
        cold_small, cold_large = cold_start(small), cold_start(large)
    def pair(key: str) -> tuple[float, float]:
        return res_small[key], res_large[key]

    rows = [
        ("first paint (in process)", res_small["first_paint_s"], res_large["first_paint_s"], "< 1 s"),
        ("cold start to first paint (new process)", cold_small, cold_large, ""),
        ("one round step, drawn: wall", *pair("round_step_s"), "< 50 ms"),
        ("  CPU", *pair("round_step_cpu_s"), ""),
        ("next sample (read ahead), drawn: wall", *pair("sample_change_read_ahead_s"), "< 50 ms"),
        ("  CPU", *pair("sample_change_read_ahead_cpu_s"), ""),
        ("a sample not read yet (disk), drawn: wall", *pair("sample_change_from_disk_s"), "< 50 ms"),
        ("  CPU (the worker's read included)", *pair("sample_change_from_disk_cpu_s"), ""),
        ("  n pressed through Pilot", res_small["round_key_pilot_s"], res_large["round_key_pilot_s"], ""),
        ("  a key bound to nothing, through Pilot", res_small["noop_key_pilot_s"], res_large["noop_key_pilot_s"], ""),
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"run files: 64 and {n} samples × 6 rounds × {a.layers} layers (large: {size_mib:.0f} MiB, written in {written:.1f} s); "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'measure':42} {'64 samples':>11} {f'{n} samples':>14} {'ratio':>7}  target")
    for name, s, l, target in rows:
        print(f"{name:42} {s * 1000:9.1f}ms {l * 1000:12.1f}ms {l / s:7.2f}  {target}")
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}".strip(),
        "samples": n, "rounds": 6, "layers": a.layers, "file_mib": round(size_mib, 1), "load_average": load,
        "cpus": os.cpu_count(),
        "small": {**res_small, "cold_start_s": cold_small}, "large": {**res_large, "cold_start_s": cold_large},
        "ratios_large_over_small": {name: l / s for name, s, l, _ in rows},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

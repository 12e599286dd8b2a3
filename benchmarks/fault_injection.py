"""Fault injection at every write index (the test suite samples a few; this runs them all).

Makes one organism run (12 samples, 3 rounds, 3 batches), then for every k from 1 to the number of
file-changing calls (pwrite/write/fsync/rename) of its writer, SIGKILLs a replay of the writer at
call k, checks what a reader sees, resumes, and compares every array with the uninterrupted run;
then the same for a derived-group write (`probe track`). With ``--workbench-run`` it also kills the
real ``workbench run`` command at every ``--stride``-th call (slow: the model loads each time).

    python benchmarks/fault_injection.py [--stride 1] [--workbench-run]

Prints the failures and a summary, writes ``benchmarks/results/fault_injection.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fault"))

import inject  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--workbench-run", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fault_injection.json"))
    a = p.parse_args()
    from workbench.engine.run import RunConfig, run_protocol

    result: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(dir=ROOT / "artifacts") as tmp:
        tmp = Path(tmp)
        shim = inject.build_shim(tmp)
        if shim is None:
            sys.exit("no C compiler (cc) for the shim")
        reference = tmp / "ref.h5"
        run_protocol(RunConfig(out=reference, limit=12, rounds=3, batch_size=4, device="cpu")).close()

        total = inject.count_events([*inject.REPLAY, str(reference), str(tmp / "count.h5")], shim, tmp)
        failures = []
        for k in range(1, total + 1, a.stride):
            out = tmp / f"w{k}" / "run.h5"
            out.parent.mkdir()
            failures += [f for f in [inject.kill_then_resume(reference, out, shim, k)] if f]
            shutil.rmtree(out.parent)
        result["writer"] = {"calls": total, "killed": len(range(1, total + 1, a.stride)), "failures": failures}

        shutil.copy(reference, tmp / "count-track.h5")
        total = inject.count_events([*inject.REPLAY, "--track", str(tmp / "count-track.h5")], shim, tmp)
        failures = []
        for k in range(1, total + 1, a.stride):
            run_file = tmp / f"t{k}" / "run.h5"
            run_file.parent.mkdir()
            shutil.copy(reference, run_file)
            failures += [f for f in [inject.kill_track(run_file, shim, k)] if f]
            shutil.rmtree(run_file.parent)
        result["derived group"] = {"calls": total, "killed": len(range(1, total + 1, a.stride)), "failures": failures}

        if a.workbench_run:
            args = [sys.executable, "-m", "workbench", "run", "--limit", "12", "--rounds", "3", "--batch-size", "4", "--device", "cpu"]
            total = inject.count_events([*args, "--out", str(tmp / "count-run.h5")], shim, tmp)
            failures = []
            for k in range(1, total + 1, a.stride):
                out = tmp / f"r{k}" / "run.h5"
                out.parent.mkdir()
                inject.run([*args, "--out", str(out)], shim, kill_at=k)
                resumed = inject.run([*args, "--out", str(out), "--resume"])
                bad = inject.differences(inject.datasets(reference), inject.datasets(out)) if resumed.returncode == 0 else [resumed.stderr[-200:]]
                if bad:
                    failures.append(f"k={k}: {bad}")
                shutil.rmtree(out.parent)
            result["workbench run"] = {"calls": total, "killed": len(range(1, total + 1, a.stride)), "failures": failures}

    for what, r in result.items():
        for f in r["failures"]:
            print(f"{what}: {f}")
        print(f"{what}: {r['calls']} file-changing calls, killed at {r['killed']}, {len(r['failures'])} failures")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

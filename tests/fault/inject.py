"""Kill a command at its k-th file-changing call (``killshim.c`` through ``LD_PRELOAD``) and
compare run files. Used by ``tests/test_crash_safety.py`` (sampled indices) and
``benchmarks/fault_injection.py`` (every index)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REPLAY = [sys.executable, str(HERE / "replay.py")]


def build_shim(folder: Path) -> Path | None:
    """Compile the shim with ``cc``; None when no C compiler is installed."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = folder / "killshim.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(HERE / "killshim.c"), "-ldl"], check=True, capture_output=True)
    return out


def run(cmd: list[str], shim: Path | None = None, kill_at: int | None = None, count_to: Path | None = None,
        timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if shim is not None:
        env["LD_PRELOAD"] = str(shim)
        if kill_at is not None:
            env["KILL_AT"] = str(kill_at)
        if count_to is not None:
            env["COUNT_TO"] = str(count_to)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, **kwargs)


def count_events(cmd: list[str], shim: Path, folder: Path) -> int:
    """How many file-changing calls ``cmd`` makes when nothing kills it."""
    counter = folder / "count"
    done = run(cmd, shim, count_to=counter)
    assert done.returncode == 0, done.stderr
    return int(counter.read_text())


def datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file, read whole."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


def differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Names of the datasets that differ (or exist in one only)."""
    bad = sorted(set(a) ^ set(b))
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.dtype == object or y.dtype == object:
            same = x.shape == y.shape and [np.asarray(v).tolist() for v in x.ravel()] == [np.asarray(v).tolist() for v in y.ravel()]
        else:
            same = x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
        if not same:
            bad.append(name)
    return bad


def kill_then_resume(reference: Path, out: Path, shim: Path, k: int, args: tuple[str, ...] = ()) -> str | None:
    """Replay the writer into ``out`` (with replay.py's ``args``) killed at call ``k``, check what
    a reader sees (every batch whose ``write_batch`` had returned is done, and its rows are right),
    resume; None when the result equals the reference, else what went wrong."""
    from workbench.errors import WorkbenchError
    from workbench.store.reader import RunFile

    killed = run([*REPLAY, str(reference), str(out), *args], shim, kill_at=k)
    if killed.returncode not in (-signal.SIGKILL, 0):
        return f"k={k}: the killed writer failed: {killed.stderr.strip()[-300:]}"
    ref = datasets(reference)
    returned = [tuple(map(int, line.split()[1:])) for line in killed.stdout.splitlines() if line.startswith("wrote ")]
    try:
        with RunFile(out) as run_file:
            done = run_file.done
            lost = [(a, b) for a, b in returned if not done[a:b].all()]
            if lost:
                return f"k={k}: batches whose write_batch had returned were lost: {lost}"
            for name in ("rounds/correct", "tokens/response_token_ids", "transcripts/token_ids", "activations/hook_resid_post"):
                got = run_file.array(name)
                want = ref[name][done]
                if differences({name: got}, {name: want}):
                    return f"k={k}: a reader of the killed run sees a wrong {name}"
    except WorkbenchError as e:
        if "not found" not in str(e) or returned:
            return f"k={k}: the killed run cannot be read: {e}"
    resumed = run([*REPLAY, str(reference), str(out), "--resume", *args])
    if resumed.returncode != 0:
        return f"k={k}: --resume failed: {resumed.stderr.strip()[-300:]}"
    bad = differences(ref, datasets(out))
    return f"k={k}: after --resume these differ: {bad}" if bad else None


def kill_track(run_file: Path, shim: Path, k: int) -> str | None:
    """Kill a derived-results write at call ``k``: the run must be unchanged or have the whole new group."""
    before = datasets(run_file)
    killed = run([*REPLAY, "--track", str(run_file)], shim, kill_at=k)
    if killed.returncode not in (-signal.SIGKILL, 0):
        return f"k={k}: the killed track failed: {killed.stderr.strip()[-300:]}"
    try:
        after = datasets(run_file)
    except OSError as e:
        return f"k={k}: the run file became unreadable: {e}"
    added = {n: v for n, v in after.items() if n.startswith("probes/fault/")}
    rest = {n: v for n, v in after.items() if not n.startswith("probes/fault/")}
    if differences(before, rest):
        return f"k={k}: the run's other datasets changed: {differences(before, rest)}"
    if added and sorted(added) != ["probes/fault/cosine", "probes/fault/projection"]:
        return f"k={k}: a partial group was left: {sorted(added)}"
    leftovers = [p.name for p in run_file.parent.iterdir() if p.name.startswith(run_file.name + ".") and not p.name.endswith(".lock")]
    return f"k={k}: left behind {leftovers}" if leftovers and killed.returncode == 0 else None

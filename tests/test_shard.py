"""Data-parallel runs (DESIGN §10, docs/FORMAT.md "Shards and merge"): shards by --shard or under
torchrun, merged into one run file whose every array equals a single-process run's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from probe_files import write_probe

sys.path.insert(0, str(Path(__file__).parent / "fault"))

import inject  # noqa: E402

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.store.shard import parse_shard, plan_rows, resolve_shard, shard_path  # noqa: E402
from workbench.store.reader import RunFile  # noqa: E402
from cli_support import error_line, stop_at_line, workbench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARGS = ["--limit", "24", "--rounds", "3", "--batch-size", "4", "--device", "cpu"]  # 6 batches: 3 per shard of 2


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def shard_cmd(out: Path, shard: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "workbench", "run", *ARGS, "--out", str(out), "--shard", shard, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, organism) -> Path:
    """A single-process organism run of the 24 samples the sharded runs split."""
    from workbench.engine.run import RunConfig, run_protocol

    out = tmp_path_factory.mktemp("reference") / "ref.h5"
    run_protocol(RunConfig(out=out, limit=24, rounds=3, batch_size=4, device="cpu"), model=organism).close()
    return out


def small_shard(organism, out: Path, shard: str) -> None:
    """Shard ``shard`` of a small run in-process (8 samples, one round): 2 batches of 4."""
    from workbench.engine.run import RunConfig, run_protocol

    run_protocol(RunConfig(out=out, limit=8, rounds=1, batch_size=4, device="cpu", shard=shard), model=organism).close()


def same_arrays(a: Path, b: Path) -> list[str]:
    """Names of the datasets that differ between two run files (every group, activations included)."""
    return inject.differences(inject.datasets(a), inject.datasets(b))


def test_plan_is_contiguous_batch_aligned_and_covers_every_sample():
    for n, batch, count in [(24, 4, 2), (25, 4, 3), (7, 2, 4), (100, 16, 7), (5, 5, 1), (9, 1, 9)]:
        rows = plan_rows(n, batch, count)
        assert len(rows) == count and rows[0][0] == 0 and rows[-1][1] == n
        assert all(a < b for a, b in rows) and all(rows[i][1] == rows[i + 1][0] for i in range(count - 1))
        assert all(a % batch == 0 for a, _ in rows)
        batches = [-(-(b - a) // batch) for a, b in rows]
        assert max(batches) - min(batches) <= 1, (n, batch, count, rows)
    with pytest.raises(WorkbenchError, match="only 6 batches"):
        plan_rows(24, 4, 7)


def test_shard_comes_from_the_option_or_the_launcher():
    assert parse_shard("3/8") == (3, 8) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad, needle in [("8/8", "counts from 0"), ("x", "takes K/N"), ("1/0", "≥ 1"), ("-1/2", "takes K/N")]:
        with pytest.raises(WorkbenchError, match=needle):
            parse_shard(bad)
    assert resolve_shard(None, {}) is None
    assert resolve_shard(None, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None  # one rank: an ordinary run
    spec = resolve_shard(None, {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (spec.index, spec.count, spec.local_rank, spec.launcher) == (3, 4, 1, True)
    spec = resolve_shard("1/2", {})
    assert (spec.index, spec.count, spec.launcher) == (1, 2, False)
    with pytest.raises(WorkbenchError, match="launcher already gives"):
        resolve_shard("1/2", {"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(WorkbenchError, match="RANK=2 is not below WORLD_SIZE=2"):
        resolve_shard(None, {"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(WorkbenchError, match="not an integer"):
        resolve_shard(None, {"RANK": "a", "WORLD_SIZE": "2"})
    assert shard_path(Path("runs/age.h5"), 3, 8) == Path("runs/age.h5.shards/shard-003-of-008.h5")


def test_under_a_launcher_only_rank_0_draws_progress_and_logs_name_the_rank(monkeypatch, capsys):
    """torchrun's ranks share one terminal: rank 0 draws the bar (saying it is rank 0 of N) and the
    loading spinner, the others draw nothing; in a log (no terminal) every rank writes its lines,
    each prefixed with its rank. Checked on a real rich console writing to a buffer."""
    import io

    from rich.console import Console

    from workbench import cli
    from workbench.engine.run import Progress

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    calls = [Progress(0, 12, 3, 0), Progress(0, 12, 3, 20, batch_samples=4, batch_rounds=1), Progress(4, 12, 3, 60)]

    def drawn(rank: str, terminal: bool) -> str:
        monkeypatch.setenv("RANK", rank)
        screen = io.StringIO()
        monkeypatch.setattr(cli, "err", Console(file=screen, force_terminal=terminal, width=100))
        with cli._ProgressReporter(cli._launched_rank(None)) as reporter:
            reporter.status("loading organism")
            for p in calls:
                reporter.update(p)
        return screen.getvalue()

    assert "rank 0 of 2: samples × rounds" in drawn("0", terminal=True)
    assert drawn("1", terminal=True) == ""
    lines = drawn("1", terminal=False).splitlines()  # in a log: plain lines, on the reporter's console (stderr)
    assert lines == ["rank 1/2: starting at: 0/12 samples (0 tok/s)", lines[1]] and lines[1].startswith("rank 1/2: batch done: 4/12 samples")
    monkeypatch.delenv("WORLD_SIZE")
    assert cli._launched_rank(None) is None  # one process: no rank, no prefix


@pytest.mark.parametrize("shard, needle", [("2/2", "0/2 … 1/2"), ("one", "takes K/N"), ("0/7", "only 6 batches")])
def test_bad_shard_is_one_line_before_the_model_loads(capsys, monkeypatch, tmp_path, shard, needle):
    from workbench.engine import models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the shard was checked")

    monkeypatch.setattr(models, "load_model", no_model)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = workbench(capsys, monkeypatch, "run", *ARGS, "--out", str(tmp_path / "o.h5"), "--shard", shard)
    assert code == 2
    error_line(err, needle)
    assert not (tmp_path / "o.h5.shards").exists()


def test_a_sharded_run_refuses_to_merge_over_a_single_process_run(capsys, monkeypatch, tmp_path, reference):
    out = tmp_path / "ref.h5"
    shutil.copyfile(reference, out)
    code, _, err = workbench(capsys, monkeypatch, "run", *ARGS, "--out", str(out), "--shard", "0/2")
    assert code == 2
    error_line(err, "is not a merge of its shards", "--overwrite")
    assert not (tmp_path / "ref.h5.shards").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_merge_to_the_single_process_run(capsys, monkeypatch, tmp_path, reference):
    out = tmp_path / "runs" / "t.h5"
    done = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "workbench", "run",
                           *ARGS, "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT, env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(f"merged 2 shards (24 samples) into {out}") == 1  # exactly one rank merged
    # the other rank either found its partner still running, or (both done before either looked) found the merge done
    assert "waiting for the other shards" in done.stderr or "already merges these 2 shards" in done.stderr, done.stderr[-3000:]
    assert same_arrays(reference, out) == []
    with h5py.File(shard_path(out, 1, 2), "r") as f:
        plan = json.loads(f.attrs["shard"])
        assert plan["rows"] == [[0, 12], [12, 24]] and plan["n_samples"] == 24 and f.attrs["n_samples"] == 12
        assert f["samples/index"][...].tolist() == list(range(12, 24))
    with h5py.File(out, "r") as f:
        assert f["activations/hook_resid_post"].is_virtual
        assert f.attrs["status"] == "complete" and f.attrs["n_samples"] == 24 and "shard" not in f.attrs
        merged_from = json.loads(f.attrs["merged_from"])
        assert [s["file"] for s in merged_from["shards"]] == ["t.h5.shards/shard-000-of-002.h5", "t.h5.shards/shard-001-of-002.h5"]
        with h5py.File(reference, "r") as r:
            assert {k for k in r.attrs if k not in ("created", "finished", "run_id", "command_line")} <= set(f.attrs)
            assert f.attrs["data"] == r.attrs["data"] and f.attrs["protocol"] == r.attrs["protocol"]

    # moved elsewhere with its shards (relative paths), read from another working directory
    moved = tmp_path / "elsewhere"
    shutil.move(out.parent, moved)
    monkeypatch.chdir(tmp_path)
    out = moved / "t.h5"
    assert same_arrays(reference, out) == []
    with RunFile(out) as run, RunFile(reference) as ref:
        assert np.array_equal(run.array("activations/hook_resid_post", [1, 13, 20]), ref.array("activations/hook_resid_post", [1, 13, 20]))
        assert run.array("rounds/correct").shape == (24, 3)
    code, stdout, err = workbench(capsys, monkeypatch, "info", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["n_done"] == 24

    # probe track rewrites the file (copy + rename): the activations stay virtual and score as the reference's
    probe = write_probe(tmp_path / "p.h5", n_layers=4, d_model=64)
    ref_copy = tmp_path / "ref.h5"
    shutil.copyfile(reference, ref_copy)
    for run_path in (out, ref_copy):
        code, _, err = workbench(capsys, monkeypatch, "probe", "track", str(run_path), str(probe), "--name", "p")
        assert code == 0, err
    assert same_arrays(ref_copy, out) == []
    with h5py.File(out, "r") as f:
        assert f["activations/hook_resid_post"].is_virtual and np.isfinite(f["probes/p/cosine"][...]).all()

    # --copy: self-contained, equal, the tracked probe kept; the shards can then go
    code, stdout, err = workbench(capsys, monkeypatch, "merge", str(out), "--copy")
    assert code == 0, err
    assert "activations copied" in stdout
    shutil.rmtree(moved / "t.h5.shards")
    assert same_arrays(ref_copy, out) == []
    with h5py.File(out, "r") as f:
        assert not f["activations/hook_resid_post"].is_virtual and f["activations/hook_resid_post"].chunks == (1, 3, 2, 4, 64)


def test_a_virtual_merge_without_its_shards_is_refused_in_one_line(capsys, monkeypatch, tmp_path, organism):
    """HDF5 reads a missing source as the fill value, in silence: RunFile refuses instead."""
    out = tmp_path / "v.h5"
    for k in range(2):
        small_shard(organism, out, f"{k}/2")
    with RunFile(out) as run:
        assert run.array("activations/hook_resid_post").shape == (8, 1, 2, 4, 64)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(out, alone / "v.h5")
    code, _, err = workbench(capsys, monkeypatch, "info", str(alone / "v.h5"))
    assert code == 2
    error_line(err, "v.h5.shards/shard-000-of-002.h5", "missing", "--copy")


@pytest.mark.slow
def test_shard_by_hand_killed_resumed_and_merged(capsys, monkeypatch, tmp_path, reference, organism):
    out = tmp_path / "h.h5"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = workbench(capsys, monkeypatch, "merge", str(out))
    assert code == 2
    error_line(err, "h.h5.shards does not exist")

    first = subprocess.run(shard_cmd(out, "0/2"), capture_output=True, text=True, timeout=600, cwd=ROOT, env=clean_env())
    assert first.returncode == 0, first.stderr
    assert "shard 0/2 done" in first.stderr and "1 is missing" in first.stderr and not out.exists()
    code, _, err = workbench(capsys, monkeypatch, "merge", str(out))
    assert code == 2
    error_line(err, "of 2 shards, 1 is missing")
    code, _, err = workbench(capsys, monkeypatch, "info", str(out))
    assert code == 2
    error_line(err, "is not merged yet", "h.h5.shards")

    # stopped at its first batch's progress line (read from the program, never timed): still running
    # for merge, then killed there, unfinished
    parts = shard_path(out, 1, 2).with_name("shard-001-of-002.h5.parts")
    second = stop_at_line(shard_cmd(out, "1/2"), "batch done: 4/12", cwd=ROOT, env=clean_env())
    try:
        code, _, err = workbench(capsys, monkeypatch, "merge", str(out))
        assert code == 2
        error_line(err, f"1 (pid {second.pid}) is still running")
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait(60)
    assert second.returncode == -signal.SIGKILL
    assert not shard_path(out, 1, 2).exists() and list(parts.glob("batch-*.part"))
    code, _, err = workbench(capsys, monkeypatch, "merge", str(out))
    assert code == 2
    error_line(err, "1 is unfinished", "--resume")

    resumed = subprocess.run(shard_cmd(out, "1/2", "--resume"), capture_output=True, text=True, timeout=600, cwd=ROOT, env=clean_env())
    assert resumed.returncode == 0, resumed.stderr
    assert f"merged 2 shards (24 samples) into {out}" in resumed.stderr
    assert same_arrays(reference, out) == []
    code, stdout, err = workbench(capsys, monkeypatch, "merge", str(out))
    assert code == 0 and "already merges these 2 shards" in stdout, err
    probe = write_probe(tmp_path / "p.h5", n_layers=4, d_model=64)
    code, _, err = workbench(capsys, monkeypatch, "probe", "track", str(shard_path(out, 0, 2)), str(probe), "--name", "p")
    assert code == 0, err
    code, stdout, err = workbench(capsys, monkeypatch, "merge", str(out), "--copy")
    assert code == 0, err
    assert "shard 0's probes/ not merged" in stdout
    assert same_arrays(reference, out) == []  # probes/ of a shard stays out of the merged file

    # a shard of another run (fewer samples, one round) in its place is refused, naming it
    other = tmp_path / "other.h5"
    small_shard(organism, other, "1/2")
    kept = tmp_path / "kept.h5"
    shutil.move(shard_path(out, 1, 2), kept)
    shutil.copyfile(shard_path(other, 1, 2), shard_path(out, 1, 2))
    code, _, err = workbench(capsys, monkeypatch, "merge", str(out))
    assert code == 2
    error_line(err, "shard 1", "from another run", "shard plan differs")
    shutil.copyfile(kept, shard_path(out, 1, 2))
    with h5py.File(shard_path(out, 1, 2), "r+") as f:  # the same plan but another seed: every setting is compared
        f.attrs["seed"] = 7
    code, _, err = workbench(capsys, monkeypatch, "merge", str(out))
    assert code == 2
    error_line(err, "shard 1", "from another run", "its seed differs")
    shutil.move(kept, shard_path(out, 1, 2))
    (shard_path(out, 0, 3)).write_bytes(b"")
    code, _, err = workbench(capsys, monkeypatch, "merge", str(out))
    assert code == 2
    error_line(err, "different numbers of shards", "remove the stale ones")


def _write(out: Path, rows: range, n_options: int, shard: dict | None) -> None:
    """Rows ``rows`` of a synthetic 4-sample run through the real writer (batches of 2): samples 0-1
    have two options, 2-3 three; ``option_probs`` is padded to ``n_options`` as the engine pads."""
    from workbench.store.header import SampleTable
    from workbench.store.writer import RunWriter

    options = [("a", "b"), ("a", "b"), ("a", "b", "c"), ("a", "b", "c")]
    rng = np.random.default_rng(0)
    probs = np.full((4, 2, 3), np.nan, dtype=np.float32)
    for i, o in enumerate(options):
        probs[i, :, : len(o)] = rng.dirichlet(np.ones(len(o)), size=2)
    acts = rng.standard_normal((4, 2, 2, 2, 3)).astype(np.float32)
    settings = {"task": "synthetic", "seed": 0, "batch_size": 2, "layers": [0, 1], "hooks": ["hook_resid_post"],
                "n_samples": len(rows), "n_rounds": 2, **({"shard": shard} if shard else {})}
    table = SampleTable(index=list(rows), id=[f"s{i}" for i in rows], context=["c"] * len(rows), question=["q"] * len(rows),
                        options=[options[i] for i in rows], gold=[0] * len(rows), category=[""] * len(rows),
                        condition=[""] * len(rows), extra=["{}"] * len(rows))
    with RunWriter.create(out, settings, table, 2, {"hook_resid_post": (2, 3)}) as writer:
        for start in range(rows.start, rows.stop, 2):
            batch = range(start, start + 2)
            arrays = {"instruction": [["u1", "u2"] for _ in batch], "response": [[f"r{i}", "x"] for i in batch],
                      "response_token_ids": [[[i, 1], [2]] for i in batch], "token_entropy": [[[0.5], [0.1, 0.2]] for _ in batch],
                      "option_probs": probs[start : start + 2, :, :n_options]}
            writer.write_batch(start - rows.start, arrays, {"hook_resid_post": acts[start : start + 2]}, [[1, 2, i] for i in batch])
        writer.finish()


def test_options_are_padded_to_the_widest_shard(tmp_path):
    """A shard whose samples have fewer options has a narrower K; the merge pads it as one process pads."""
    from workbench.store.merge import merge_run

    single = tmp_path / "single.h5"
    _write(single, range(0, 4), 3, None)
    out = tmp_path / "m.h5"
    plan = {"count": 2, "batch_size": 2, "n_samples": 4, "fingerprint": "f", "rows": [[0, 2], [2, 4]]}
    _write(shard_path(out, 0, 2), range(0, 2), 2, {**plan, "index": 0})
    _write(shard_path(out, 1, 2), range(2, 4), 3, {**plan, "index": 1})
    with h5py.File(shard_path(out, 0, 2), "r") as f:
        assert f.attrs["n_options"] == 2 and f["rounds/option_probs"].shape == (2, 2, 2)
    result = merge_run(out)
    assert result.action == "merged" and result.n_samples == 4
    assert same_arrays(single, out) == []
    with h5py.File(out, "r") as f:
        assert f.attrs["n_options"] == 3 and f["samples/options"].asstr()[0].tolist() == ["a", "b", ""]


def test_rewriting_a_merge_keeps_derived_groups_only_for_the_same_shards(tmp_path):
    from workbench.store.merge import merge_run
    from workbench.store.groups import replace_group

    out = tmp_path / "m.h5"
    plan = {"count": 2, "batch_size": 2, "n_samples": 4, "fingerprint": "f", "rows": [[0, 2], [2, 4]]}
    for k, rows in enumerate((range(0, 2), range(2, 4))):
        _write(shard_path(out, k, 2), rows, 2 + k, {**plan, "index": k})  # shard 0's samples have two options
    assert merge_run(out).action == "merged"
    replace_group(out, "probes/p", {"cosine": np.ones((4, 2, 2), np.float32)}, {"kind": "probe"})
    assert merge_run(out).action == "up to date"
    copied = merge_run(out, copy=True)
    assert copied.action == "merged" and not copied.virtual
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["probes/p/cosine"][...], np.ones((4, 2, 2))) and not f["activations/hook_resid_post"].is_virtual
    os.unlink(shard_path(out, 1, 2))
    _write(shard_path(out, 1, 2), range(2, 4), 3, {**plan, "index": 1})  # shard 1 written again: a new run id
    again = merge_run(out)
    assert again.action == "merged" and "dropped probes/ of the old m.h5" in again.message
    with h5py.File(out, "r") as f:
        assert "probes" not in f and f["activations/hook_resid_post"].is_virtual

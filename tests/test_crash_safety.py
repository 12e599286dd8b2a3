"""Crash-safe run storage (docs/FORMAT.md, "How a run is written"): a SIGKILL at any write, a full
disk, or a second writer never loses or damages anything finished, and a running run can be read.

The kill tests replay a real organism run's writer calls (``tests/fault/replay.py``) under an
``LD_PRELOAD`` shim that SIGKILLs the process at its k-th pwrite/write/fsync/rename, at sampled k;
``benchmarks/fault_injection.py`` runs every k, and ``workbench run`` itself.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fault"))

import inject  # noqa: E402

from workbench.store import activations, durability  # noqa: E402
from workbench.store import writer as writer_module  # noqa: E402
from workbench.store.format import ACTIVATIONS  # noqa: E402
from workbench.store.format import parts_dir  # noqa: E402
from workbench.store.reader import RunFile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_ARGS = ["--limit", "12", "--rounds", "3", "--batch-size", "4", "--device", "cpu"]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=600, cwd=ROOT, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted organism run: 12 samples, 3 rounds, 3 batches (the same settings as RUN_ARGS)."""
    from workbench.engine.run import RunConfig, run_protocol

    out = tmp_path_factory.mktemp("reference") / "ref.h5"
    run_protocol(RunConfig(out=out, limit=12, rounds=3, batch_size=4, device="cpu")).close()
    return out


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    built = inject.build_shim(tmp_path_factory.mktemp("shim"))
    if built is None:
        pytest.skip("no C compiler for the fault-injection shim")
    return built


def sampled(total: int, n: int) -> list[int]:
    """``n`` kill indices spread over ``1..total``, always including the first two and the last two."""
    return sorted({1, 2, total - 1, total, *np.linspace(3, total - 2, max(n - 4, 1)).round().astype(int).tolist()})


def wait_paused(writer: subprocess.Popen) -> list[str]:
    """The replay's ``wrote START STOP`` lines up to its ``paused``."""
    lines = []
    for line in writer.stdout:
        if line.strip() == "paused":
            return lines
        lines.append(line.strip())
    raise AssertionError(f"the writer ended before pausing: {lines}")


def test_kill_at_sampled_writes_then_resume_is_identical(reference, shim, tmp_path):
    total = inject.count_events([*inject.REPLAY, str(reference), str(tmp_path / "count.h5")], shim, tmp_path)
    assert total > 50  # creation, three batches and the assembly each make several
    failures = []
    for k in sampled(total, 10):
        out = tmp_path / f"k{k}" / "run.h5"
        out.parent.mkdir()
        failures.append(inject.kill_then_resume(reference, out, shim, k))
        assert not parts_dir(out).exists() and out.exists()
    assert [f for f in failures if f] == []


def test_kill_during_probe_track_leaves_the_run_whole(reference, shim, tmp_path):
    count = tmp_path / "count.h5"
    shutil.copy(reference, count)
    total = inject.count_events([*inject.REPLAY, "--track", str(count)], shim, tmp_path)
    failures = []
    for k in sampled(total, 8):
        run_file = tmp_path / f"k{k}" / "run.h5"
        run_file.parent.mkdir()
        shutil.copy(reference, run_file)
        failures.append(inject.kill_track(run_file, shim, k))
    assert [f for f in failures if f] == []
    with RunFile(count) as run:  # the uninterrupted one has the group, complete
        assert run.array("probes/fault/cosine").shape == (12, 3, 2)
        assert json.loads(run.f["probes/fault"].attrs["layers"]) == [0, 1]


@pytest.mark.slow
def test_a_running_run_can_be_read_and_a_second_writer_is_refused(reference, tmp_path):
    out = tmp_path / "run.h5"
    writer = subprocess.Popen([*inject.REPLAY, str(reference), str(out), "--pause-after", "1"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_paused(writer)
        info = cli("info", str(out), "--json")
        assert info.returncode == 0, info.stderr
        data = json.loads(info.stdout)
        assert (data["status"], data["n_done"], data["n_samples"]) == ("running", 4, 12)
        with RunFile(out) as run:
            assert run.running
            np.testing.assert_array_equal(run.array("activations/hook_resid_post"),
                                          h5py.File(reference)["activations/hook_resid_post"][:4])
        for extra in ([], ["--overwrite"], ["--resume"]):
            second = cli("run", *RUN_ARGS, "--out", str(out), *extra)
            assert second.returncode == 2, second.stderr
            assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
            assert "being written by another process" in second.stderr and "it is running" in second.stderr  # never "use --resume"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    resumed = inject.run([*inject.REPLAY, str(reference), str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert inject.differences(inject.datasets(reference), inject.datasets(out)) == []


def test_a_kill_right_after_write_batch_returns_loses_nothing(reference, tmp_path):
    """A SIGKILL the moment write_batch returned for batch 2 keeps both finished batches: a reader
    sees exactly the reference's rows 0-7, --resume computes only batch 3, and the result equals the
    uninterrupted run. What the parts folder holds at the kill depends on timing (batch 1's durable
    commit runs in a thread, batch 2 is usually provisional, a slow machine may have built both into
    the run), so the test asserts the guarantee, never the files."""
    out = tmp_path / "run.h5"
    writer = subprocess.Popen([*inject.REPLAY, str(reference), str(out), "--pause-after", "2"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert wait_paused(writer) == ["wrote 0 4", "wrote 4 8"]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    with h5py.File(reference, "r") as ref, RunFile(out) as run:
        assert run.running and run.done.tolist() == [True] * 8 + [False] * 4
        np.testing.assert_array_equal(run.array("activations/hook_resid_post"), ref["activations/hook_resid_post"][:8])
        assert inject.differences({"t": run.array("transcripts/token_ids")}, {"t": ref["transcripts/token_ids"][:8]}) == []
    resumed = inject.run([*inject.REPLAY, str(reference), str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert [line for line in resumed.stdout.splitlines() if line.startswith("wrote")] == ["wrote 8 12"]
    assert inject.differences(inject.datasets(reference), inject.datasets(out)) == []
    assert not parts_dir(out).exists()


def test_the_built_record_is_trusted_only_when_whole(tmp_path, monkeypatch):
    """``built.json`` is rewritten in place: a kill after any of its writes but the last leaves a
    record that does not parse (so the next writer rebuilds), never a wrong list of rows."""
    activations.write_built(tmp_path, [(0, 4)], durable=True)
    assert activations.read_built(tmp_path) == [(0, 4)]
    activations.distrust_built(tmp_path)
    assert activations.read_built(tmp_path) is None  # what a kill during the build's HDF5 writes leaves
    activations.write_built(tmp_path, [(0, 4), (8, 12)], durable=False)
    assert activations.read_built(tmp_path) == [(0, 4), (8, 12)]
    activations.write_built(tmp_path, [(0, 12)], durable=False)  # shorter than the text it overwrites
    assert activations.read_built(tmp_path) == [(0, 12)]
    real, calls = activations.pwrite_all, []

    def killed_before_the_brace(fd, data, offset):
        calls.append(bytes(data))
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for the kill: the first write landed, the second did not
        real(fd, data, offset)

    monkeypatch.setattr(activations, "pwrite_all", killed_before_the_brace)
    with pytest.raises(KeyboardInterrupt):
        activations.write_built(tmp_path, [(0, 16)], durable=False)
    assert calls[1] == b"{" and activations.read_built(tmp_path) is None
    monkeypatch.setattr(activations, "pwrite_all", real)
    activations.write_built(tmp_path, [(0, 16)], durable=False)
    assert activations.read_built(tmp_path) == [(0, 16)]
    restarted(monkeypatch, tmp_path)  # after a restart a provisional record counts for nothing
    assert activations.read_built(tmp_path) is None


def restarted(monkeypatch, tmp_path) -> None:
    """Make the store see another boot id, as after the machine restarted."""
    other = tmp_path / "boot_id"
    other.write_text("0" * 32 + "\n")
    monkeypatch.setattr(durability, "BOOT_ID_FILE", other)


def test_after_a_restart_only_durable_parts_count(reference, tmp_path, monkeypatch):
    """A power cut may lose a provisional part's activation bytes (they were never fsynced): once
    the boot id has changed, readers count exactly the rows of durable parts, ignore the provisional
    ones, and --resume recomputes those. Which batches were durable at the kill depends on timing
    (batch 1's commit runs in a thread; a slow machine may not have finished it, or may have
    committed batch 2 as well), so the test reads that from the parts and asserts the guarantee; the
    lost bytes are simulated by zeroing the rows of every batch that was not durable."""
    from workbench.store.parts import all_batch_parts

    out = tmp_path / "run.h5"
    writer = subprocess.Popen([*inject.REPLAY, str(reference), str(out), "--pause-after", "2"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_paused(writer)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    folder = parts_dir(out)
    durable = np.zeros(12, dtype=bool)
    for start, stop, boot, _ in all_batch_parts(folder):
        durable[start:stop] |= boot is None
    (slot,) = activations.read_layout(folder)
    with open(folder / ACTIVATIONS, "r+b") as fh:
        for start in (0, 4):
            if not durable[start:start + 4].all():
                activations.write_slot_rows(fh.fileno(), slot, start, np.zeros((4, *slot.shape[1:]), dtype=slot.dtype))
    restarted(monkeypatch, tmp_path)  # the machine has restarted
    with RunFile(out) as run:
        assert run.done.tolist() == durable.tolist()
    import replay

    replay.replay(reference, out, resume=True, pause_after=None)
    assert inject.differences(inject.datasets(reference), inject.datasets(out)) == []


@pytest.mark.slow
def test_no_fsync_never_waits_for_the_disk_and_survives_a_kill(reference, shim, tmp_path, monkeypatch):
    """--no-fsync: no fsync and no writeback request from the first batch to the finished file
    (the creation fsyncs its files as always); a SIGKILL at sampled writes, then --resume, still
    gives an identical run; after a restart none of its batches count and --resume recomputes them."""
    import replay

    calls = {"fsync": 0, "writeback": 0}
    real_fsync, real_writeback = os.fsync, writer_module.start_writeback

    def fsync(fd):
        calls["fsync"] += 1
        real_fsync(fd)

    def writeback(*args):
        calls["writeback"] += 1
        real_writeback(*args)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(writer_module, "start_writeback", writeback)
    with h5py.File(reference) as ref, replay.create_like(ref, tmp_path / "created.h5", durable=False):
        at_creation = dict(calls)
    for durable in (True, False):
        before = dict(calls)
        replay.replay(reference, tmp_path / f"durable-{durable}.h5", resume=False, pause_after=None, durable=durable)
        spent = {key: calls[key] - before[key] - at_creation[key] for key in calls}
        if durable:
            assert spent["fsync"] >= 2 and spent["writeback"] == 3, spent  # a commit and the finish; every batch
        else:
            assert spent == {"fsync": 0, "writeback": 0}, spent
        assert inject.differences(inject.datasets(reference), inject.datasets(tmp_path / f"durable-{durable}.h5")) == []
    monkeypatch.undo()

    total = inject.count_events([*inject.REPLAY, str(reference), str(tmp_path / "count.h5"), "--no-fsync"], shim, tmp_path)
    failures = []
    for k in sampled(total, 6):
        out = tmp_path / f"k{k}" / "run.h5"
        out.parent.mkdir()
        failures.append(inject.kill_then_resume(reference, out, shim, k, ("--no-fsync",)))
    assert [f for f in failures if f] == []

    out = tmp_path / "restart" / "run.h5"
    out.parent.mkdir()
    writer = subprocess.Popen([*inject.REPLAY, str(reference), str(out), "--pause-after", "2", "--no-fsync"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_paused(writer)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    with RunFile(out) as run:
        assert run.done.tolist() == [True] * 8 + [False] * 4
    restarted(monkeypatch, tmp_path)  # the machine has restarted
    with RunFile(out) as run:
        assert not run.done.any()
    replay.replay(reference, out, resume=True, pause_after=None, durable=False)
    assert inject.differences(inject.datasets(reference), inject.datasets(out)) == []


@pytest.mark.slow
def test_overwrite_replaces_the_old_run_only_after_its_first_batch(reference, shim, tmp_path):
    out = tmp_path / "run.h5"
    shutil.copy(reference, out)
    before = inject.datasets(out)
    bad = cli("run", *RUN_ARGS, "--out", str(out), "--overwrite", "--layers", "99")
    assert bad.returncode == 2 and "layer" in bad.stderr, bad.stderr
    assert inject.differences(before, inject.datasets(out)) == []
    assert not Path(str(out) + ".parts.new").exists() or not (Path(str(out) + ".parts.new") / "batch-00000000-00000004.part").exists()
    # an --overwrite killed before its first batch is finished leaves the old run as it was
    total = inject.count_events([*inject.REPLAY, str(reference), str(tmp_path / "count.h5")], shim, tmp_path)
    for k in (3, total // 6):
        killed = inject.run([*inject.REPLAY, str(reference), str(out), "--overwrite"], shim, kill_at=k)
        assert killed.returncode == -signal.SIGKILL
        assert inject.differences(before, inject.datasets(out)) == [], k
        with RunFile(out) as run:
            assert not run.running and run.meta["status"] == "complete"
    done = inject.run([*inject.REPLAY, str(reference), str(out), "--overwrite"])
    assert done.returncode == 0, done.stderr
    assert inject.differences(before, inject.datasets(out)) == []


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_disk_full_is_one_line_and_resumable(reference, tmp_path):
    """RLIMIT_FSIZE between the size of the run file to be when it is created and the finished run
    file's: the creation succeeds, writing the batches' rows into it fails; the error is one line,
    the finished batches stay readable, --resume finishes."""
    from replay import create_like

    with h5py.File(reference) as ref, create_like(ref, tmp_path / "size.h5") as writer:
        created = (writer.folder / ACTIVATIONS).stat().st_size
    final = reference.stat().st_size
    assert created < final
    out = tmp_path / "run.h5"
    full = cli("run", *RUN_ARGS, "--out", str(out), preexec_fn=_limit_file_size((created + final) // 2))
    assert full.returncode == 2, full.stderr
    lines = [line for line in full.stderr.strip().splitlines() if not line.startswith(("starting at", "batch done"))]
    assert len(lines) == 1 and "Traceback" not in full.stderr, full.stderr  # progress lines, then one error line
    assert str(out) in lines[0] and "File too large" in lines[0] and "free there" in lines[0] and "--resume" in lines[0]
    with RunFile(out) as run:
        assert run.running and run.done.any()
        done = run.done
        np.testing.assert_array_equal(run.array("rounds/correct"), h5py.File(reference)["rounds/correct"][...][done])
    tiny = inject.run([*inject.REPLAY, str(reference), str(tmp_path / "tiny.h5")], preexec_fn=_limit_file_size(4096))
    assert tiny.returncode == 2 and "creating" in tiny.stderr and "Traceback" not in tiny.stderr, tiny.stderr
    resumed = cli("run", *RUN_ARGS, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not parts_dir(out).exists()
    ref, got = inject.datasets(reference), inject.datasets(out)
    assert inject.differences(ref, got) == []


API_AFTER_A_FULL_DISK = """
import sys
from workbench.errors import WorkbenchError
from workbench.engine.run import RunConfig, run_protocol
try:
    run_protocol(RunConfig(out=sys.argv[1], limit=12, rounds=3, batch_size=4, device="cpu"))
except WorkbenchError as e:
    print("caught:", e)
print("script ends", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("ending, status", [("", 0), ("sys.exit(3)", 3), ("raise ValueError('the script fails')", 1)])
def test_a_script_that_catches_a_full_disk_ends_with_its_own_status(reference, tmp_path, ending, status):
    """From Python, a failed write is a WorkbenchError with the OS's words; the process then ends
    with the status the script gives it (HDF5's exit handler would crash on the file it could not
    close: a segmentation fault, status -11)."""
    from replay import create_like

    with h5py.File(reference) as ref, create_like(ref, tmp_path / "size.h5") as writer:
        created = (writer.folder / ACTIVATIONS).stat().st_size
    limit = (created + reference.stat().st_size) // 2 if ending != "sys.exit(3)" else 4096  # in the batches / at creation
    script = API_AFTER_A_FULL_DISK + ending
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run.h5")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, preexec_fn=_limit_file_size(limit))
    assert done.returncode == status, done.stderr[-2000:]
    (caught,) = [line for line in done.stdout.splitlines() if line.startswith("caught:")]
    assert ("creating" in caught) == (limit == 4096) and "File too large" in caught, caught
    assert "errno" not in caught and "H5" not in caught and "buf =" not in caught, caught  # not HDF5's own report
    assert "script ends" in done.stdout
    assert ("the script fails" in done.stderr) == (status == 1)


def test_the_run_file_as_data(reference, tmp_path):
    """Named dimensions for xarray/h5netcdf on every group but the ragged ones, and RunFile's
    labelled views: to_xarray (done samples) and to_dataframe (one row per sample and round)."""
    import xarray as xr

    run_path = tmp_path / "run.h5"
    shutil.copy(reference, run_path)
    with h5py.File(run_path) as f:
        acts, correct, gold = f["activations/hook_resid_post"][...], f["rounds/correct"][...], f["samples/gold"][...]
    acts_ds = xr.open_dataset(run_path, engine="h5netcdf", group="activations")
    assert acts_ds["hook_resid_post"].dims == ("sample", "round", "position", "layer", "d_model")
    assert acts_ds["position"].values.tolist() == ["last_prompt", "response_mean"]
    layers = json.loads(h5py.File(run_path)["activations/hook_resid_post"].attrs["layers"])
    assert acts_ds["layer"].values.tolist() == layers
    np.testing.assert_array_equal(acts_ds["hook_resid_post"].values, acts)
    acts_ds.close()
    rounds = xr.open_dataset(run_path, engine="h5netcdf", group="rounds")
    assert rounds["option_probs"].dims == ("sample", "round", "option") and rounds["prompt_span"].dims == ("sample", "round", "bound")
    assert not [d for d in rounds.sizes if d.startswith("phony_dim")]
    np.testing.assert_array_equal(rounds["correct"].values, correct)
    rounds.close()
    scores = np.arange(12 * 3 * 2, dtype=np.float32).reshape(12, 3, 2)
    from workbench.store.groups import replace_group

    replace_group(run_path, "probes/p", {"cosine": scores, "projection": -scores},
                  {"kind": "probe", "layers": [1, 3], "best_layer": 3})
    with RunFile(run_path) as run:
        frame = run.to_dataframe()
        assert len(frame) == 36 and frame[["sample", "round"]].values[:4].tolist() == [[0, 1], [0, 2], [0, 3], [1, 1]]  # rounds from 1
        np.testing.assert_array_equal(frame["correct"].values, correct.reshape(-1))
        np.testing.assert_array_equal(frame["gold"].values, np.repeat(gold, 3))
        np.testing.assert_array_equal(frame["concept:p"].values, -scores[:, :, 1].reshape(-1))
        assert {"mean_token_entropy", "option_entropy", "exact_p_fair", "response", "instruction", "id"} <= set(frame.columns)
        data = run.to_xarray()
        assert not [name for name in data.variables if "/" in str(name)]
        assert data["activations_hook_resid_post"].dims == ("sample", "round", "position", "layer", "d_model")
        assert data["probe_p_cosine"].dims == ("sample", "round", "layer")  # the layer axis the activations have
        assert data["layer"].values.tolist() == layers
        np.testing.assert_array_equal(data["probe_p_cosine"].sel(layer=[1, 3]).values, scores)
        assert np.isnan(data["probe_p_cosine"].sel(layer=0).values).all()  # a layer the probe was not fitted on
        np.testing.assert_array_equal(data["activations_hook_resid_post"].values, acts)
        np.testing.assert_array_equal(data["correct"].sel(round=3).values, correct[:, 2])  # round 3 is the third


def test_a_running_run_as_data(reference, tmp_path):
    """The in-memory view of a running run has the same named layout, restricted to done samples."""
    out = tmp_path / "run.h5"
    writer = subprocess.Popen([*inject.REPLAY, str(reference), str(out), "--pause-after", "1"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_paused(writer)
        with RunFile(out) as run:
            assert run.running and run.done.sum() == 4
            frame = run.to_dataframe()
            assert len(frame) == 12 and sorted(set(frame["sample"])) == [0, 1, 2, 3]
            data = run.to_xarray()
            np.testing.assert_array_equal(data["activations_hook_resid_post"].values,
                                          h5py.File(reference)["activations/hook_resid_post"][:4])
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()

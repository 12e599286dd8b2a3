"""The run file: streaming, kill and resume, and the reader's view."""

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
from conftest import BBQ_FIXTURE

from workbench.store.reader import RunFile
from cli_support import error_line, workbench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `workbench` command in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_args(model_dir: Path, out: Path) -> list[str]:
    return ["run", "--model", str(model_dir), "--task", "bbq", "--data", str(BBQ_FIXTURE), "--protocol", "bbq-paper",
            "--rounds", "3", "--batch-size", "1", "--max-new-tokens", "24", "--device", "cpu", "--out", str(out)]


def all_datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[...]
        f.visititems(visit)
    return out


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        if x.dtype == object:
            assert [np.asarray(v).tolist() for v in x.ravel()] == [np.asarray(v).tolist() for v in y.ravel()], name
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, model_dirs):
    model = model_dirs["llama"]
    whole = tmp_path / "whole.h5"
    assert cli(*run_args(model, whole)).returncode == 0

    killed = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-m", "workbench", *run_args(model, killed)], cwd=ROOT,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:  # plain progress lines when stderr is not a terminal
        if line.startswith("batch done: 3/"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with RunFile(killed) as run:
        done = run.done
        # every batch whose write_batch returned (the progress line comes after it) is kept
        assert 3 <= done.sum() < len(done), "the kill must land mid-run, after three finished batches"
        assert run.meta["status"] == "running"
        assert run.array("rounds/correct").shape[0] == done.sum()  # readers see finished samples only

    resumed = cli(*run_args(model, killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    with RunFile(killed) as run:
        assert run.meta["status"] == "complete"
    a, b = all_datasets(whole), all_datasets(killed)
    assert_same(a, b)


@pytest.mark.slow
def test_resume_refuses_other_settings(tmp_path, model_dirs):
    out = tmp_path / "r.h5"
    assert cli(*run_args(model_dirs["llama"], out), "--limit", "2").returncode == 0
    again = cli(*run_args(model_dirs["llama"], out), "--limit", "2", "--rounds", "2", "--resume")
    assert again.returncode == 2
    assert "different n_rounds" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.slow
def test_resume_on_another_device_warns_once_and_finishes(tmp_path):
    """A run started on one device (here: its header says cuda:0, as a GPU machine writes it) and
    resumed on another continues, with one `warning:` line saying so; a resume on the same device,
    or of a finished run, says nothing."""
    import warnings

    from workbench.store.format import HEADER, parts_dir
    from workbench.store.header import SampleTable
    from workbench.store.writer import PlacementChangedWarning, RunWriter

    out = tmp_path / "moved.h5"
    args = ["run", "--model", "organism", "--task", "organism", "--rounds", "2", "--limit", "64", "--batch-size", "4",
            "--device", "cpu", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "workbench", *args], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if line.startswith("batch done: "):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with h5py.File(parts_dir(out) / HEADER, "r+") as header:
        assert header.attrs["device"] == "cpu"
        header.attrs["device"] = "cuda:0"
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    warned = [line for line in resumed.stderr.splitlines() if "warning" in line.lower()]
    assert len(warned) == 1 and warned[0].startswith("warning: --resume:") and "device cuda:0 → cpu" in warned[0], resumed.stderr
    assert "PlacementChangedWarning" not in resumed.stderr
    with RunFile(out) as run:
        assert run.meta["status"] == "complete" and run.done.all()

    n = 4
    samples = SampleTable(index=list(range(n)), id=[str(i) for i in range(n)], context=["c"] * n, question=["q"] * n,
                          options=[("a", "b")] * n, gold=[0] * n, category=[""] * n, condition=[""] * n, extra=["{}"] * n)
    settings = {"layers": [0], "device": "cpu", "device_map": {}}
    path = tmp_path / "api.h5"
    with RunWriter.create(path, settings, samples, 1, {"h": (1, 4)}) as writer:
        writer.write_batch(0, {"correct": np.ones((2, 1), bool)}, {"h": np.zeros((2, 1, 2, 1, 4), np.float32)}, [[1]] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunWriter.resume(path, settings).close()  # the same placement: silent
    with pytest.warns(PlacementChangedWarning, match="device_map {} → {\"model.layers.0\": 0}"):
        RunWriter.resume(path, {**settings, "device_map": {"model.layers.0": 0}}).close()


@pytest.mark.slow
def test_info_json_has_the_per_round_table(tmp_path, model_dirs):
    out = tmp_path / "r.h5"
    made = cli(*run_args(model_dirs["gpt2"], out), "--limit", "3")
    assert made.returncode == 0, made.stderr
    assert "R→W" in made.stdout and "opt H" in made.stdout  # the per-round table printed at the end
    info = cli("info", str(out), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3]
    with RunFile(out) as run:
        correct = run.array("rounds/correct")
        entropy = run.array("rounds/mean_token_entropy")
    for t, row in enumerate(data["rounds"]):
        assert row["accuracy"] == pytest.approx(correct[:, t].mean())
        assert row["mean_token_entropy"] == pytest.approx(float(entropy[:, t].mean()), rel=1e-6)
        for key in ("mean_option_entropy", "mean_chosen_confidence", "right_to_wrong", "wrong_to_right", "ece", "ece_range"):
            assert key in row
    assert data["status"] == "complete" and data["n_done"] == 3


@pytest.mark.slow
def test_layout_is_plain_hdf5(tmp_path, model_dirs):
    """Readable with plain h5py: UTF-8 strings, one sample per activation chunk, no compression."""
    out = tmp_path / "r.h5"
    assert cli(*run_args(model_dirs["qwen2"], out), "--limit", "2", "--layers", "0,2").returncode == 0
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "self-correction-workbench-run" and f.attrs["schema_version"] == 2
        acts = f["activations/hook_resid_post"]
        assert acts.shape == (2, 3, 2, 2, 64) and acts.chunks == (1, 3, 2, 2, 64) and acts.compression is None
        assert json.loads(acts.attrs["layers"]) == [0, 2]
        assert h5py.check_string_dtype(f["rounds/response"].dtype).encoding == "utf-8"
        assert isinstance(f["rounds/instruction"][0, 0], bytes)
        assert json.loads(f.attrs["protocol"])["name"] == "bbq-paper"
        assert f["rounds/correct"].dtype == np.uint8 and f["progress/done"][...].tolist() == [1, 1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("h5ls") is None, reason="h5ls not installed (make setup installs hdf5-tools as root)")
def test_h5ls_reads_every_dataset(tmp_path, model_dirs):
    out = tmp_path / "r.h5"
    assert cli(*run_args(model_dirs["llama"], out), "--limit", "2").returncode == 0
    listing = subprocess.run(["h5ls", "-r", "-d", str(out)], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0
    assert "*ERROR*" not in listing.stdout
    assert "/rounds/correct" in listing.stdout and "/activations/hook_resid_post" in listing.stdout


def test_equal_length_rows_are_written(tmp_path, model_dirs, capsys, monkeypatch):
    """Every row of a batch the same length (the same prompt twice, greedy): each ragged array
    must stay one sequence per row, not become a 2-D array."""
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "Say hello."}\n{"prompt": "Say hello."}\n')
    out = tmp_path / "r.h5"
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(model_dirs["llama"]), "--task", "prompts", "--data", str(data),
                          "--rounds", "2", "--batch-size", "2", "--max-new-tokens", "5", "--device", "cpu", "--out", str(out))
    assert code in (0, None), err
    with RunFile(out) as run:
        ids, transcripts = run.array("tokens/response_token_ids"), run.array("transcripts/token_ids")
        assert ids.shape == (2, 2) and transcripts.shape == (2,)
        assert ids[0, 0].tolist() == ids[1, 0].tolist() and transcripts[0].tolist() == transcripts[1].tolist()
        assert len(transcripts[0]) > len(ids[0, 0]) > 0


@pytest.mark.slow
def test_run_files_without_progress_or_with_bad_counts_give_one_line(tmp_path, model_dirs, capsys, monkeypatch):
    out = tmp_path / "r.h5"
    assert cli(*run_args(model_dirs["llama"], out), "--limit", "2").returncode == 0
    for what, change, needle in (
        ("no-progress", lambda f: f.__delitem__("progress"), "no progress/done"),
        ("rounds-text", lambda f: f.attrs.__setitem__("n_rounds", "three"), "n_rounds"),
        ("rounds-float", lambda f: f.attrs.__setitem__("n_rounds", 2.5), "n_rounds"),
        ("samples-missing", lambda f: f.attrs.__delitem__("n_samples"), "n_samples is missing"),
    ):
        broken = tmp_path / f"{what}.h5"
        shutil.copy(out, broken)
        with h5py.File(broken, "r+") as f:
            change(f)
        code, _, err = workbench(capsys, monkeypatch, "info", str(broken))
        assert code == 2, (what, err)
        error_line(err, str(broken), needle)


def test_output_path_errors_come_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Each is one line; the model named does not exist, so reaching the model would say so instead."""
    no_model = str(tmp_path / "no-such-model")
    base = ["run", "--model", no_model, "--limit", "2"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = workbench(capsys, monkeypatch, *base, "--out", str(a_file / "run.h5"))
    assert code == 2
    error_line(err, "is a file, not a folder")
    folder = tmp_path / "folder"
    folder.mkdir()
    code, _, err = workbench(capsys, monkeypatch, *base, "--out", str(folder), "--overwrite")
    assert code == 2
    error_line(err, "is a folder")
    assert folder.is_dir()
    code, _, err = workbench(capsys, monkeypatch, *base, "--out", str(a_file))  # an existing file without --overwrite
    assert code == 2
    error_line(err, "already exists")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o555)
        code, _, err = workbench(capsys, monkeypatch, *base, "--out", str(locked / "run.h5"))
        assert code == 2
        error_line(err, "permission denied")


def test_ragged_arrays_and_strings_round_trip_through_the_parts(tmp_path):
    """The writer's flat-array parts and the pointer-based vlen writes (no model): empty sequences,
    equal-length rows, non-ASCII text, a NUL in a string (stored as ␀), a task field of strings,
    in the running view and in the finished file read with plain h5py; a damaged part is refused."""
    from workbench.store.format import parts_dir
    from workbench.store.header import SampleTable
    from workbench.store.parts import read_part
    from workbench.store.writer import RunWriter

    n, r = 10, 3
    samples = SampleTable(index=list(range(n)), id=[str(i) for i in range(n)], context=["c"] * n, question=["q"] * n,
                          options=[("a", "b")] * n, gold=[0] * n, category=[""] * n, condition=[""] * n, extra=["{}"] * n)
    rng = np.random.default_rng(0)
    path = tmp_path / "r.h5"
    want: dict[str, list] = {"ids": [], "text": [], "transcripts": [], "field": []}
    with RunWriter.create(path, {"layers": [0]}, samples, r, {"h": (1, 4)}) as writer:
        for start in range(0, n, 4):
            b = min(n, start + 4) - start
            ids = [[[7, 7, 7] if i % 2 else rng.integers(0, 9, rng.integers(0, 4)).tolist() for _ in range(r)] for i in range(b)]
            texts = [[f"résumé {start + i}.{t}\0!" if (i + t) % 3 else "" for t in range(r)] for i in range(b)]
            transcripts = [list(range(3))] * b if start == 4 else [list(range(start + i)) for i in range(b)]
            field = np.array([[f"f{start + i}"] * r for i in range(b)])
            want["ids"] += ids
            want["text"] += texts
            want["transcripts"] += transcripts
            want["field"] += field.tolist()
            arrays = {"response_token_ids": ids, "token_entropy": [[np.full(len(x), 0.5, np.float32) for x in row] for row in ids],
                      "instruction": texts, "response": texts, "correct": np.ones((b, r), bool), "label": field}
            writer.write_batch(start, arrays, {"h": np.full((b, r, 2, 1, 4), start, np.float32)}, transcripts)
            if start == 4:
                with RunFile(path) as run:
                    assert run.running and run.done.sum() == 8
                    assert [[x.tolist() for x in row] for row in run.array("tokens/response_token_ids")] == want["ids"]
                    assert run.array("rounds/response").tolist() == [[t.replace("\0", "\u2400") for t in row] for row in want["text"]]
        writer.finish()
    with h5py.File(path, "r") as f:
        ids = f["tokens/response_token_ids"]
        assert ids.shape == (n, r) and h5py.check_vlen_dtype(ids.dtype) == np.dtype("int32")
        assert [[x.tolist() for x in row] for row in ids[...]] == want["ids"]
        assert h5py.check_vlen_dtype(f["tokens/token_entropy"].dtype) == np.dtype("float32")
        assert [[x.tolist() for x in row] for row in f["tokens/token_entropy"][...]] == [[[0.5] * len(x) for x in row] for row in want["ids"]]
        assert f["rounds/instruction"].asstr()[...].tolist() == [[t.replace("\0", "\u2400") for t in row] for row in want["text"]]
        assert [x.tolist() for x in f["transcripts/token_ids"][...]] == want["transcripts"]
        assert f["rounds/label"].asstr()[...].tolist() == want["field"]
        assert f["rounds/correct"].dtype == np.uint8 and f["rounds/correct"][...].all()
        assert f["activations/h"][9, 0, 0, 0].tolist() == [8.0] * 4

    with RunWriter.create(tmp_path / "d.h5", {"layers": [0]}, samples, r, {"h": (1, 4)}) as writer:
        writer.write_batch(0, {"correct": np.ones((4, r), bool)}, {"h": np.zeros((4, r, 2, 1, 4), np.float32)}, [[1]] * 4)
        (part,) = parts_dir(tmp_path / "d.h5").glob("batch-*.part")
        read_part(part)
        raw = bytearray(part.read_bytes())
        raw[-1] ^= 0xFF
        part.write_bytes(bytes(raw))
        with pytest.raises(OSError, match="damaged"):
            read_part(part)

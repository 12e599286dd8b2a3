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

from workbench.store import RunFile

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
        if line.startswith("batch done: 2/"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with RunFile(killed) as run:
        done = run.done
        assert 2 <= done.sum() < len(done), "the kill must land mid-run"
        assert run.meta["status"] == "running"
        assert run.array("rounds/correct").shape[0] == done.sum()  # readers see finished samples only

    resumed = cli(*run_args(model, killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    with RunFile(killed) as run:
        assert run.meta["status"] == "complete"
    a, b = all_datasets(whole), all_datasets(killed)
    assert_same(a, b)


def test_resume_refuses_other_settings(tmp_path, model_dirs):
    out = tmp_path / "r.h5"
    assert cli(*run_args(model_dirs["llama"], out), "--limit", "2").returncode == 0
    again = cli(*run_args(model_dirs["llama"], out), "--limit", "2", "--rounds", "2", "--resume")
    assert again.returncode == 2
    assert "different n_rounds" in again.stderr
    assert "Traceback" not in again.stderr


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


@pytest.mark.skipif(shutil.which("h5ls") is None, reason="h5ls not installed (make setup installs hdf5-tools as root)")
def test_h5ls_reads_every_dataset(tmp_path, model_dirs):
    out = tmp_path / "r.h5"
    assert cli(*run_args(model_dirs["llama"], out), "--limit", "2").returncode == 0
    listing = subprocess.run(["h5ls", "-r", "-d", str(out)], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0
    assert "*ERROR*" not in listing.stdout
    assert "/rounds/correct" in listing.stdout and "/activations/hook_resid_post" in listing.stdout

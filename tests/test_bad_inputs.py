"""A corpus of bad inputs (issue 24, "Bad input"): each is a `workbench` command line that once gave a
traceback, a hang, lost data, or was accepted without a word. Each now exits non-zero with one
``error:`` line naming what is wrong (or, where accepting is right, exits 0 and says what it did).

Every case runs the real command in-process (``tests/cli_support.py``) and is refused before any
model loads (a loaded model fails the test), so the whole corpus takes a few seconds; the cases that
need a model (an export) are separate tests below.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_support import error_line, interrupt_at_batch, workbench
from probe_files import write_probe
from tui_support import build_run

RUN = "RUN"  # stands for the (copied) run file of each case


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A small finished run file (no model needed): 6 samples, 3 rounds, 3 layers of width 8."""
    return build_run(tmp_path_factory.mktemp("bad") / "run.h5", n_samples=6, n_rounds=3)


@pytest.fixture
def no_model(monkeypatch):
    import workbench.engine.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)


def _lying_rounds(run: Path) -> None:
    with h5py.File(run, "r+") as f:
        f.attrs["n_rounds"] = np.int64(int(f.attrs["n_rounds"]) + 2)


def _wrong_dtype(run: Path) -> None:
    with h5py.File(run, "r+") as f:
        shape = f["rounds/correct"].shape
        del f["rounds/correct"]
        f["rounds/correct"] = np.full(shape, b"x", dtype="S1")


def _wrong_shape(run: Path) -> None:
    with h5py.File(run, "r+") as f:
        del f["rounds/option_entropy"]
        f["rounds/option_entropy"] = np.zeros((int(f.attrs["n_samples"]), 1), dtype=np.float32)


def _fifo(run: Path) -> None:
    run.unlink()
    os.mkfifo(run)


def _nan_probe(tmp: Path) -> Path:
    directions = np.eye(3, 8, dtype=np.float32)
    directions[1, 2] = np.nan
    return write_probe(tmp / "nan.h5", n_layers=3, d_model=8, directions=directions)


def _bad_keys(tmp: Path) -> Path:
    path = tmp / "keys.toml"
    path.write_text('[keys]\n"round.next" = "ctrl+alt+!!!nonsense"\n')
    return path


def _huge_contrast(tmp: Path) -> Path:
    path = tmp / "big.jsonl"
    path.write_text("".join(f'{{"text": "t {i}", "label": {i % 2}}}\n' for i in range(12)))
    return path


def _long_line(tmp: Path) -> Path:
    path = tmp / "long.jsonl"
    path.write_bytes(b'{"context": "' + b"x" * (2 << 20) + b'"}\n')
    return path


ORGANISM_RUN = ["run", "--model", "organism", "--task", "organism", "--limit", "2", "--rounds", "2"]

# (id, arguments (RUN: the run file, TMP: a scratch folder, callables: built in TMP), what the line names,
#  a change made to the copied run first)
CASES = [
    ("run-seed-2**70", [*ORGANISM_RUN, "--seed", str(2**70), "--out", "TMP/o.h5"], ("--seed",), None),
    ("run-seed-negative", [*ORGANISM_RUN, "--seed", "-1", "--out", "TMP/o.h5"], ("--seed",), None),
    ("run-rounds-10**20", [*ORGANISM_RUN[:-2], "--rounds", str(10**20), "--out", "TMP/o.h5"], ("--rounds",), None),
    ("run-layers-repeated", [*ORGANISM_RUN, "--layers", "0,0", "--out", "TMP/o.h5"], ("--layers", "more than once"), None),
    ("run-layers-empty-item", [*ORGANISM_RUN, "--layers", "1,,2", "--out", "TMP/o.h5"], ("--layers", "empty item"), None),
    ("run-organism-with-data", [*ORGANISM_RUN, "--data", "x.jsonl", "--out", "TMP/o.h5"], ("--data", "--task organism"), None),
    ("run-organism-with-condition", [*ORGANISM_RUN, "--condition", "ambig", "--out", "TMP/o.h5"], ("--condition",), None),
    ("run-bbq-line-of-2-MiB", ["run", "--model", "organism", "--task", "bbq", "--force", "--data", _long_line, "--out", "TMP/o.h5"],
     ("long.jsonl:1", "longer than"), None),
    ("analyze-seed-negative", ["analyze", RUN, "--seed", "-1"], ("--seed",), None),
    ("organism-sample-seed-negative", ["organism", "sample", "--seed", "-1"], ("--seed",), None),
    ("analyze-lying-n_rounds", ["analyze", RUN], ("rounds", "damaged"), _lying_rounds),
    ("info-lying-n_rounds", ["info", RUN], ("rounds", "damaged"), _lying_rounds),
    ("info-wrong-dtype", ["info", RUN], ("rounds/correct",), _wrong_dtype),
    ("info-wrong-shape", ["info", RUN], ("rounds/option_entropy",), _wrong_shape),
    ("info-fifo", ["info", RUN], ("FIFO",), _fifo),
    ("probe-show-fifo", ["probe", "show", RUN], ("FIFO",), _fifo),
    ("tui-serve-port-negative", ["tui", RUN, "--serve", "--port", "-1"], ("--port",), None),
    ("tui-serve-port-99999", ["tui", RUN, "--serve", "--port", "99999"], ("--port",), None),
    ("tui-serve-host-bogus", ["tui", RUN, "--serve", "--host", "bogus.invalid"], ("--host",), None),
    ("tui-serve-host-remote", ["tui", RUN, "--serve", "--host", "0.0.0.0"], ("--allow-remote",), None),
    ("tui-keys-nonsense", ["tui", RUN, "--keys", _bad_keys], ("ctrl+alt+!!!nonsense",), None),
    ("probe-show-nan-direction", ["probe", "show", _nan_probe], ("layer 1", "not finite"), None),
    ("probe-track-nan-direction", ["probe", "track", RUN, _nan_probe], ("layer 1", "not finite"), None),
    ("probe-fit-out-onto-the-run", ["probe", "fit", "--out", RUN], ("--overwrite",), None),
    ("probe-fit-overwrite-the-run", ["probe", "fit", "--out", RUN, "--overwrite"], ("not a probe file",), None),
    ("probe-fit-too-many-lines", ["probe", "fit", "--contrast", _huge_contrast, "--max-lines", "10", "--out", "TMP/p.h5"],
     ("more than 10", "--max-lines"), None),
    ("export-onto-itself", ["export", RUN, "--hooks", "blocks.0.hook_resid_post", "--out", RUN, "--overwrite"],
     ("the run being exported",), None),
    ("export-resume-and-overwrite", ["export", RUN, "--hooks", "blocks.0.hook_resid_post", "--out", "TMP/c.h5", "--resume",
                                     "--overwrite"], ("--resume", "--overwrite"), None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_and_changes_nothing(case, capsys, monkeypatch, tmp_path, small_run, no_model):
    name, args, needles, change = case
    run = tmp_path / "run.h5"
    shutil.copy(small_run, run)
    if change is not None:
        change(run)
    before = run.read_bytes() if run.is_file() else None
    argv = [str(run) if a == RUN else str(a(tmp_path)) if callable(a) else a.replace("TMP", str(tmp_path)) for a in args]
    code, out, err = workbench(capsys, monkeypatch, *argv)
    assert code != 0, (name, out, err)
    error_line(err, *needles)
    if before is not None:
        assert run.read_bytes() == before, f"{name} changed the run file"
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "c.h5").exists()


def test_non_finite_activations_are_tracked_with_a_warning(capsys, monkeypatch, tmp_path, small_run):
    run = tmp_path / "run.h5"
    shutil.copy(small_run, run)
    with h5py.File(run, "r+") as f:
        hook = next(iter(f["activations"].keys() - {"sample", "round", "position", "layer", "d_model"}))
        ds = f[f"activations/{hook}"]
        row = ds[2]
        row[1] = np.nan
        ds[2] = row
        layers, width = ds.shape[3], ds.shape[4]
    probe = write_probe(tmp_path / "p.h5", n_layers=layers, d_model=width, hook=hook, model_name="organism")
    with h5py.File(run, "r+") as f:
        f.attrs["model_name"] = "organism"
    code, out, err = workbench(capsys, monkeypatch, "probe", "track", str(run), str(probe))
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "not finite" in warning[0] and "round 2" in warning[0], err


def test_probe_track_on_a_full_disk_leaves_nothing_and_says_run_it_again(tmp_path, small_run):
    """RLIMIT_FSIZE below the run's size: the copy ``probe track`` writes into fails; the run is
    unchanged, no ``.derived.tmp`` is left, and the line does not offer a --resume track lacks."""
    import resource

    run = tmp_path / "run.h5"
    shutil.copy(small_run, run)
    with h5py.File(run, "r") as f:
        hook = next(iter(f["activations"].keys() - {"sample", "round", "position", "layer", "d_model"}))
        layers, width = f[f"activations/{hook}"].shape[3:]
        model, model_path = str(f.attrs["model_name"]), str(f.attrs["model_path"])
    probe = write_probe(tmp_path / "p.h5", n_layers=layers, d_model=width, hook=hook, model_name=model, model_path=model_path)
    before = run.read_bytes()
    limit = len(before) - 1
    done = subprocess.run([sys.executable, "-m", "workbench", "probe", "track", str(run), str(probe)], capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
                          cwd=Path(__file__).parents[1])
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "run the command again" in lines[0] and "--resume" not in lines[0], done.stderr
    assert run.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5", "run.h5"]


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory) -> Path:
    from workbench import run_protocol

    path = tmp_path_factory.mktemp("organism") / "run.h5"
    run_protocol(model="organism", task="organism", limit=2, rounds=2, batch_size=2, out=path).close()
    return path


def test_a_resume_of_an_export_killed_after_its_final_rename_says_it_is_complete(capsys, monkeypatch, tmp_path, organism_run):
    """A kill between the final rename and the removal of ``OUT.parts`` leaves a complete cache and the
    folder: ``--resume`` says the export is complete, exits 0 and removes the folder."""
    import workbench.cache.export as export

    out = tmp_path / "c.h5"
    parts = tmp_path / "c.h5.parts"
    real_rmtree = shutil.rmtree

    def killed_at_cleanup(path, *args, **kwargs):
        if Path(path) == parts and out.exists():
            raise KeyboardInterrupt  # the kill, right after the rename
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(export.shutil, "rmtree", killed_at_cleanup)
    code, _, err = workbench(capsys, monkeypatch, "export", str(organism_run), "--hooks", "blocks.0.hook_resid_post", "--out", str(out))
    assert code == 130 and out.exists() and parts.is_dir(), err
    monkeypatch.setattr(export.shutil, "rmtree", real_rmtree)
    before = out.read_bytes()
    code, _, err = workbench(capsys, monkeypatch, "export", str(organism_run), "--hooks", "blocks.0.hook_resid_post", "--out", str(out), "--resume")
    assert code == 0 and "complete already" in err, err
    assert not parts.exists() and out.read_bytes() == before


def test_export_of_every_hook_skips_those_that_are_not_per_token(capsys, monkeypatch, tmp_path, organism_run):
    """``--hooks '*'`` once failed on the rotary tables ``[1, pos, d]`` (shared by the batch)."""
    code, _, err = workbench(capsys, monkeypatch, "export", str(organism_run), "--hooks", "*", "--out", str(tmp_path / "all.h5"))
    assert code == 0, err
    with h5py.File(tmp_path / "all.h5") as f:
        names = set(f["activations"])
    assert "blocks.0.hook_resid_post" in names or "blocks.0.hook_out" in names
    assert "rotary_emb.hook_cos" not in names and "rotary_emb.hook_sin" not in names


def test_a_missing_data_package_is_one_line_naming_the_extra(capsys, monkeypatch, tmp_path, small_run):
    """pandas, xarray and datasets come with the ``[data]`` extra: without one, the feature says so."""
    from workbench.errors import WorkbenchError
    from workbench.store.reader import RunFile

    for module in ("pandas", "xarray", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # `import pandas` now raises ImportError
    with RunFile(small_run) as run:
        for view, module in ((run.to_dataframe, "pandas"), (run.to_xarray, "xarray")):
            with pytest.raises(WorkbenchError, match=rf"needs the `{module}` package: pip install 'self-correction-workbench\[data\]'"):
                view()
    code, _, err = workbench(capsys, monkeypatch, "export", str(small_run), "--hooks", "x", "--format", "saelens",
                             "--out", str(tmp_path / "s"))
    assert code != 0
    error_line(err, "--format saelens", "datasets", "[data]")


@pytest.mark.slow
def test_export_onto_a_full_disk_is_one_line_without_hdf5_tracebacks(tmp_path, organism_run):
    """RLIMIT_FSIZE below the cache file's size: once, h5py printed a traceback for every object of the
    failed file it freed before the one-line error."""
    import resource

    limit = 20_000
    done = subprocess.run([sys.executable, "-m", "workbench", "export", str(organism_run), "--hooks", "blocks.*.hook_resid_post",
                           "--out", str(tmp_path / "c.h5")], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)), cwd=Path(__file__).parents[1])
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("exported ", "exporting about "))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--resume" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "HDF5-DIAG" not in done.stderr


def test_exporting_a_run_that_is_not_finished_says_what_it_holds(capsys, monkeypatch, tmp_path):
    """A run interrupted after its first batch is read from its parts: the export says it covers
    only the samples finished so far."""
    from workbench.engine import batch as engine

    real = interrupt_at_batch(monkeypatch, 2)
    run = tmp_path / "run.h5"
    code, _, err = workbench(capsys, monkeypatch, *ORGANISM_RUN, "--batch-size", "1", "--device", "cpu", "--out", str(run))
    assert code == 130 and not run.exists(), err
    monkeypatch.setattr(engine, "run_batch", real)
    code, _, err = workbench(capsys, monkeypatch, "export", str(run), "--hooks", "blocks.0.hook_resid_post", "--out", str(tmp_path / "c.h5"))
    assert code == 0, err
    note = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "not finished" in note[0] and "1 of 2 samples" in note[0], err

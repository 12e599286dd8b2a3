"""The activation cache as a researcher uses it: `workbench tui` on a cache opens its run, the
loaded cache indexes like a TransformerLens ActivationCache (and its model-dependent methods work),
rounds counted from 1 everywhere a user passes or reads them, and an export that says how large it
will be before it writes (and refuses what will not fit)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cli_support import error_line, workbench
from tui_support import build_run
from workbench.errors import WorkbenchError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("cacheuser") / "run.h5", n_samples=3, n_rounds=2, n_layers=2, probe=False)


def saved_cache(path: Path, run_file: str | None) -> Path:
    """A cache file written by ``save_activation_cache``, recording ``run_file`` as its run (as an export does)."""
    from workbench import save_activation_cache

    save_activation_cache({"blocks.0.hook_resid_post": torch.ones(1, 3, 4)}, path)
    if run_file is not None:
        with h5py.File(path, "a") as f:
            f.attrs["run_file"] = run_file
    return path


# --------------------------------------------------------------------------- workbench tui CACHE


def test_tui_on_a_cache_opens_its_run(tiny_run, tmp_path, capsys, monkeypatch):
    from tui.app import WorkbenchApp

    opened = []
    monkeypatch.setattr(WorkbenchApp, "run", lambda self: opened.append(self.run_path))  # the terminal loop itself is not under test here
    cache = saved_cache(tmp_path / "cache.h5", str(tiny_run))
    code, _, err = workbench(capsys, monkeypatch, "tui", str(cache))
    assert code == 0, err
    assert opened == [tiny_run]
    assert "is an activation cache" in err and str(tiny_run) in err


def test_tui_on_a_cache_finds_its_run_moved_beside_it(tiny_run, tmp_path, capsys, monkeypatch):
    from tui.cli import browsed_run

    shutil.copy(tiny_run, tmp_path / "moved.h5")
    cache = saved_cache(tmp_path / "cache.h5", "/somewhere/else/moved.h5")
    assert browsed_run(cache) == tmp_path / "moved.h5"


def test_tui_on_a_cache_whose_run_is_gone_names_the_command(tmp_path, capsys, monkeypatch):
    cache = saved_cache(tmp_path / "cache.h5", "/nowhere/run.h5")
    code, _, err = workbench(capsys, monkeypatch, "tui", str(cache))
    assert code == 2
    line = error_line(err, "is an activation cache", "/nowhere/run.h5", "workbench tui", f"workbench info {cache}")
    assert "not a workbench run file" not in line
    cache = saved_cache(tmp_path / "saved.h5", None)
    code, _, err = workbench(capsys, monkeypatch, "tui", str(cache))
    assert code == 2
    error_line(err, "is an activation cache", "records no run")

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


# --------------------------------------------------------------------------- the loaded cache


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory, organism) -> Path:
    from workbench.engine.run import RunConfig, run_protocol

    path = tmp_path_factory.mktemp("cacheuser-run") / "run.h5"
    run_protocol(RunConfig(out=path, model="organism", task="organism", protocol="organism", rounds=3, limit=2,
                           batch_size=2), model=organism).close()
    return path


@pytest.fixture(scope="module")
def resid_cache(tmp_path_factory, organism_run, organism) -> Path:
    """Rounds 1 and 3 of every residual hook (resid_pre of each layer and resid_post)."""
    from workbench.cache.export import export_run

    out = tmp_path_factory.mktemp("cacheuser-cache") / "cache.h5"
    return export_run(organism_run, out, ["blocks.*.hook_resid_pre", "blocks.*.hook_resid_post"], model=organism,
                      rounds=[0, 2])  # export_run's rounds are the file's (0-based); the CLI's --rounds 1,3


def test_the_loaded_cache_indexes_like_an_activation_cache(resid_cache, organism):
    from workbench import load_activation_cache

    c = load_activation_cache(resid_cache)
    n = organism.n_layers
    assert torch.equal(c["resid_post", 2], c.cache["blocks.2.hook_resid_post"])
    assert torch.equal(c["blocks.2.hook_resid_post"], c.cache["blocks.2.hook_resid_post"])
    assert torch.equal(c["resid_post", -1], c.cache[f"blocks.{n - 1}.hook_resid_post"])  # negative layers need n_layers
    assert "blocks.0.hook_resid_pre" in c and len(c) == 2 * n and sorted(c) == sorted(c.cache)
    # TransformerLens's own methods, with the run's model config read from the path the cache records
    assert c.model.cfg.n_layers == n and c.model.cfg.d_model == organism.d_model
    stacked, labels = c.accumulated_resid(return_labels=True)
    assert labels == [f"{l}_pre" for l in range(n)] + ["final_post"]
    assert torch.equal(stacked[1], c["resid_pre", 1]) and torch.equal(stacked[-1], c["resid_post", n - 1])
    assert torch.equal(c.stack_activation("resid_post"), torch.stack([c["resid_post", l] for l in range(n)]))
    # given the model itself, the cache uses its bridge
    assert load_activation_cache(resid_cache, model=organism).model is organism.bridge


def test_without_a_model_config_methods_that_need_it_say_model_in_one_line(resid_cache, tmp_path):
    from workbench import load_activation_cache

    moved = tmp_path / "c.h5"
    shutil.copy(resid_cache, moved)
    with h5py.File(moved, "a") as f:
        f.attrs["model_path"] = str(tmp_path / "gone")
    c = load_activation_cache(moved)
    assert c["resid_post", 1].shape[-1] == 64  # a positive layer needs nothing of the model
    with pytest.raises(WorkbenchError, match=r"model=") as e:
        c.accumulated_resid()
    assert "\n" not in str(e.value) and "config.json" in str(e.value)
    with pytest.raises(WorkbenchError, match=r"model="):
        load_activation_cache(resid_cache).accumulated_resid(apply_ln=True)  # needs the weights, not only the config


def test_rounds_are_counted_from_1_in_load_and_info(resid_cache, capsys, monkeypatch):
    from workbench import load_activation_cache

    c = load_activation_cache(resid_cache)
    assert set(c.round[c.mask].tolist()) == {1, 3}  # exported with --rounds 1,3
    third = load_activation_cache(resid_cache, rounds=[3])
    assert set(third.round[third.mask].tolist()) == {3}
    with h5py.File(resid_cache) as f:  # the file itself keeps 0-based rounds (docs/CACHE.md)
        assert set(np.unique(f["tokens/round"][...]).tolist()) == {0, 2}
    with pytest.raises(WorkbenchError, match="counted from 1"):
        load_activation_cache(resid_cache, rounds=[0])
    code, out, err = workbench(capsys, monkeypatch, "info", str(resid_cache))
    assert code == 0, err
    assert '"rounds": [1, 3]' in out


# --------------------------------------------------------------------------- export size


def test_export_prints_its_size_and_refuses_more_than_max_size(organism_run, tmp_path, capsys, monkeypatch):
    from workbench.cache.size import estimate_bytes, parse_size
    from workbench.cache.file import HookLayout

    out = tmp_path / "pattern.h5"
    code, _, err = workbench(capsys, monkeypatch, "export", str(organism_run), "--hooks", "blocks.*.attn.hook_pattern",
                             "--out", str(out), "--max-size", "10KiB", "--device", "cpu")
    assert code == 2 and not out.exists() and not (tmp_path / "pattern.h5.parts").exists()
    assert "exporting about" in err
    error_line(err.replace(err.splitlines()[0] + "\n", ""), "more than --max-size 10.0 KiB", "--dtype float16")
    code, _, err = workbench(capsys, monkeypatch, "export", str(organism_run), "--hooks", "blocks.*.attn.hook_pattern",
                             "--out", str(out), "--max-size", "50MiB", "--device", "cpu")
    assert code == 0, err
    estimated = err.splitlines()[0]
    assert estimated.startswith("exporting about ") and str(out) in estimated
    with h5py.File(out) as f:
        real = sum(ds.size * ds.dtype.itemsize for ds in f["activations"].values())
        layouts = [HookLayout(name, ds.shape[1:], str(ds.dtype)) for name, ds in f["activations"].items()]
        n_tokens = len(f["tokens/round"])
    assert real <= estimate_bytes(n_tokens, layouts) <= real * 1.05  # the activations, plus ~20 bytes a token
    assert parse_size("10GiB") == 10 * 2**30 and parse_size("1.5 MB") == 1_500_000 and parse_size("2048") == 2048
    with pytest.raises(WorkbenchError, match="--max-size takes a size"):
        parse_size("12XB")


def test_export_refuses_more_than_the_free_space(organism_run, tmp_path, capsys, monkeypatch):
    import workbench.cache.size as size

    monkeypatch.setattr(size, "free_bytes", lambda path: 4096)  # a nearly full disk, as statvfs would say it
    out = tmp_path / "c.h5"
    code, _, err = workbench(capsys, monkeypatch, "export", str(organism_run), "--hooks", "blocks.0.hook_resid_post",
                             "--out", str(out), "--device", "cpu")
    assert code == 2 and not out.exists()
    assert "only 4.0 KiB is free there" in err and "Traceback" not in err

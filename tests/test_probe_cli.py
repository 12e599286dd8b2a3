"""`workbench probe` as a user runs it: fit from a pair file, show, track into a run, the stereotype variant."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import BBQ_FIXTURE

from cli_support import workbench  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, model_dirs):
    out = tmp_path_factory.mktemp("probe-cli") / "run.h5"
    from workbench.engine.run import RunConfig, run_protocol

    run_protocol(RunConfig(out=out, model=str(model_dirs["llama"]), task="bbq", data=(str(BBQ_FIXTURE),),
                           protocol="bbq-paper", rounds=2, max_new_tokens=4, batch_size=4, device="cpu")).close()
    return out


def test_fit_show_track_stereotype(capsys, monkeypatch, tmp_path, model_dirs, tiny_run):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"positive": "hello world {i}", "negative": "the answer is {i}"}}\n' for i in range(24)))
    probe = tmp_path / "p.h5"
    code, out, err = workbench(capsys, monkeypatch, "probe", "fit", "--model", str(model_dirs["llama"]), "--contrast", str(pairs),
                               "--method", "pca", "--device", "cpu", "--out", str(probe))
    assert code == 0, err
    assert "best layer" in out and "test AUROC" in out
    with h5py.File(probe) as f:
        assert f.attrs["method"] == "pca" and f["directions"].shape == (3, 64)
        assert np.allclose(np.linalg.norm(f["directions"][...], axis=1), 1.0, atol=1e-5)
    code, out, _ = workbench(capsys, monkeypatch, "probe", "show", str(probe))
    assert code == 0 and "60 texts" not in out and "48 texts (24 positive, 24 pairs)" in out
    code, out, err = workbench(capsys, monkeypatch, "probe", "track", str(tiny_run), str(probe), "--name", "hello")
    assert code == 0, err
    with h5py.File(tiny_run) as f:
        assert f["probes/hello/projection"].shape == (8, 2, 3)
    code, out, err = workbench(capsys, monkeypatch, "probe", "stereotype", str(tiny_run), "--device", "cpu")
    assert code == 0, err
    with h5py.File(tiny_run) as f:
        statements = [s.decode() for s in f["probes/stereotype/statement"][...]]
        assert statements[0] == "The tall person was late to the meeting."
        assert np.isfinite(f["probes/stereotype/cosine"][...]).all()
    code, out, _ = workbench(capsys, monkeypatch, "info", str(tiny_run))
    assert "concept hello" in out


def test_fit_refuses_unpaired_data_for_ccs_and_ridge_fits_its_label(capsys, monkeypatch, tmp_path, model_dirs):
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(f'{{"text": "text {i}", "label": {i % 2}}}\n' for i in range(10)))
    for method, code_wanted, says in (("ccs", 2, "needs pairs"), ("ridge", 0, "")):
        code, _, err = workbench(capsys, monkeypatch, "probe", "fit", "--model", str(model_dirs["llama"]), "--contrast", str(labelled),
                                 "--method", method, "--device", "cpu", "--out", str(tmp_path / "x.h5"))
        assert code == code_wanted and says in err and "Traceback" not in err, err
    with h5py.File(tmp_path / "x.h5") as f:  # a file without a continuous target: ridge regresses on the 0/1 label
        assert f.attrs["method"] == "ridge" and f.attrs["fitted_to"] == "label" and f.attrs["best_layer_by"] == "test_accuracy"
        assert "test_target_spearman" not in f


def test_ridge_fit_show_track_on_the_organism(capsys, monkeypatch, tmp_path):
    """`--method ridge` end to end: fitted to the organism contrast's exact log-odds (no prefix left out),
    its best layer chosen by held-out ρ, shown with its penalties, tracked into an organism-world run."""
    probe = tmp_path / "ridge.h5"
    code, out, err = workbench(capsys, monkeypatch, "probe", "fit", "--model", "organism", "--contrast", "organism", "--method", "ridge",
                               "--n", "400", "--device", "cpu", "--out", str(probe))
    assert code == 0, err
    assert "ρ exact" in out and "α" in out and "the highest held-out ρ exact" in out
    with h5py.File(probe) as f:
        assert f.attrs["method"] == "ridge" and f.attrs["fitted_to"] == "target" and f.attrs["best_layer_by"] == "test_target_spearman"
        rho, alpha, best = f["test_target_spearman"][...], f["alpha"][...], int(f.attrs["best_layer"])
        contrast = json.loads(f.attrs["contrast"])
    assert contrast["margin"] == 0.0 and contrast["n"] == 400
    assert best == int(np.argmax(rho)) and rho[best] > 0.85 and (alpha > 0).all()
    code, shown, _ = workbench(capsys, monkeypatch, "probe", "show", str(probe))
    assert code == 0 and shown == out  # show prints what fit printed
    run = tmp_path / "world.h5"
    code, _, err = workbench(capsys, monkeypatch, "run", "--protocol", "organism-world", "--limit", "6", "--rounds", "3",
                             "--device", "cpu", "--out", str(run))
    assert code == 0, err
    code, out, err = workbench(capsys, monkeypatch, "probe", "track", str(run), str(probe), "--name", "fair")
    assert code == 0, err
    assert f"mean concept score at layer {best}" in " ".join(out.split())
    with h5py.File(run) as f:
        assert f["probes/fair/projection"].shape == (6, 3, 4) and f["probes/fair"].attrs["method"] == "ridge"


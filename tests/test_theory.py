"""`workbench theory` against direct enumeration of the two-concept model, and the organism's world."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cli_support import error_line, workbench  # noqa: E402
from workbench.errors import WorkbenchError
from workbench.analysis.theory import TheoryParams, enumerate_posterior, organism_exact, organism_params, posterior, study_expression


@pytest.mark.parametrize("params", [
    TheoryParams(c_x=0.5, c_i=0.7, c_y=0.6, c_p=0.5),
    TheoryParams(c_x=0.2, c_i=0.8, c_y=0.3, c_p=0.4),
    TheoryParams(c_x=0.6, c_i=0.45, c_y=0.4, c_p=0.5),  # evidence against C_p: the posterior falls
])
def test_posterior_equals_enumeration_of_the_joint_table(params):
    np.testing.assert_allclose(posterior(params, 5), enumerate_posterior(params, 5), rtol=1e-10)


def test_the_enumerated_model_has_the_stated_single_evidence_posteriors():
    # with one round, only x is observed: p(C_p | x) must be c_x, whatever the prior
    for c_x, c_p in ((0.3, 0.6), (0.9, 0.2)):
        assert enumerate_posterior(TheoryParams(c_x=c_x, c_i=0.5, c_y=0.5, c_p=c_p), 1)[0] == pytest.approx(c_x)


def test_the_study_expression_differs_from_the_normalised_posterior():
    params = TheoryParams(c_x=0.5, c_i=0.7, c_y=0.6, c_p=0.5)
    norm, study = posterior(params, 6), study_expression(params, 6)
    assert norm[0] == study[0] == 0.5
    assert np.all(np.diff(norm) > 0) and np.all(np.diff(study) < 0)  # evidence for C_p, yet the study's expression falls
    np.testing.assert_allclose(study, 0.5 * 0.42 ** np.arange(6))
    # by hand: odds after round 2 = 1 · (7/3) · (6/4) = 3.5 → 3.5 / 4.5
    assert norm[1] == pytest.approx(3.5 / 4.5)


def test_parameters_are_checked():
    with pytest.raises(WorkbenchError, match="--c-i"):
        posterior(TheoryParams(c_x=0.5, c_i=1.0, c_y=0.5, c_p=0.5), 3)
    with pytest.raises(WorkbenchError, match="--rounds"):
        posterior(TheoryParams(c_x=0.5, c_i=0.5, c_y=0.5, c_p=0.5), 0)


def test_organism_parameters_reproduce_the_worlds_exact_posterior():
    params, _ = organism_params()
    np.testing.assert_allclose(posterior(params, 6), organism_exact(6), rtol=1e-9)
    assert params.c_p == params.c_x == 0.3 and params.c_i > 0.9


def test_theory_cli(tmp_path, capsys, monkeypatch):
    plot = tmp_path / "theory.svg"
    code, out, err = workbench(capsys, monkeypatch, "theory", "--c-x", "0.5", "--c-i", "0.7", "--c-y", "0.6", "--c-p", "0.5",
                               "--rounds", "4", "--plot", str(plot))
    assert code == 0, err
    assert "0.7778" in out and "0.2100" in out and plot.read_text().lstrip().startswith("<?xml")
    code, out, err = workbench(capsys, monkeypatch, "theory", "--organism", "--rounds", "3")
    assert code == 0 and "0.9848" in out
    code, _, err = workbench(capsys, monkeypatch, "theory", "--c-x", "0.5")
    assert code == 2
    error_line(err, "--c-i")

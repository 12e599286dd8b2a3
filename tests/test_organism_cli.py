"""``workbench organism sample|train|check`` through Typer's test runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from workbench.errors import WorkbenchError
from workbench.organism.cli import app

runner = CliRunner()


def test_sample_prints_dialogues_with_posteriors():
    result = runner.invoke(app, ["sample", "--n", "2", "--rounds", "3", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.count("dialogue ") == 2
    assert result.output.count("round ") == 6
    assert "p(fair) = 0.300" in result.output and "hidden z =" in result.output


def test_sample_rejects_bad_n():
    result = runner.invoke(app, ["sample", "--n", "0"])
    assert isinstance(result.exception, WorkbenchError)


@pytest.mark.parametrize("command", ["sample", "train", "check"])
def test_help_explains_options(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "--seed" in result.output


def test_train_then_check_a_tiny_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    result = runner.invoke(app, ["train", "--out", str(out), "--seed", "1", "--steps", "3", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "organism.json").read_text())
    assert meta["training"]["steps"] == 3 and meta["training"]["seed"] == 1
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    result = runner.invoke(app, ["check", "--model", str(out), "--n", "4", "--items", "2"])
    assert result.exit_code == 0, result.output
    assert "organism model" in result.output and "organism-inject" in result.output


def test_check_rejects_a_missing_folder(tmp_path):
    result = runner.invoke(app, ["check", "--model", str(tmp_path / "nope")])
    assert isinstance(result.exception, WorkbenchError)

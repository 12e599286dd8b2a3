"""``workbench organism sample|train|check`` through the real entry point (tests/cli_support.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cli_support import error_line, workbench  # noqa: E402


def test_sample_prints_dialogues_with_posteriors(capsys, monkeypatch):
    code, out, err = workbench(capsys, monkeypatch, "organism", "sample", "--n", "2", "--rounds", "3", "--seed", "5")
    assert code == 0, err
    assert out.count("dialogue ") == 2
    assert out.count("round ") == 6
    assert "p(fair) = 0.300" in out and "hidden z =" in out


def test_sample_rejects_bad_n(capsys, monkeypatch):
    code, _, err = workbench(capsys, monkeypatch, "organism", "sample", "--n", "0")
    assert code == 2
    error_line(err, "--n")


@pytest.mark.parametrize("command", ["sample", "train", "check"])
def test_help_explains_options(capsys, monkeypatch, command):
    code, out, _ = workbench(capsys, monkeypatch, "organism", command, "--help")
    assert code == 0
    assert "--seed" in out


def test_train_then_check_a_tiny_checkpoint(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "tiny"
    code, out, err = workbench(capsys, monkeypatch, "organism", "train", "--out", str(out_dir), "--seed", "1", "--steps", "3",
                               "--batch-size", "4")
    assert code == 0, err
    meta = json.loads((out_dir / "organism.json").read_text())
    assert meta["training"]["steps"] == 3 and meta["training"]["seed"] == 1
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "chat_template.jinja").is_file()
    code, out, err = workbench(capsys, monkeypatch, "organism", "check", "--model", str(out_dir), "--n", "4", "--items", "2")
    assert code == 0, err
    assert "organism model" in out and "organism-inject" in out


def test_check_rejects_a_missing_folder(tmp_path, capsys, monkeypatch):
    code, _, err = workbench(capsys, monkeypatch, "organism", "check", "--model", str(tmp_path / "nope"))
    assert code == 2
    error_line(err, "nope")

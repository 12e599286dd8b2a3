"""`workbench report` on constructed run files: every figure as PNG and SVG, one index.html that links
them, user text escaped, no torch, and a headless Chromium screenshot when Chromium is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from cli_support import error_line, workbench
from test_analysis import _write_run


def _runs(tmp_path):
    rng = np.random.default_rng(4)
    n, rounds = 30, 4
    gold = rng.integers(0, 3, n)
    paths = []
    for i in range(2):
        parsed = np.where(rng.random((n, rounds)) < 0.1, -1, rng.integers(0, 3, (n, rounds)))
        concept = rng.normal(size=(n, rounds)).cumsum(1)
        paths.append(_write_run(tmp_path / f"run{i}.h5", parsed, rng.integers(0, 3, (n, rounds)), gold, concept=concept))
    return paths


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two constructed runs and the report of both: (run paths, index.html)."""
    from workbench.analysis.report import build_report

    root = tmp_path_factory.mktemp("report")
    paths = _runs(root)
    return paths, build_report(paths, root / "report")


def test_report_writes_every_figure_and_an_index_that_links_them(report):
    paths, index = report
    out = index.parent
    html = index.read_text(encoding="utf-8")
    stems = {p.stem for p in out.glob("*.png")}
    assert stems == {p.stem for p in out.glob("*.svg")}
    assert {"curves", "run0-reliability", "run1-reliability", "run0-flips", "run0-concept-heatmap"} <= stems
    for stem in stems:
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        ET.parse(out / f"{stem}.svg")  # well-formed XML
        assert f"src='{stem}.svg'" in html
    assert "run0" in html and "run1" in html and "convergence" in html and "Spearman" in html


def test_report_cli_escapes_what_the_run_file_says_and_refuses_a_file_as_out(report, tmp_path, capsys, monkeypatch):
    import h5py

    path = tmp_path / "run.h5"
    path.write_bytes(report[0][0].read_bytes())
    with h5py.File(path, "r+") as f:
        f.attrs["model_name"] = "<script>alert(1)</script>"
    code, out, err = workbench(capsys, monkeypatch, "report", str(path), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    assert "wrote" in out and "index.html" in out
    html = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;" in html
    (tmp_path / "file").write_text("x")
    code, _, err = workbench(capsys, monkeypatch, "report", str(path), "--out", str(tmp_path / "file"))
    assert code == 2
    error_line(err, "file")


def test_analysis_and_report_do_not_import_torch():
    code = "import sys, workbench.analysis.analyze, workbench.analysis.report, workbench.analysis.summary; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (make system-tools)")
def test_index_renders_in_headless_chromium(report, tmp_path):
    index = report[1]
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2000",
                    f"--screenshot={shot}", index.resolve().as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.read_bytes()[:4] == b"\x89PNG"
    # the page is not blank: a rendered figure gives many distinct colours
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3].reshape(-1, 3)
    assert len(np.unique((pixels * 255).astype(np.uint8), axis=0)) > 50
    assert Path(shot).stat().st_size > 20_000


def test_heatmap_colours_follow_the_data():
    from workbench.analysis.report import heatmap_colors

    assert heatmap_colors(np.array([[0.2, 0.9], [0.4, 0.5]])) == {"cmap": "viridis", "vmin": 0.2, "vmax": 0.9}
    assert heatmap_colors(np.array([-0.5, 1.5])) == {"cmap": "RdBu_r", "vmin": -1.5, "vmax": 1.5}
    assert heatmap_colors(np.array([-3.0, -1.0]))["cmap"] == "viridis"
    assert heatmap_colors(np.array([np.nan]))["cmap"] == "viridis"


def test_overlaying_runs_of_different_sizes_warns(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    paths = []
    for i, (n, rounds) in enumerate(((12, 3), (20, 3))):
        gold = rng.integers(0, 3, n)
        answers = rng.integers(0, 3, (n, rounds))
        paths.append(_write_run(tmp_path / f"size{i}.h5", answers, answers, gold))  # parsed = argmax: identical curves
    code, out, err = workbench(capsys, monkeypatch, "report", *map(str, paths), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    warning = " ".join(err.split())
    assert warning.startswith("warning: the overlaid runs differ in size") and "size0 12 samples × 3 rounds" in warning
    html = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    assert "Warning:" in html and "differ in size" in html
    svg = (tmp_path / "rep" / "curves.svg").read_text(encoding="utf-8")
    assert "option argmax (identical to parsed answer)" in svg and "ECE [min, max]" in svg
    # token and option entropy on panels of their own
    assert "option entropy (nats)" in svg and "mean token entropy (nats)" in svg
    code, _, err = workbench(capsys, monkeypatch, "report", str(paths[0]), "--out", str(tmp_path / "one"))
    assert code == 0 and "warning" not in err


def test_pngs_are_drawn_at_200_dpi(report):
    import matplotlib.image

    out = report[1].parent
    height, width = matplotlib.image.imread(out / "curves.png").shape[:2]
    # the curves figure is 10 inches wide before the tight bounding box trims its margins
    assert width > 9 * 200 and height > 3 * 200

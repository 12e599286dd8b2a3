"""Live mode as a researcher meets it: what shows while the model loads, the option entropy beside
the token entropy, and the probe found at the default place (the one `make demo` fits) when no
--probe is given, named in the header."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("workbench.engine.session", reason="live mode needs workbench.engine.session")

import tui.live as model_side  # noqa: E402
from tui.app import WorkbenchApp  # noqa: E402
from tui.live import DEMO_PROBE, LiveConfig, default_probe  # noqa: E402
from tui.screens.live import LiveScreen  # noqa: E402
from tui.widgets.entropy_curve import EntropyCurve  # noqa: E402
from tui.widgets.heatmap import ConceptHeatmap  # noqa: E402
from tui.widgets.option_bars import OptionBars  # noqa: E402
from tui_support import screen_text, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory, organism):
    from probes.contrast import organism_contrast
    from probes.fit import fit_probe, save_fitted

    contrast = organism_contrast(organism.tokenizer, n=200)
    layers = list(range(organism.n_layers))
    ev, arrays = fit_probe(organism, contrast, "logreg", "hook_resid_post", layers)
    path = tmp_path_factory.mktemp("liveprobe") / "fair.h5"
    save_fitted(path, organism, contrast, "logreg", "hook_resid_post", "last", 0.25, 0, ev, arrays)
    return path


def run_live(config, body, before_load=None, size=(120, 30)):
    async def main():
        app = WorkbenchApp(live=config)
        async with app.run_test(size=size) as pilot:
            screen = app.screen
            assert isinstance(screen, LiveScreen)
            if before_load is not None:
                await before_load(app, pilot, screen)
            await wait_until(pilot, lambda: screen.busy is None and (screen.live is not None or app.failures), timeout=120,
                             what="the model to load")
            await body(app, pilot, screen)

    asyncio.run(main())


def test_loading_shows_loading_not_an_open_ended_task(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no probe files here
    gate = threading.Event()
    real = model_side.load_live

    def gated_load(config):  # the real load, started only once the test has looked at the screen
        gate.wait(60)
        return real(config)

    monkeypatch.setattr(model_side, "load_live", gated_load)

    async def before_load(app, pilot, s):
        await pilot.pause()
        assert s.live is None and s.busy
        text = screen_text(app)
        assert s.query_one(OptionBars).message == "loading …" and "open-ended" not in text and "loading" in text
        gate.set()

    async def body(app, pilot, s):
        assert app.failures == []
        assert "open-ended" not in screen_text(app) and s.query_one(OptionBars).message == "no round yet (n)"
        assert "probe none (--probe FILE)" in screen_text(app)  # no --probe and none at the default place: the header says how to get one

    try:
        run_live(LiveConfig.from_options("organism", None, None, None, None), body, before_load)
    finally:
        gate.set()


def test_the_probe_at_the_default_place_is_used_and_named(monkeypatch, tmp_path, probe_file):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "artifacts" / "probes"
    folder.mkdir(parents=True)
    (folder / "broken.h5").write_bytes(b"not hdf5")  # passed over
    shutil.copy(probe_file, folder / DEMO_PROBE)

    async def body(app, pilot, s):
        assert app.failures == []
        assert s.live.probe is not None and s.live.probe_found and s.live.probe_path == Path("artifacts/probes") / DEMO_PROBE
        assert f"probe {DEMO_PROBE} (found)" in screen_text(app)
        await pilot.press("n")
        await wait_until(pilot, lambda: s.busy is None and s.sample is not None, timeout=60, what="round 1")
        heatmap = s.query_one(ConceptHeatmap)
        assert heatmap.values.shape[0] == 1 and np.isfinite(heatmap.values).all()  # the concept score of round 1
        # option entropy beside the token entropy: in the line under the conversation and in the curve
        opt_h = float(s.sample.option_entropy[0])
        assert np.isfinite(opt_h) and f"option H {opt_h:.3f}" in screen_text(app)
        np.testing.assert_allclose(s.query_one(EntropyCurve).option, s.sample.option_entropy, rtol=1e-6)

    run_live(LiveConfig.from_options("organism", None, None, None, None), body)


def test_default_probe_skips_probes_of_another_model_and_prefers_the_demos(tmp_path, probe_file, organism):
    import h5py

    assert default_probe(organism, tmp_path / "missing") == (None, None)
    other = tmp_path / "other.h5"
    shutil.copy(probe_file, other)
    with h5py.File(other, "a") as f:
        f.attrs["model_name"], f.attrs["model_path"] = "gpt2", "/models/gpt2"
    assert default_probe(organism, tmp_path) == (None, None)
    shutil.copy(probe_file, tmp_path / "newer.h5")
    shutil.copy(probe_file, tmp_path / DEMO_PROBE)
    path, probe = default_probe(organism, tmp_path)
    assert path == tmp_path / DEMO_PROBE and probe is not None
    (tmp_path / DEMO_PROBE).unlink()
    assert default_probe(organism, tmp_path)[0] == tmp_path / "newer.h5"
